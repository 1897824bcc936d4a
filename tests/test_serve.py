"""The lecture-hall set-up: `cifarviz serve`'s two Streamlit processes behind Debian's nginx, sticky by cookie.

New browsers are spread over both processes; every request of one browser (its page, its websocket, its images)
reaches the process that holds its session, so a page full of images loads whole through the proxy.

.ci/run installs Debian's nginx; without it this test is skipped with that reason, and CI fails on a skip."""

from __future__ import annotations

import collections
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from browser import assert_healthy, free_port, wait_idle

from cifarviz.services import serve

LOG_LINE = re.compile(r'^\S+ "(?P<request>[^"]*)" (?P<status>\d+) (?P<route>\S+) (?P<upstream>\S+)$')


@pytest.fixture(scope="module")
def hall(cifar, tmp_path_factory):
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        pytest.skip("lecture-hall test: Debian's nginx is not installed (apt-get install nginx-light)")
    hall = serve.start(2, port=free_port(), env={**os.environ, "CIFARVIZ_DATA": str(cifar.root)},
                       run_dir=tmp_path_factory.mktemp("hall"))
    yield hall
    hall.stop()


def routes(hall) -> dict[str, set[str]]:
    """route cookie -> the backends nginx sent its requests to (from the access log)."""
    found = collections.defaultdict(set)
    for line in (hall.run_dir / "nginx-access.log").read_text().splitlines():
        match = LOG_LINE.match(line)
        if match and match["upstream"] != "-":
            found[match["route"]].add(match["upstream"])
    return found


def test_new_browsers_are_spread_and_each_sticks_to_its_process(hall, browser):
    for _ in range(20):  # twenty new visitors, no cookie yet: each gets a route of its own
        with urllib.request.urlopen(hall.url + "/", timeout=30) as response:
            assert response.status == 200 and serve.ROUTE_COOKIE in response.headers["Set-Cookie"]
    used = set().union(*routes(hall).values())
    assert len(used) == 2, used  # both processes serve (all 20 on one: a chance of 2 in a million)

    contexts = [browser.new_context(viewport={"width": 1400, "height": 900}) for _ in range(2)]
    try:
        for context in contexts:
            page = context.new_page()
            page.set_default_timeout(300_000)
            page.goto(f"{hall.url}/dataset")
            wait_idle(page)
            page.get_by_role("tab", name="Samples").click()
            wait_idle(page)
            assert_healthy(page, "the Dataset page through the proxy")
            images = page.locator("[data-testid='stMain'] img")
            images.nth(39).wait_for(timeout=120_000)  # the tab's images drawn (eight per class)
            broken = page.evaluate("[...document.querySelectorAll(\"[data-testid='stMain'] img\")]"
                                   ".filter(i => !(i.complete && i.naturalWidth > 0)).length")
            assert broken == 0, f"{broken} images did not load: a request reached another process"
    finally:
        cookies = [c["value"] for context in contexts for c in context.cookies() if c["name"] == serve.ROUTE_COOKIE]
        for context in contexts:
            context.close()  # the websockets close: nginx logs them now
    assert len(cookies) == 2

    def requests_of(cookie: str) -> list[str]:
        return [m["request"] for line in (hall.run_dir / "nginx-access.log").read_text().splitlines()
                if (m := LOG_LINE.match(line)) and m["route"] == cookie]

    deadline = time.monotonic() + 30  # nginx logs a websocket when it closes
    while not all(any("/_stcore/stream" in r for r in requests_of(c)) for c in cookies):
        assert time.monotonic() < deadline, "the websockets were never logged"
        time.sleep(0.5)
    seen = routes(hall)
    for cookie in cookies:
        assert len(seen[cookie]) == 1, (cookie, seen[cookie])  # page, websocket, media: one process
        assert any("/media/" in r for r in requests_of(cookie))


def test_bad_settings_are_refused_before_anything_starts(tmp_path):
    with pytest.raises(serve.ServeError, match="--processes must be"):
        serve.start(0, run_dir=tmp_path)
    with pytest.raises(serve.ServeError, match="--port must be"):
        serve.start(2, port=70000, run_dir=tmp_path)
    with pytest.raises(serve.ServeError, match="nginx is not installed"):
        serve.start(2, port=free_port(), nginx=str(tmp_path / "nginx"), run_dir=tmp_path)
    for address in ("a b", "127.0.0.1; include /etc/passwd", "x:y:z", "/tmp", "", "host name", "-lead.example"):
        with pytest.raises(serve.ServeError, match="not an IP address or host name"):
            serve.start(1, port=free_port(), address=address, run_dir=tmp_path)
    import socket

    with socket.socket() as taken:  # a port something listens on: refused, never "serving" through the other one
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(serve.ServeError, match="is taken"):
            serve.start(1, port=taken.getsockname()[1], run_dir=tmp_path)
    assert not list(tmp_path.glob("streamlit-*.log"))  # nothing was started
    assert serve.listen_address("::1") == "[::1]" and serve.listen_address("my-host.example.org")


def test_a_killed_serve_leaves_nothing_answering(cifar, tmp_path):
    """SIGKILL gives `serve` no chance to stop its children: they end by themselves (the parent-death signal)."""
    import signal
    import socket
    import subprocess
    import sys

    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        pytest.skip("lecture-hall test: Debian's nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cifarviz", "serve", "--processes", "1", "--port", str(port)],
                               cwd=serve.REPO, env={**os.environ, "CIFARVIZ_DATA": str(cifar.root)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()  # printed once everything answers
    match = re.search(r"logs in (\S+)\)", line)
    assert match, line
    backends = [int(p) for p in re.findall(r"server 127\.0\.0\.1:(\d+)", (Path(match[1]) / "nginx.conf").read_text())]
    process.send_signal(signal.SIGKILL)
    process.wait()

    def answering(p):
        with socket.socket() as probe:
            probe.settimeout(1)
            return probe.connect_ex(("127.0.0.1", p)) == 0

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(answering(p) for p in [port, *backends]):
        time.sleep(0.5)
    assert not any(answering(p) for p in [port, *backends]), "an orphan still answers"
