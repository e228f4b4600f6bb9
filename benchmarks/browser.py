"""The studio as a user feels it: click → pixels in a real browser (Playwright + Chromium).

Starts ``streamlit run app/main.py`` on a free 127.0.0.1 port with its own data home and times,
from the user's action until the new pictures are loaded and the app has settled (no script
running, no stale element):

- first thumbnails on a fresh server with an empty data home, then after a warm restart;
- open an image → all its maps drawn; next / previous; a threshold move on Evaluate;
- the first switch to another built-in category; Review's first gallery.

One-off steps (fresh, category switch, Review) run once per server; the warm restart runs
``--restarts`` times (a new server on the same data home each time: a single restart varies by
±0.5 s on this machine); repeated interactions are timed ``--repeats`` times (in the last
server); all are reported by their median.

    python -m benchmarks.browser [--quick] [--home DIR] [--repeats N] [--restarts N] [--beside-job]

``--beside-job`` measures the same with a training job running, started as the Train page
starts one (``rd.jobs``: its own process at the jobs' CPU priority, ``$RD_JOBS_PRIORITY``,
paused while the studio is used, ``$RD_JOBS_YIELD_S``; 0 measures a job that never pauses):
300 epochs of Lite0 on built-in wood, cancelled at the end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1400}
START_TIMEOUT_S = 180
DETAIL_CAPTIONS = ("overlay", "layer 1 · stride 4", "layer 2 · stride 8", "layer 3 · stride 16",
                   "fused heat map")
TARGETS_S = {"first thumbnails (fresh home)": 8.0, "first thumbnails (warm restart)": 3.0,
             "open image → maps settled": 1.0, "next image": 1.0, "previous image": 1.0,
             "threshold move": 0.5, "first switch to another category": 5.0,
             "Review: first gallery": 5.0}
SETTLED = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  return app !== null && app.getAttribute('data-test-script-state') === 'notRunning'
    && document.querySelector('[data-stale="true"]') === null;
}"""
# The shared threshold as Evaluate prints it ("At threshold 0.9472 (shared with ...)")
THRESHOLD_SHOWN = """() => {
  const line = [...document.querySelectorAll('p')]
    .find(p => p.innerText.includes('shared with Inspect and Review'));
  return line ? line.innerText.split(' ')[2] : null;
}"""
# The histogram's threshold line is labelled with that value
HISTOGRAM_SHOWS = """(value) => [...document.querySelectorAll('.js-plotly-plot .annotation-text')]
  .some(label => label.textContent.includes(value))"""
# Resolves after the next frame has been painted
PAINTED = """() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"""
IMAGES_LOADED = """(caption) => {
  const images = [...document.querySelectorAll('[data-testid="stImage"]')]
    .filter(block => block.innerText.includes(caption))
    .flatMap(block => [...block.querySelectorAll('img')]);
  return images.length > 0 && images.every(img => img.complete && img.naturalWidth > 0);
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(home: Path, log: Path) -> Iterator[str]:
    """``streamlit run app/main.py`` on localhost with RD_HOME=home; yields its URL once
    healthy, stops it (and only it) afterwards."""
    port = free_port()
    env = {**os.environ, "RD_HOME": str(home)}
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless",
             "true", "--server.address", "127.0.0.1", "--server.port", str(port),
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit did not start:\n{log.read_text()}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def training_job(folder: Path, home: Path) -> Iterator[None]:
    """A long training job beside the app, from its first logged epoch until cancelled.

    Its process has the studio's data home, as when the Train page starts it (so it pauses
    while the studio is used, rd.foreground; ``RD_JOBS_YIELD_S=0`` measures it without), but
    trains on data of its own, so that the studio's home stays empty for the fresh start; the
    job writes nothing there before it would finish (300 epochs: it is cancelled first)."""
    from rd import jobs
    from rd.data import ensure_builtin_dataset
    from rd.training import TrainConfig

    root = folder / "jobs"
    data = ensure_builtin_dataset(folder / "job-data" / "builtin")
    previous = os.environ.get("RD_HOME")
    os.environ["RD_HOME"] = str(home)  # inherited by the job's process
    try:
        job = jobs.submit(TrainConfig(epochs=300), data, "wood", name="beside the app",
                          root=root)
    finally:
        if previous is None:
            os.environ.pop("RD_HOME")
        else:
            os.environ["RD_HOME"] = previous
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not jobs.get(job.id, root).metrics():
            if jobs.get(job.id, root).state != "running" or time.monotonic() > deadline:
                raise RuntimeError(f"the training job did not start:\n{job.log_tail()}")
            time.sleep(1)
        print(f"training job {job.id} running (log: {job.log})", flush=True)
        yield
    finally:
        jobs.cancel(job.id, root)
        while jobs.get(job.id, root).state == "running":
            jobs.schedule(root)
            time.sleep(0.5)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
            return reply.read().strip() == b"ok"
    except OSError:
        return False


def launch(playwright: Any) -> Any:
    """Debian's Chromium (the download of ``playwright install`` does not work offline)."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def settle(page: Any, timeout_s: float = 180) -> None:
    """Wait until the app runs no script and shows no stale element."""
    page.wait_for_timeout(50)  # let a click reach the server before asking
    page.wait_for_function(SETTLED, timeout=timeout_s * 1000)


