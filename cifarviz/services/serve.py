"""A lecture hall on one machine: several Streamlit server processes behind one nginx address.

    python -m cifarviz serve --processes 2 --port 8501 [--address 0.0.0.0]

One Streamlit process runs the app's Python in one interpreter (about 1.1 cores for a class of 30 here), so a hall
of 200 needs several. This starts N `streamlit run streamlit_app.py` processes on free loopback ports and Debian's
nginx in front of them on `--address:--port`, and stops them all on Ctrl-C or SIGTERM.

Sessions are sticky by cookie: nginx hashes a `cifarviz_route` cookie it hands out with the first response (a fresh
random value per new browser), so a browser's page, websocket and images all reach the process that holds its
session, while a hall behind one NAT address still spreads over every process (stickiness by address would not).
Everything the processes share is on disk and already safe between processes: the cache folder
($CIFARVIZ_CACHE, file locks per key), the runs folder and its queue lock ($CIFARVIZ_RUNS), the study database.
Warm the cache once, before class, with `python -m cifarviz precompute`; every process reads the result.

The nginx configuration written (and used) is in the run folder printed at start; `nginx_config()` is the template
for a permanent install (see the README).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cifarviz.core.errors import CifarvizError

REPO = Path(__file__).resolve().parents[2]
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # one part of a host name (RFC 1123)
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
ROUTE_COOKIE = "cifarviz_route"
MAX_PROCESSES = 64


class ServeError(CifarvizError):
    """The lecture-hall set-up cannot start as asked (no nginx, a bad port, a process that did not come up)."""


def listen_address(address: str) -> str:
    """`address` as nginx's `listen` and a URL take it: an IP address (IPv6 in brackets) or a host name. Anything
    else (a space, a semicolon, a path) is refused here, before it reaches nginx.conf."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if not _HOST_NAME.fullmatch(address) or len(address) > 253:
            raise ServeError(f"--address {address[:80]!r} is not an IP address or host name: use, for example, "
                             "127.0.0.1 (this machine only) or 0.0.0.0 (every network).") from None
        return address
    return f"[{ip}]" if ip.version == 6 else str(ip)


def check_port_free(address: str, port: int) -> None:
    """Refuse a port something already listens on: nginx would fail, and the health check would reach the other
    server and say this one is up."""
    host = address.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT is not "taken"
        try:
            probe.bind((host, port))
        except socket.gaierror as exc:
            raise ServeError(f"--address {address[:80]!r} cannot be resolved ({exc.strerror or exc}): use an IP "
                             "address, or a name this machine knows.") from None
        except OSError as exc:
            raise ServeError(f"Port {port} on {address} is taken ({exc.strerror or exc}): another `cifarviz serve` "
                             "or app is there. Stop it, or choose another --port.") from None


