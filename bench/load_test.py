"""Load test: many light viewers (no browsers) on one explorer server, and a check of every inspector they open.

Starts `streamlit run streamlit_app.py` on a free 127.0.0.1 port, warms the caches with
`python -m cifarviz precompute -c fastnet`, then runs N simulated viewers for a fixed time. Each viewer
speaks Streamlit's own websocket protocol (protobuf BackMsg / ForwardMsg) and loops: open a random page;
on a page with images (Dataset, Evaluate, Influence) click a random image button (the image inspector
opens), check the inspector, close it. Each action is timed from the request to the server's
`script_finished`. A viewer pauses between actions (--think, mean seconds).

Every inspector is checked: no exception element anywhere, the title names the clicked image, the
nearest training images are shown (the caches are warm), and its Grad-CAM picture, fetched from the
server's media URL, equals `overlay_heatmap(image, grad_cam(model, image, target))` computed here,
serially, after the run (so this process does not compete with the server for the CPU during it).

    python bench/load_test.py [--clients 30] [--seconds 300] [--think 2] [--data PATH]
                              [--streamlit-option runner.postScriptGC=true ...]
    python bench/load_test.py --processes 2 --train lenet --study   # the lecture hall: 2 processes behind nginx
    python bench/load_test.py --profile [--reruns 30]   # one viewer: where the server's time goes (py-spy)

With --processes N the viewers go through `python -m cifarviz serve` (nginx, sticky by cookie): each keeps its
route cookie for its websocket and its media fetches, as a browser does. Memory and CPU are all processes' sums.

Prints a table and writes JSON to bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import websockets
from PIL import Image
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ClientState_pb2 import ClientState
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's cifarviz (run as `python bench/load_test.py`)
from cifarviz.core.utils import atomic_write
from cifarviz.ui.app import PAGES as APP_PAGES

RESULTS = Path(__file__).resolve().parent / "results"
# The explorer's pages by title: (URL page name, file). The default page's URL name is "".
PAGES = {title.lower(): ("" if i == 0 else Path(path).stem, path) for i, (path, title, _) in enumerate(APP_PAGES)}
CHECKPOINT = "fastnet"  # the sidebar's default checkpoint, the one precompute warms
GRADCAM_CAPTION = re.compile(r"Where the model found evidence for '(?P<target>[^']+)'")
# Image buttons are keyed `<grid>-<split>-<index>` (cell-test-123, sample-airplane-train-9, browse-test-7).
IMAGE_BUTTON_KEY = re.compile(r"^(?P<grid>.+)-(?P<split>train|val|test)-(?P<index>\d+)$")
NOT_INSPECTOR_GRIDS = ("influence-pick",)  # image buttons that pick a test image for the Influence page instead
PIXEL_TOLERANCE = 2  # intensity levels: thread-count and memory-layout rounding, never another image's map


# --------------------------------------------------------------------------- the server (bench_app.py uses it too)


def default_data() -> str:
    """$CIFARVIZ_DATA, else the development copy beside the checkout (as the tests use)."""
    return os.environ.get("CIFARVIZ_DATA") or str(REPO.parent / "shared" / "data" / "cifar10-jpeg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen | None
    backends: list = field(default_factory=list)  # behind a proxy: (url, pid) of each Streamlit process
    warm_urls: list = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else self.backends[0][1]

    @property
    def pids(self) -> list[int]:
        return [pid for _, pid in self.backends] if self.backends else [self.process.pid]


@contextlib.contextmanager
def lecture_hall(env: dict, processes: int, options: tuple = ()):
    """`cifarviz serve`: `processes` Streamlit processes behind nginx on a free loopback port, sticky by cookie."""
    from cifarviz.services import serve

    hall = serve.start(processes, port=free_port(), env=env, options=options)
    try:
        yield Server(hall.url, None, backends=[(url, p.pid) for url, p in zip(hall.backends, hall.processes)],
                     warm_urls=list(hall.backends))
    finally:
        hall.stop()


@contextlib.contextmanager
def streamlit_server(env: dict, log_path: Path, options: tuple = (), startup_timeout: float = 90):
    """`streamlit run streamlit_app.py` on a free loopback port (never any other address), until the block ends.
    `options`: more command-line config, e.g. ("--runner.postScriptGC", "true")."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
             *options],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        server = Server(f"http://127.0.0.1:{port}", process)
        try:
            wait_healthy(server, startup_timeout, log_path)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy(server: Server, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=2).read() == b"ok":
                return
        time.sleep(0.3)
    raise SystemExit(f"streamlit did not start; its log ({log_path}):\n" + log_path.read_text(errors="replace")[-3000:])


