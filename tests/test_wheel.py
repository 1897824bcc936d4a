"""`pip install .` gives a working package: the wheel holds every module, the shipped weights and the
declared dependencies, and once installed in a fresh virtual environment the CLI runs from a folder
outside the repository, with the repository off the path.

The fresh environment gets no copy of torch & co: a .pth file points it at this interpreter's
site-packages folders (only those, never the repository), and the wheel itself is installed with
--no-deps, so nothing is downloaded.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the files every build needs, used when git cannot list the working tree
BUILD_INPUTS = ["pyproject.toml", "setup.py", "requirements.txt", "requirements-test.txt", "README.md",
                "cifarviz", "checkpoints"]


def _source_files() -> list[str]:
    """What a fresh clone would hold: tracked files plus new ones git does not ignore (never .venv, runs/...)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True, timeout=30).stdout.decode()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        files = []
        for name in BUILD_INPUTS:
            path = REPO / name
            if path.is_file():
                files.append(name)
            elif path.is_dir():
                files += [str(p.relative_to(REPO)) for p in path.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts]  # fmt: skip
        return files
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]  # skip deleted-but-tracked files


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(_canonical(re.match(r"[A-Za-z0-9._-]+", line).group(0)))
    return names


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _clean_env() -> dict[str, str]:
    """This environment minus anything that would put the repository or this venv on the path."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONNOUSERSITE": "1"}


def _run(cmd, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    return subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, the source copy it was built from): built outside the repo, so no build/ or *.egg-info lands there."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in _source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    dist = tmp / "dist"
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", dist, src])  # fmt: skip
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(dist.glob("cifarviz-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], src


def _names(requirements) -> set[str]:
    return {_canonical(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def test_wheel_holds_every_module_the_weights_and_the_dependencies(built):
    wheel, src = built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        entry_points_file = f"{dist_info}/entry_points.txt"
        entry_points = zf.read(entry_points_file).decode() if entry_points_file in names else ""

    # every module of the source tree, subpackages included (core, analysis, services have no __init__.py)
    modules = {p.relative_to(src).as_posix() for p in (src / "cifarviz").rglob("*.py")}
    assert {"cifarviz/__init__.py", "cifarviz/__main__.py", "cifarviz/cli.py", "cifarviz/ui/app.py",
            "cifarviz/analysis/influence/__init__.py", "cifarviz/store/__init__.py", "cifarviz/core/checkpoint.py",
            "cifarviz/services/runs.py"} <= modules  # fmt: skip
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    # every shipped checkpoint with its metadata, as the data package cifarviz._shipped
    shipped = {f"cifarviz/_shipped/{p.relative_to(src / 'checkpoints').as_posix()}"
               for p in (src / "checkpoints").rglob("*") if p.suffix in (".safetensors", ".json", ".npz")}  # fmt: skip
    assert {"cifarviz/_shipped/fastnet.safetensors", "cifarviz/_shipped/fastnet.json",
            "cifarviz/_shipped/replicas/lenet-seed19.safetensors"} <= shipped  # lenet's ensemble too
    assert any(n.startswith("cifarviz/_shipped/store/influence/") for n in shipped)  # and its shipped index
    assert not shipped - names, f"checkpoints missing from the wheel: {sorted(shipped - names)}"
    # nothing else: no tests, benchmarks, caches or byte code
    stray = {n for n in names if not n.startswith(("cifarviz/", f"{dist_info}/")) or "__pycache__" in n}
    assert not stray, f"unexpected files in the wheel: {sorted(stray)}"

    requires = metadata.get_all("Requires-Dist") or []
    runtime = _names(r for r in requires if "extra ==" not in r)
    assert {"torch", "torchvision", "streamlit", "safetensors", "numpy"} <= runtime
    assert runtime == _requirement_names(src / "requirements.txt"), "Requires-Dist differs from requirements.txt"
    assert "pytest" not in runtime and "playwright" not in runtime
    assert "test" in (metadata.get_all("Provides-Extra") or [])
    test_extra = _names(r for r in requires if re.search(r"extra == ['\"]test['\"]", r))
    assert test_extra == _requirement_names(src / "requirements-test.txt") and "pytest" in test_extra
    assert re.search(r"^cifarviz\s*=\s*cifarviz\.cli:main$", entry_points, re.MULTILINE), entry_points


def _real_site_packages() -> list[str]:
    """This interpreter's site-packages folders (torch & co live there): only folders named so, never the repository
    (an editable install's .pth inside them is not processed when a .pth line adds them)."""
    paths = sysconfig.get_paths()
    candidates = [*site.getsitepackages(), paths["purelib"], paths["platlib"], *sys.path]
    found = []
    for p in candidates:
        path = Path(p).resolve()
        is_site_packages = path.name in ("site-packages", "dist-packages") and path.is_dir()
        if is_site_packages and path != REPO and str(path) not in found:
            found.append(str(path))
    return found


def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_repo(built, tmp_path):
    wheel, _ = built
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    proc = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    assert proc.returncode == 0, proc.stderr
    purelib = Path(proc.stdout.strip())
    deps = _real_site_packages()
    assert deps, "no site-packages folder found for the dependencies"
    (purelib / "_cifarviz_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))

    install = ["install", "--no-deps", "--no-index", "-q"]
    proc = _run([sys.executable, "-m", "pip", "--python", python, *install, wheel])
    if proc.returncode != 0 and "no such option: --python" in proc.stderr:  # pip older than 22.3
        proc = _run([sys.executable, "-m", "pip", *install, "--target", purelib, wheel])
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"

    work = tmp_path / "elsewhere"  # a working folder with no checkpoints/, runs/ or cifarviz/ in it
    work.mkdir()
    assert REPO not in work.resolve().parents

    code = ("import cifarviz, sys\n"
            "from cifarviz.core.checkpoint import SHIPPED_DIR\n"
            "print(cifarviz.__file__); print(SHIPPED_DIR); print(*sys.path, sep='\\n', file=sys.stderr)")  # fmt: skip
    where = _run([python, "-c", code], cwd=work, timeout=120)
    assert where.returncode == 0, where.stderr
    package_file, shipped_dir = (Path(line).resolve() for line in where.stdout.splitlines())
    assert env_dir.resolve() in package_file.parents, f"cifarviz imported from {package_file}, not the fresh venv"
    assert env_dir.resolve() in shipped_dir.parents and shipped_dir.name == "_shipped", shipped_dir
    assert (shipped_dir / "fastnet.safetensors").is_file()
    assert str(REPO) not in where.stderr.splitlines(), "the repository is on the fresh venv's sys.path"

    models = _run([python, "-m", "cifarviz", "models"], cwd=work, timeout=120)
    assert models.returncode == 0, f"{models.stdout}\n{models.stderr}"
    for name in ("lenet", "fastnet", "resnet18", "shipped fastnet", "shipped lenet"):
        assert name in models.stdout, f"{name!r} not in `cifarviz models`:\n{models.stdout}"

    script = bin_dir / ("cifarviz.exe" if os.name == "nt" else "cifarviz")
    assert script.is_file(), "the console script cifarviz was not installed"
    bad = _run([script, "no-such-command"], cwd=work, timeout=120)  # argparse's usage error, as main's exit code
    assert bad.returncode == 2 and "invalid choice" in bad.stderr, (bad.returncode, bad.stderr)