def _die_with_parent() -> None:
    """In each child, before it runs: a SIGTERM when `serve` itself dies, even by SIGKILL (Linux's parent-death
    signal), so no Streamlit or nginx is left answering on its own."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_config(backends: list[int], *, port: int, address: str = "127.0.0.1", run_dir: str | Path) -> str:
    """nginx's configuration for `backends` (loopback ports of Streamlit processes) behind address:port."""
    run_dir = Path(run_dir)
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in backends)
    # Run as root (a container), nginx's workers would switch to `nobody` and lose the run folder: stay root there.
    user = "user root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    return f"""# cifarviz lecture hall: {len(backends)} Streamlit processes behind one address (written by cifarviz serve)
{user}worker_processes 1;
pid {run_dir}/nginx.pid;
error_log {run_dir}/nginx-error.log warn;
daemon off;
events {{ worker_connections 8192; }}
http {{
    client_body_temp_path {run_dir}/body;
    proxy_temp_path {run_dir}/proxy;
    fastcgi_temp_path {run_dir}/fastcgi;
    uwsgi_temp_path {run_dir}/uwsgi;
    scgi_temp_path {run_dir}/scgi;
    log_format route '$remote_addr "$request" $status $cifarviz_route $upstream_addr';
    access_log {run_dir}/nginx-access.log route;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
    # A browser keeps its route (the cookie); a new one gets a fresh random route, set with the first response.
    map $cookie_{ROUTE_COOKIE} $cifarviz_route {{ "" $request_id; default $cookie_{ROUTE_COOKIE}; }}
    upstream cifarviz {{
        hash $cifarviz_route consistent;
{servers}
    }}
    server {{
        listen {address}:{port};
        client_max_body_size 200m;
        location / {{
            proxy_pass http://cifarviz;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 1d;
            proxy_buffering off;
            add_header Set-Cookie "{ROUTE_COOKIE}=$cifarviz_route; Path=/; HttpOnly; SameSite=Lax" always;
        }}
    }}
}}
"""


@dataclass
class LectureHall:
    url: str
    backends: list[str]
    run_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for process in self.processes[::-1]:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise ServeError(f"{url} did not come up within {timeout:.0f} s; its log ({log}):\n{tail}")


def start(processes: int = 2, *, port: int = 8501, address: str = "127.0.0.1", options: tuple = (),
          env: dict | None = None, nginx: str | None = None, run_dir: str | Path | None = None,
          startup_timeout: float = 120) -> LectureHall:
    """Start `processes` Streamlit processes and nginx in front of them; a LectureHall to stop()."""
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= MAX_PROCESSES:
        raise ServeError(f"--processes must be 1 to {MAX_PROCESSES}, not {processes!r}.")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ServeError(f"--port must be 1 to 65535, not {port!r}.")
    address = listen_address(address)
    check_port_free(address, port)
    nginx = nginx or shutil.which("nginx") or "/usr/sbin/nginx"  # Debian's, not on a user's PATH
    if not os.access(nginx, os.X_OK):
        raise ServeError(f"nginx is not installed (no {nginx}): `sudo apt-get install nginx-light` (Debian), or "
                         "run one process with `streamlit run streamlit_app.py`.")
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="cifarviz-hall-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**(os.environ if env is None else env)}
    # One secret for every process: a session's cookies (XSRF) mean the same to whichever process reads them.
    env.setdefault("STREAMLIT_SERVER_COOKIE_SECRET", secrets.token_hex(32))
    shown = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(address, address)
    hall = LectureHall(url=f"http://{shown}:{port}", backends=[],
                       run_dir=run_dir)
    try:
        ports = []
        for i in range(processes):
            backend = free_port()
            log = open(run_dir / f"streamlit-{i}.log", "wb")
            hall.processes.append(subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(backend),
                 "--server.address", "127.0.0.1", "--server.headless", "true",
                 "--browser.gatherUsageStats", "false", *options],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent))  # fmt: skip
            ports.append(backend)
            hall.backends.append(f"http://127.0.0.1:{backend}")
        for i, (url, process) in enumerate(zip(hall.backends, hall.processes)):
            _wait_healthy(url, process, run_dir / f"streamlit-{i}.log", startup_timeout)
        config = run_dir / "nginx.conf"
        config.write_text(nginx_config(ports, port=port, address=address, run_dir=run_dir))
        with open(run_dir / "nginx.log", "wb") as log:
            hall.processes.append(subprocess.Popen([nginx, "-p", str(run_dir), "-e", str(run_dir / "nginx-error.log"),
                                                    "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True, preexec_fn=_die_with_parent))
        _wait_healthy(hall.url, hall.processes[-1], run_dir / "nginx-error.log", 30)
    except BaseException:
        hall.stop()
        raise
    return hall


def cli(args) -> int:
    """`python -m cifarviz serve`: start, print where, wait for Ctrl-C or SIGTERM, stop everything."""
    options = tuple(flag for pair in args.streamlit_option for flag in ("--" + pair.partition("=")[0],
                                                                        pair.partition("=")[2]))
    hall = start(args.processes, port=args.port, address=args.address, options=options)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(f"cifarviz: {args.processes} Streamlit process(es) behind {hall.url} (nginx; configuration and logs in "
          f"{hall.run_dir}). Ctrl-C stops them all.", flush=True)
    try:
        while not stopping and all(p.poll() is None for p in hall.processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    dead = [i for i, p in enumerate(hall.processes) if p.poll() is not None]
    hall.stop()
    if dead and not stopping:
        print(f"cifarviz: process {dead[0]} ended on its own; everything was stopped (logs in {hall.run_dir}).",
              file=sys.stderr)
        return 1
    return 0