def precompute(env: dict, checkpoint: str = CHECKPOINT) -> float:
    """Warm the disk caches in a separate process, as a teacher does before class; returns seconds taken."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cifarviz", "precompute", "-c", checkpoint], cwd=REPO, env=env, check=True)
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()  # after the command name, which may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- Streamlit's websocket protocol


@dataclass
class ImageButton:
    key: str
    widget_id: str
    split: str
    index: int


@dataclass
class Run:
    """What one script run sent: every element and block (by delta path) and how long until script_finished."""

    seconds: float
    elements: list = field(default_factory=list)  # (delta path, Element proto)
    blocks: list = field(default_factory=list)  # (delta path, Block proto)

    def of_type(self, kind: str) -> list:
        return [el for _path, el in self.elements if el.WhichOneof("type") == kind]

    @property
    def exceptions(self) -> list[str]:
        return [el.exception.message for el in self.of_type("exception")]

    @property
    def image_buttons(self) -> list[ImageButton]:
        buttons = []
        for el in self.of_type("button"):
            key = widget_key(el.button.id)
            match = IMAGE_BUTTON_KEY.match(key)
            if match and match["grid"] not in NOT_INSPECTOR_GRIDS:
                buttons.append(ImageButton(key, el.button.id, match["split"], int(match["index"])))
        return buttons

    @property
    def open_dialog_id(self) -> str | None:
        """The widget id of the open dialog (its dismissal is a trigger on that id), if one is open."""
        open_ = [b.dialog.id for _path, b in self.blocks if b.WhichOneof("type") == "dialog" and b.dialog.is_open]
        return open_[-1] if open_ else None

    def markdown_containing(self, text: str) -> bool:
        return any(text in el.markdown.body for el in self.of_type("markdown"))

    def images_with_caption(self, pattern: re.Pattern) -> list[tuple[str, re.Match]]:
        """(media URL, caption match) for every image whose caption matches `pattern`."""
        found = []
        for el in self.of_type("imgs"):
            for img in el.imgs.imgs:
                match = pattern.match(img.caption)
                if match:
                    found.append((img.url, match))
        return found


def widget_key(widget_id: str) -> str:
    """The user key inside a widget id: Streamlit builds ids as `$$ID-<hash>-<key>` (`-None` without a key)."""
    parts = widget_id.split("-", 2)
    return parts[2] if len(parts) == 3 and parts[2] != "None" else ""


class StreamlitClient:
    """One browser tab, reduced to the protocol: rerun requests out, ForwardMsgs in.

    Like the frontend, it names a page by its URL path on navigation and by the page's script hash
    (sent back in every run's `navigation` message) when a widget on the current page is used. It
    sends no cached message hashes, so the server always sends whole messages, never references."""

    def __init__(self, base_url: str, timeout: float = 120):
        self.base_url, self.timeout = base_url, timeout  # every request is bounded: a hung run is a time-out
        self.page_hash = ""
        self.cookie = ""  # behind the lecture hall's proxy: the route cookie, sent with every request like a browser
        self._ws = None

    async def connect(self) -> None:
        if not self.cookie:  # the first visit's page load: a proxy answers with the route this tab keeps
            headers = await asyncio.to_thread(
                lambda: urllib.request.urlopen(self.base_url + "/", timeout=self.timeout).headers)
            self.cookie = "; ".join(c.split(";", 1)[0] for c in headers.get_all("Set-Cookie") or [])
        ws_url = self.base_url.replace("http://", "ws://") + "/_stcore/stream"
        extra = {"additional_headers": {"Cookie": self.cookie}} if self.cookie else {}
        self._ws = await asyncio.wait_for(
            websockets.connect(ws_url, subprotocols=["streamlit"], max_size=None, **extra), self.timeout)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def open_page(self, page_name: str) -> Run:
        return await self._rerun(ClientState(page_name=page_name, query_string=""))

    async def click(self, widget_id: str) -> Run:
        """A button (or a dialog's dismissal): a trigger value, true for this one run only."""
        state = ClientState(page_script_hash=self.page_hash, query_string="")
        state.widget_states.widgets.append(WidgetState(id=widget_id, trigger_value=True))
        return await self._rerun(state)

    async def _rerun(self, state: ClientState) -> Run:
        return await asyncio.wait_for(self._rerun_until_finished(state), self.timeout)

    async def _rerun_until_finished(self, state: ClientState) -> Run:
        start = time.perf_counter()
        await self._ws.send(BackMsg(rerun_script=state).SerializeToString())
        run = Run(seconds=0.0)
        while True:
            msg = ForwardMsg()
            msg.ParseFromString(await self._ws.recv())
            kind = msg.WhichOneof("type")
            if kind == "new_session":  # sent at the start of every run
                run = Run(seconds=0.0)  # a run restarted by st.rerun() replaces what the first one drew
            elif kind == "navigation":  # st.navigation names the page this run shows
                self.page_hash = msg.navigation.page_script_hash
            elif kind == "delta":
                record(run, msg)
            elif run_finished(msg):
                run.seconds = time.perf_counter() - start
                return run

    async def fetch(self, media_url: str) -> bytes:
        """An image's bytes from the server's media endpoint (served only while the page shows it)."""
        url = media_url if media_url.startswith("http") else self.base_url + media_url
        request = urllib.request.Request(url, headers={"Cookie": self.cookie} if self.cookie else {})
        return await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=self.timeout).read())