def go_to(page: Any, name: str) -> None:
    """Open a page through the sidebar's navigation and wait for its title."""
    page.locator('[data-testid="stSidebarNavLink"]', has_text=name).click()
    page.get_by_role("heading", name=name, exact=True).wait_for()


def _images_loaded(page: Any, caption: str = "", timeout_s: float = 180) -> None:
    """Wait until every picture whose caption contains ``caption`` has loaded."""
    page.wait_for_function(IMAGES_LOADED, arg=caption, timeout=timeout_s * 1000)


def wait_for_detail(page: Any, title: str) -> None:
    """The detail of ``title`` is on screen: its heading, and every map loaded."""
    page.get_by_role("heading", name=title, exact=True).wait_for()
    for caption in DETAIL_CAPTIONS:
        _images_loaded(page, caption)
    settle(page)


def first_thumbnails(page: Any, url: str) -> float:
    """Navigate to the app; seconds until the first thumbnails of the grid are loaded."""
    start = time.perf_counter()
    page.goto(url)
    page.get_by_role("button", name="Open image", exact=True).first.wait_for(
        timeout=START_TIMEOUT_S * 1000)
    _images_loaded(page)
    return time.perf_counter() - start


def timed(action: Callable[[], None], wait: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    wait()
    return time.perf_counter() - start


def _titles(page: Any) -> list[str]:
    """The grid's images in order, as the detail heading names them (defect/file)."""
    captions = page.locator('[data-testid="stImage"]', has=page.locator("img")).all_inner_texts()
    return [c.split(" · ")[0].strip() for c in captions if "/" in c]


def inspect_steps(page: Any, repeats: int) -> dict[str, list[float]]:
    """Open image, next and previous, each ``repeats`` times."""
    times: dict[str, list[float]] = {"open image → maps settled": [], "next image": [],
                                     "previous image": []}
    settle(page)  # the whole grid is drawn: its captions give the order next/previous follow
    titles = _titles(page)
    buttons = page.get_by_role("button", name="Open image", exact=True)
    for index in range(repeats):
        target = (2 * index + 1) % len(titles)
        times["open image → maps settled"].append(timed(
            lambda target=target: buttons.nth(target).click(),
            lambda target=target: wait_for_detail(page, titles[target])))
        following = (target + 1) % len(titles)
        times["next image"].append(timed(
            lambda: page.get_by_role("button", name="Next").click(),
            lambda following=following: wait_for_detail(page, titles[following])))
        times["previous image"].append(timed(
            lambda: page.get_by_role("button", name="Previous").click(),
            lambda target=target: wait_for_detail(page, titles[target])))
    return times


def threshold_moves(page: Any, repeats: int) -> list[float]:
    """Evaluate: move the threshold slider one step with the keyboard until the page settles
    with the new value drawn: the threshold line's label in the histogram shows the new value
    and the browser has painted.

    Waiting for the new value itself matters: an earlier version waited for *a* paragraph
    starting "At threshold" to differ from the first one, which a second such paragraph
    satisfied at once, so a move whose rerun had not started 50 ms after the key press
    counted as settled at ≈0.1 s (docs/performance.md, round 6)."""
    go_to(page, "Evaluate")
    page.locator(".js-plotly-plot").first.wait_for(timeout=START_TIMEOUT_S * 1000)
    settle(page)
    thumb = page.get_by_role("slider").first
    times = []
    for index in range(repeats):
        before = page.evaluate(THRESHOLD_SHOWN)
        key = "ArrowRight" if index % 2 == 0 else "ArrowLeft"

        def wait(before: str = before) -> None:
            page.wait_for_function(f"old => ({THRESHOLD_SHOWN})() !== old", arg=before)
            settle(page)
            page.wait_for_function(HISTOGRAM_SHOWS, arg=page.evaluate(THRESHOLD_SHOWN))
            page.evaluate(PAINTED)

        times.append(timed(lambda key=key: thumb.press(key), wait))
    return times


def switch_category(page: Any, category: str) -> float:
    """Inspect: pick another category in the sidebar; seconds to its first thumbnails."""
    go_to(page, "Inspect")
    settle(page)
    box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]',
                       has_text="Category")
    box.click()
    start = time.perf_counter()
    page.get_by_role("option", name=category, exact=True).click()
    page.locator('[data-testid="stImage"]', has_text="good/").first.wait_for(
        timeout=START_TIMEOUT_S * 1000)
    page.get_by_text(f"/ {category} ·").first.wait_for(timeout=START_TIMEOUT_S * 1000)
    _images_loaded(page)
    settle(page)
    return time.perf_counter() - start


