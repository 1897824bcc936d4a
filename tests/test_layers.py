"""The layers are folders, and imports only point down: core -> store -> analysis -> services -> ui / cli -> pages.

Every import in every module counts, including those inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"core": 0, "store": 1, "analysis": 2, "services": 3, "ui": 4, "cli": 4, "__main__": 5}
STREAMLIT_FREE = {"core", "store", "analysis", "services", "cli"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cifarviz" or len(parts) < 2:
        return None
    return parts[1]


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """Absolute names of every module imported by `path` (relative imports resolved), with line numbers."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            found.append((name, node.lineno))
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]  # `from cifarviz import ui`
    return found


def modules():
    for path in sorted((REPO / "cifarviz").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def test_every_module_lives_in_a_layer_folder():
    loose = [module for _, module in modules() if layer_of(module) is None and module != "cifarviz"]
    assert loose == []
    unknown = sorted({layer_of(m) for _, m in modules()} - set(LAYERS) - {None})
    assert unknown == [], f"modules outside the layers {sorted(LAYERS)}: {unknown}"


def test_imports_only_point_down_and_only_the_ui_imports_streamlit():
    wrong = []
    for path, module in modules():
        layer = layer_of(module)
        if layer is None:
            continue
        for name, line in imports_of(path, module):
            target = layer_of(name)
            where = f"{path.relative_to(REPO)}:{line}"
            if name.startswith("cifarviz.") and target not in LAYERS and target != "_shipped" \
                    and not (REPO / "cifarviz" / target).exists() and not (REPO / "cifarviz" / f"{target}.py").exists():
                wrong.append(f"{where} imports {name}: no such module (the layers are {', '.join(LAYERS)})")
            if target in LAYERS and LAYERS[target] > LAYERS[layer]:
                wrong.append(f"{where} ({layer}) imports {name} ({target}): upwards")
            if target in ("ui", "cli") and layer in ("ui", "cli") and target != layer:
                wrong.append(f"{where}: the CLI and the UI are separate front ends ({name})")
            if layer in STREAMLIT_FREE and name.split(".")[0] == "streamlit":
                wrong.append(f"{where} ({layer}) imports Streamlit")
    assert wrong == []


def test_pages_are_thin_views_over_the_ui_package():
    for page in sorted((REPO / "pages").glob("*.py")):
        lines = page.read_text().count("\n")
        assert lines <= 170, f"{page.name} has {lines} lines: move its helpers into cifarviz/ui/"
        for name, line in imports_of(page, f"pages.{page.stem}"):
            assert layer_of(name) != "services" or name.startswith("cifarviz.services.runs"), \
                f"{page.name}:{line} imports {name}: pages talk to services through cifarviz.ui"


def test_the_layer_check_sees_a_violation(tmp_path):
    """The check itself: an upward import written into a core module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cifarviz.ui import app\n    import streamlit\n")
    found = [name for name, _ in imports_of(bad, "cifarviz.core.bad")]
    assert "cifarviz.ui.app" in found and "streamlit" in found