def run_finished(msg: ForwardMsg) -> bool:
    """The end of a run of the page (one restarted by st.rerun() has not ended; a fragment's own run is not
    the page's). A run that stops early (st.stop) still ends with FINISHED_SUCCESSFULLY."""
    return msg.WhichOneof("type") == "script_finished" and msg.script_finished in (
        ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_WITH_COMPILE_ERROR)


def record(run: Run, msg: ForwardMsg) -> None:
    delta, path = msg.delta, tuple(msg.metadata.delta_path)
    kind = delta.WhichOneof("type")
    if kind == "new_element":
        run.elements.append((path, delta.new_element))
    elif kind == "add_block":
        run.blocks.append((path, delta.add_block))


# --------------------------------------------------------------------------- simulated viewers


@dataclass
class InspectorSample:
    """What the check after the run needs: which image, which class Grad-CAM explained, the served picture."""

    split: str
    index: int
    target: str
    picture: bytes


@dataclass
class Tally:
    page_seconds: list = field(default_factory=list)
    by_page: dict = field(default_factory=dict)  # page name -> its times
    inspector_seconds: list = field(default_factory=list)
    close_seconds: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # short descriptions, the first few are printed
    timeouts: int = 0
    samples: list = field(default_factory=list)


async def viewer(base_url: str, deadline: float, tally: Tally, rng: random.Random, think: float, timeout: float):
    """Loop until the deadline: open a random page; on an image page, open a random image's inspector, check it,
    close it. A time-out or a dropped connection is counted, and the viewer reconnects."""
    client = None
    while time.monotonic() < deadline:
        try:
            if client is None:
                client = StreamlitClient(base_url, timeout)
                await client.connect()
            await one_visit(client, tally, rng, think, deadline)
        except asyncio.TimeoutError:
            tally.timeouts += 1
            await _drop(client)
            client = None
        except (OSError, websockets.WebSocketException) as exc:
            tally.errors.append(f"connection: {exc!r}")
            await _drop(client)
            client = None
            await asyncio.sleep(1)
    await _drop(client)