def review_gallery(page: Any) -> float:
    """Seconds from the Review link to the first gallery's pictures."""
    start = time.perf_counter()
    go_to(page, "Review")
    page.locator('[data-testid="stImage"]').first.wait_for(timeout=START_TIMEOUT_S * 1000)
    _images_loaded(page)
    return time.perf_counter() - start


def run(home: Path, logs: Path, repeats: int, category: str, restarts: int = 1
        ) -> dict[str, list[float]]:
    """One fresh server on ``home`` (empty or not), then ``restarts`` warm restarts on the same
    home; the interactions are timed in the last one."""
    from playwright.sync_api import sync_playwright

    times: dict[str, list[float]] = {}
    phases = ["fresh home", *["warm restart"] * restarts]
    with sync_playwright() as playwright:
        browser = launch(playwright)
        for index, phase in enumerate(phases):
            with serve(home, logs / f"streamlit-{phase.split()[0]}.log") as url:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(START_TIMEOUT_S * 1000)
                times.setdefault(f"first thumbnails ({phase})", []).append(
                    first_thumbnails(page, url))
                if index == len(phases) - 1:
                    for name, values in inspect_steps(page, repeats).items():
                        times[name] = values
                    times["threshold move"] = threshold_moves(page, repeats)
                    times["first switch to another category"] = [switch_category(page,
                                                                                 category)]
                    times["Review: first gallery"] = [review_gallery(page)]
                page.close()
        browser.close()
    return times


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import base_parser, print_table, write_json

    parser = base_parser(__doc__.splitlines()[0], "runs/benchmarks/browser.json")
    parser.add_argument("--repeats", type=int, default=5,
                        help="times each repeated interaction is measured (default 5)")
    parser.add_argument("--restarts", type=int, default=5,
                        help="warm restarts timed, each a new server (default 5)")
    parser.add_argument("--category", default="wood",
                        help="the built-in category switched to (default wood)")
    parser.add_argument("--beside-job", action="store_true",
                        help="with a training job running, started as the Train page does")
    parser.add_argument("--home", type=Path,
                        help="data home (default: a new empty one, removed afterwards)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} is missing: install Debian's chromium")
    repeats = 1 if args.quick else args.repeats
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rd-browser-") as folder:
        home = args.home or Path(folder) / "home"
        with (training_job(Path(folder), home) if args.beside_job
              else contextlib.nullcontext()):
            times = run(home, Path(folder), repeats, args.category,
                        1 if args.quick else args.restarts)
    load_after = os.getloadavg()
    rows = [[name, statistics.median(values), min(values), max(values), len(values),
             TARGETS_S.get(name)] for name, values in times.items()]
    print_table("Studio in Chromium: click → pixels settled, seconds",
                ["interaction", "median", "min", "max", "n", "target"], rows)
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    write_json(args.json, {"times_s": times, "targets_s": TARGETS_S, "repeats": repeats,
                           "category": args.category, "beside_job": args.beside_job,
                           "jobs_yield_s": os.environ.get("RD_JOBS_YIELD_S"),
                           "restarts": 1 if args.quick else args.restarts,
                           "load_before": load_before,
                           "load_after": load_after,
                           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