async def _drop(client: StreamlitClient | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await client.close()


async def one_visit(client: StreamlitClient, tally: Tally, rng: random.Random, think: float, deadline: float):
    page = rng.choice(list(PAGES))
    run = await client.open_page(PAGES[page][0])
    tally.page_seconds.append(run.seconds)
    tally.by_page.setdefault(page, []).append(run.seconds)
    check_no_exceptions(run, f"page {page}", tally)
    buttons = run.image_buttons
    if not buttons or time.monotonic() >= deadline:  # Home and Models show no images
        await pause(rng, think)
        return
    await pause(rng, think)
    button = rng.choice(buttons)
    run = await client.click(button.widget_id)
    tally.inspector_seconds.append(run.seconds)
    await check_inspector(client, run, button, tally)
    await pause(rng, think)
    if run.open_dialog_id:
        closed = await client.click(run.open_dialog_id)  # what the dialog's X or Escape sends
        tally.close_seconds.append(closed.seconds)
        check_no_exceptions(closed, f"closing the inspector on {page}", tally)


async def pause(rng: random.Random, think: float) -> None:
    """A viewer looks at what it got for a while (uniform in [0.5, 1.5] x think seconds)."""
    if think > 0:
        await asyncio.sleep(think * rng.uniform(0.5, 1.5))


def check_no_exceptions(run: Run, what: str, tally: Tally) -> bool:
    for message in run.exceptions:
        tally.errors.append(f"{what}: exception element: {message[:120]}")
    return not run.exceptions


async def check_inspector(client: StreamlitClient, run: Run, button: ImageButton, tally: Tally) -> None:
    what = f"inspector {button.key}"
    if not check_no_exceptions(run, what, tally):
        return
    problems = []
    if run.open_dialog_id is None:
        problems.append("no open dialog")
    if not run.markdown_containing(f"{button.split.capitalize()} image #{button.index}"):
        problems.append("title does not name the clicked image")
    if not any(b.key.startswith("neighbours-train-") for b in run.image_buttons):
        problems.append("no nearest training images (warm caches)")
    cams = run.images_with_caption(GRADCAM_CAPTION)
    if len(cams) != 1:
        problems.append(f"{len(cams)} Grad-CAM images")
    else:
        url, match = cams[0]
        tally.samples.append(InspectorSample(button.split, button.index, match["target"], await client.fetch(url)))
    tally.errors.extend(f"{what}: {p}" for p in problems)


# --------------------------------------------------------------------------- the serial Grad-CAM check


def decoded(picture: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(picture)).convert("RGB"), dtype=np.int16)


def as_served(png: bytes, served: bytes) -> bytes:
    """`png` encoded the way the server delivered its picture: Streamlit re-encodes opaque images as JPEG
    (quality 90) unless asked for PNG, so an identical map must go through the same encoder to compare."""
    if Image.open(io.BytesIO(served)).format != "JPEG":
        return png
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def count_wrong_saliency(samples: list[InspectorSample], data_root: str) -> tuple[int, list[str], float]:
    """Recompute every distinct (image, explained class) once, serially, and compare each served picture.
    Returns (wrong count, descriptions, largest difference seen in intensity levels)."""
    import torch

    from cifarviz.analysis.explore import grad_cam, overlay_heatmap, to_png
    from cifarviz.core.checkpoint import SHIPPED_DIR, load_checkpoint
    from cifarviz.store.datasets import load_cifar10

    dataset = load_cifar10(data_root, download=False, progress=False)
    model = load_checkpoint(SHIPPED_DIR / f"{CHECKPOINT}.safetensors").model
    model.to(memory_format=torch.channels_last)  # the server's layout (cifarviz.ui.app.get_checkpoint)
    classes = list(dataset.classes)
    expected: dict[tuple, bytes] = {}
    wrong, notes, largest = 0, [], 0.0
    for s in samples:
        key = (s.split, s.index, s.target)
        if key not in expected:
            image = dataset.split(s.split).images[s.index]
            heat, _ = grad_cam(model, image, target_class=classes.index(s.target))
            expected[key] = to_png(overlay_heatmap(image, heat), scale=8)
        difference = np.abs(decoded(as_served(expected[key], s.picture)) - decoded(s.picture)).max()
        largest = max(largest, float(difference))
        if difference > PIXEL_TOLERANCE:
            wrong += 1
            notes.append(f"{s.split} #{s.index} '{s.target}': off by up to {difference} levels")
    return wrong, notes, largest


# --------------------------------------------------------------------------- the load run


class Sampler:
    """The server's RSS (all its processes together), read every few seconds in the background (the maximum is
    reported)."""

    def __init__(self, pids: list[int], every: float = 2.0):
        self.pids, self.every, self.max_rss_mb = pids, every, 0.0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                self.max_rss_mb = max(self.max_rss_mb, sum(rss_mb(pid) for pid in self.pids))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)


async def load(server: Server, args) -> tuple[Tally, float]:
    """Run the viewers until the deadline; the whole run is bounded even if the server hangs."""
    tally, stop = Tally(), asyncio.Event()
    sampler = Sampler(server.pids)
    sampling = asyncio.create_task(sampler.run(stop))
    deadline = time.monotonic() + args.seconds
    viewers = [viewer(server.url, deadline, tally, random.Random(args.seed + i), args.think, args.timeout)
               for i in range(args.clients)]  # fmt: skip
    bound = args.seconds + 4 * args.timeout + 5 * args.think + 30  # the last visit's actions and pauses
    try:
        await asyncio.wait_for(asyncio.gather(*viewers), bound)
    except asyncio.TimeoutError:
        tally.errors.append("the run did not stop by itself in time; the viewers were cancelled")
    stop.set()
    await sampling
    return tally, sampler.max_rss_mb


async def warm_up(server: Server) -> None:
    """Every page once and one inspector, on each process: each loads the data, the model and the feature bank
    once."""
    for url in server.warm_urls or [server.url]:
        client = StreamlitClient(url)
        await client.connect()
        for url_name, _ in PAGES.values():
            await client.open_page(url_name)
        run = await client.click((await client.open_page("evaluate")).image_buttons[0].widget_id)
        if run.open_dialog_id:
            await client.click(run.open_dialog_id)
        await client.close()


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]
    return {"n": len(values), "p50": statistics.median(values), "p95": p95, "max": max(values)}


def run_load(server: Server, args) -> dict:
    cpu_before, client_before = sum(map(cpu_seconds, server.pids)), time.process_time()
    print(f"{args.clients} viewers for {args.seconds:.0f} s on {server.url} ...", flush=True)
    tally, max_rss = asyncio.run(load(server, args))
    server_cpu, client_cpu = sum(map(cpu_seconds, server.pids)) - cpu_before, time.process_time() - client_before
    print(f"checking {len(tally.samples)} Grad-CAM pictures serially ...", flush=True)
    wrong, wrong_notes, largest = count_wrong_saliency(tally.samples, args.data)
    return {
        "timings": {"page": percentiles(tally.page_seconds), "inspector": percentiles(tally.inspector_seconds),
                    "close": percentiles(tally.close_seconds)},
        "pages": {name: percentiles(times) for name, times in sorted(tally.by_page.items())},
        "errors": len(tally.errors), "error_examples": tally.errors[:20], "timeouts": tally.timeouts,
        "inspectors_checked": len(tally.samples), "wrong_saliency": wrong, "wrong_saliency_examples": wrong_notes[:20],
        "largest_pixel_difference": largest, "server_max_rss_mb": max_rss, "server_cpu_seconds": server_cpu,
        "client_cpu_seconds": client_cpu,
    }  # fmt: skip


@contextlib.contextmanager
def background_training(model: str, data: str):
    """A training run of `model` in a worker process (the Train page's machinery, a private runs folder) for the
    duration of the block; then stopped. Yields a dict filled in at the end: images/s, epochs, state."""
    from cifarviz.core.train import TrainConfig
    from cifarviz.services import runs

    root = Path(tempfile.mkdtemp(prefix="load-test-runs-"))
    run_id = runs.submit_training(TrainConfig(model=model, epochs=500), data, root=root)
    deadline = time.monotonic() + 300
    while not any(m.get("event") == "step" for m in runs.read_metrics(run_id, root)):  # past data loading
        if runs.load_run(run_id, root).state not in runs.ACTIVE or time.monotonic() > deadline:
            raise RuntimeError(f"the training run did not start: {runs.log_tail(runs.load_run(run_id, root))}")
        time.sleep(1)
    print(f"training {model} in the background (run {run_id}) ...", flush=True)
    started = time.time()
    result = {"model": model, "run_id": run_id}
    try:
        yield result
    finally:
        runs.request_stop(run_id, root)
        steps = [m for m in runs.read_metrics(run_id, root) if m.get("event") == "step" and m.get("time", started) >= started]
        speeds = [m["images_per_s"] for m in steps if "images_per_s" in m]
        epochs = [m for m in runs.read_metrics(run_id, root) if m.get("event") == "epoch"]
        for _ in range(60):
            if runs.load_run(run_id, root).state not in runs.ACTIVE:
                break
            time.sleep(1)
        result.update(images_per_s=statistics.median(speeds) if speeds else 0.0, epochs_finished=len(epochs),
                      state=runs.load_run(run_id, root).state)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def background_study(data: str, env: dict):
    """An Optuna study (`python -m cifarviz tune`, niced as the Tune tab starts it) for the duration of the block;
    then stopped. Yields a dict filled in at the end: trials finished."""
    import optuna

    root = Path(tempfile.mkdtemp(prefix="load-test-study-"))
    url = f"sqlite:///{root / 'optuna.db'}"
    with open(root / "tune.log", "wb") as log:
        process = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "cifarviz", "tune", "--storage", url,
                                    "--study", "load-test", "--trials", "200", "--epochs", "2", "--subset", "2000",
                                    "--data", data], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"tuning in the background (process {process.pid}) ...", flush=True)
    result = {"study": "load-test"}
    try:
        yield result
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(Exception):
            trials = optuna.load_study(study_name="load-test", storage=url).trials
            result["trials_finished"] = sum(t.state.is_finished() for t in trials)
        result["still_running_at_end"] = process.returncode in (-15, 143) or process.returncode is None
        shutil.rmtree(root, ignore_errors=True)


def print_load(report: dict) -> None:
    print(f"\n{report['clients']} viewers for {report['seconds']:.0f} s (think {report['think_seconds']} s), "
          f"processes: {report.get('processes')}, load average before/after {report.get('load_average_before')}/"
          f"{report.get('load_average_after')}, "
          f"data {report['data']}, checkpoint {CHECKPOINT}, warm caches, server options {report['streamlit_options']}")
    print(f"{'time to':20} {'n':>6} {'p50 s':>8} {'p95 s':>8} {'max s':>8}")
    for name, label in (("page", "finished page"), ("inspector", "open inspector"), ("close", "closed inspector")):
        row = report["timings"][name]
        numbers = f" {row['p50']:8.2f} {row['p95']:8.2f} {row['max']:8.2f}" if row["n"] else ""
        print(f"{label:20} {row['n']:6d}{numbers}")
    print("  by page: " + ", ".join(f"{name} p50 {row['p50']:.2f} / p95 {row['p95']:.2f} s"
                                   for name, row in report.get("pages", {}).items()))
    print(f"errors {report['errors']}, time-outs {report['timeouts']}, wrong saliency maps {report['wrong_saliency']} "
          f"of {report['inspectors_checked']} checked "
          f"(largest difference {report['largest_pixel_difference']:.0f} levels)")
    print(f"server: max RSS {report['server_max_rss_mb']:.0f} MB, CPU {report['server_cpu_seconds']:.0f} s "
          f"({report['server_cpu_seconds'] / report['seconds']:.2f} cores on average); "
          f"this client's CPU during the run {report['client_cpu_seconds']:.1f} s")
    for line in report["error_examples"][:5] + report["wrong_saliency_examples"][:5]:
        print("  " + line)


# --------------------------------------------------------------------------- profile: one viewer, where the time goes


# How py-spy names the project's files: relative to the sys.path entry they were found under.
PROJECT_FILES = {"streamlit_app.py", *(f"cifarviz/{p.name}" for p in (REPO / "cifarviz").glob("*.py")),
                 *(name for p in (REPO / "pages").glob("*.py") for name in (p.name, f"pages/{p.name}"))}  # fmt: skip
WRAPPERS = {"gather_metrics.<locals>.wrapped_func"}  # Streamlit's usage-metrics decorator around every st.* call


def frame_parts(frame: str) -> tuple[str, str]:
    """py-spy's `function (file:line)` as (function, file:line)."""
    function, _, place = frame.partition(" (")
    return function, place.rstrip(")")


@contextlib.contextmanager
def py_spy_recording(py_spy: str | None, pid: int, out: Path, rate: int):
    """Sample the server with py-spy while the block runs (only threads holding the GIL: the server's Python
    work is serialised by it, so that is what queues viewers behind each other)."""
    if not py_spy:
        yield
        return
    spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--gil", "--nonblocking", "--rate", str(rate),
                            "--format", "raw", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        spy.wait(timeout=60)


def attribute(raw: Path) -> tuple[dict, int]:
    """Samples per cost centre: the innermost project line on the stack and the library call it made
    (`image_grid (cifarviz/app.py:288) -> ImageMixin.image`); samples outside the project's code are named by
    their innermost frame (e.g. Streamlit's own work after a run, the event loop sending messages)."""
    costs, total = {}, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        ours = [i for i, frame in enumerate(frames) if frame_parts(frame)[1].rsplit(":", 1)[0] in PROJECT_FILES]
        if ours:
            callees = [frame_parts(f)[0] for f in frames[ours[-1] + 1 :] if frame_parts(f)[0] not in WRAPPERS]
            function, place = frame_parts(frames[ours[-1]])
            key = f"{function} ({place}) -> {callees[0] if callees else '(its own code)'}"
        else:
            key = frame_parts(frames[-1])[0] + " (outside the app's code)"
        costs[key] = costs.get(key, 0) + n
    return costs, total


async def profile_actions(server: Server, reruns: int, py_spy: str | None, rate: int) -> dict:
    """One viewer: `reruns` visits of every page (each from another page, as a sidebar click is), then `reruns`
    inspectors opened and closed on Evaluate; server CPU per run, and with py-spy where the GIL time goes."""
    client = StreamlitClient(server.url)
    await client.connect()
    report = {}
    for action in [*PAGES, "inspector"]:
        raw = Path(tempfile.mkstemp(prefix=f"profile-{action}-", suffix=".txt")[1])
        seconds, cpu = [], 0.0
        page = await client.open_page("evaluate" if action == "inspector" else
                                      PAGES["home" if action != "home" else "models"][0])
        with py_spy_recording(py_spy, server.pid, raw, rate):
            for i in range(reruns):
                if action != "inspector":  # from another page: what a sidebar click asks of the server
                    await client.open_page(PAGES["home" if action != "home" else "models"][0])
                before = cpu_seconds(server.pid)
                if action == "inspector":
                    run = await client.click(page.image_buttons[i % len(page.image_buttons)].widget_id)
                else:
                    run = await client.open_page(PAGES[action][0])
                seconds.append(run.seconds)
                cpu += cpu_seconds(server.pid) - before
                if action == "inspector" and run.open_dialog_id:
                    before = cpu_seconds(server.pid)
                    page = await client.click(run.open_dialog_id)  # closing it is an Evaluate rerun, sampled too
                    cpu += cpu_seconds(server.pid) - before
        report[action] = {"runs": reruns, "seconds": percentiles(seconds), "server_cpu_per_run": cpu / reruns}
        if py_spy and raw.stat().st_size:
            costs, total = attribute(raw)
            # samples -> GIL seconds per measured pair of runs: a page and the switch to Home (or Models) before
            # it; an inspector's open and close
            per_run = 1 / rate / reruns
            report[action]["gil_seconds_per_pair"] = total * per_run
            report[action]["top_costs"] = [{"where": k, "share": n / total, "gil_seconds_per_pair": n * per_run}
                                           for k, n in sorted(costs.items(), key=lambda kv: -kv[1])[:15]]  # fmt: skip
    await client.close()
    return report


def print_profile(report: dict) -> None:
    for action, row in report["profile"].items():
        print(f"\n{action}: {row['runs']} runs by one viewer, median {row['seconds']['p50']:.3f} s, "
              f"server CPU {row['server_cpu_per_run']:.3f} s per run (all threads, torch included)")
        if "top_costs" in row:
            note = ("an inspector's open and close" if action == "inspector" else
                    "the page and the switch to Home (Models) before it")
            print(f"  GIL held {row['gil_seconds_per_pair']:.3f} s per pair of runs ({note}); where:")
            for cost in row["top_costs"]:
                print(f"  {cost['share']:6.1%} {cost['gil_seconds_per_pair']:7.3f} s  {cost['where']}")


# --------------------------------------------------------------------------- main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=30, help="simulated viewers (default 30)")
    parser.add_argument("--seconds", type=float, default=300, help="duration of the load (default 300)")
    parser.add_argument("--think", type=float, default=2.0, help="mean pause between a viewer's actions (default 2 s)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds before an action counts as a time-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=default_data())
    parser.add_argument("--streamlit-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server config, e.g. runner.postScriptGC=true, Streamlit's default (repeatable)")
    parser.add_argument("--train", metavar="MODEL", default=None,
                        help="while the viewers load the server, train MODEL (all training images) as a background "
                             "run through the Train page's own machinery (cifarviz.services.runs), and report its images/s")
    parser.add_argument("--processes", type=int, default=0,
                        help="serve through `cifarviz serve`: this many Streamlit processes behind nginx, sticky by "
                             "cookie (default 0: one server, no proxy)")
    parser.add_argument("--study", action="store_true", help="run an Optuna study in the background during the load")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the load: one viewer, Evaluate reruns and inspectors, server CPU per run and "
                             "(with py-spy installed) where the server's time goes")
    parser.add_argument("--reruns", type=int, default=30, help="runs of each action with --profile (default 30)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy executable (default: on PATH)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    env = {**os.environ, "CIFARVIZ_DATA": args.data, "CIFARVIZ_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.setdefault("CIFARVIZ_CACHE", str(Path.home() / ".cache" / "cifarviz"))
    os.environ["CIFARVIZ_CACHE"] = env["CIFARVIZ_CACHE"]  # the serial check reads the same decoded data
    options = tuple(flag for pair in args.streamlit_option for flag in ("--" + pair.partition("=")[0],
                                                                        pair.partition("=")[2]))  # --key value
    print(f"warming caches in {env['CIFARVIZ_CACHE']} ...", flush=True)
    precompute(env)
    log = Path(tempfile.mkstemp(prefix="load-test-server-", suffix=".log")[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip()  # what is measured: recorded at the start
    report = {"commit": commit, "clients": 1 if args.profile else args.clients, "seconds": args.seconds, "think_seconds": args.think,
              "data": args.data, "checkpoint": CHECKPOINT, "cpu_count": os.cpu_count(),
              "streamlit_options": args.streamlit_option, "server_log": str(log)}  # fmt: skip
    report["processes"] = args.processes or "one server, no proxy"
    serving = lecture_hall(env, args.processes, options) if args.processes else streamlit_server(env, log, options)
    with serving as server, contextlib.ExitStack() as background:
        asyncio.run(warm_up(server))
        if args.profile:
            if not args.py_spy:
                print("py-spy not found (pip install py-spy): server CPU per run only")
            report["profile"] = asyncio.run(profile_actions(server, args.reruns, args.py_spy, args.rate))
        else:
            training = background.enter_context(background_training(args.train, args.data)) if args.train else None
            study = background.enter_context(background_study(args.data, env)) if args.study else None
            report["load_average_before"] = os.getloadavg()
            report.update(run_load(server, args))
            report["load_average_after"] = os.getloadavg()
    if not args.profile:
        if args.train:
            report["training"] = training
        if args.study:
            report["study"] = study
    print_profile(report) if args.profile else print_load(report)
    if "study" in report:
        print(f"study during the load: {report['study'].get('trials_finished', '?')} trial(s) finished")
    if "training" in report:
        t = report["training"]
        print(f"training {t['model']} during the load: {t['images_per_s']:.0f} images/s (median of its step reports), "
              f"{t['epochs_finished']} epoch(s) finished, state {t['state']}")
    out = RESULTS / f"{'profile' if args.profile else 'load_test'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with atomic_write(out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
