"""Look at a run in the real MLflow UI: start `mlflow ui` on 127.0.0.1, load the run's page in
headless Chromium, save a screenshot and check what the rendered page holds.

    python -m devtools.ui_screenshot [--backend-store-uri sqlite:///mlflow.db] [--run RUN_ID]
                                     [--tab model-metrics|overview ...] [--out ui_run.png]

Default run: the one of reports/train_run.json, else the newest. The `model-metrics` tab (the
default) must show the sample grids (`train/samples` while training, `eval/samples` of the
evaluated generator), the loss charts and the FID chart; the
`overview` tab the run's description. Several tabs: one `mlflow ui` serves them all, and each
screenshot is `--out` with `_<tab>` before its suffix. Prints what it found as JSON, a line per
tab; exit 1 if something is missing, 2 if Chromium is not installed (Debian: `apt-get install
chromium`). Everything it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devtools.ports import free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# The React app fetches runs, metrics and images after load: give it virtual time to settle.
VIRTUAL_TIME_BUDGET_MS = 20_000
BROWSER_TIMEOUT_S = 180
SERVER_START_TIMEOUT_S = 120
# What each tab must render: an <img> of the logged grid; the charts, by the card's title
# (the metric key) and its legend (run name and key), and plotly's drawing; the description.
EXPECTED = {
    "model-metrics": {
        "sample grid image": 'src="get-artifact?path=images%2Ftrain~samples',
        # The evaluated generator's grid, logged at one step: its card opens on it.
        "trained samples image": 'src="get-artifact?path=images%2Feval~samples',
        "loss_d chart": 'title="train/loss_d"',
        "loss_d curve legend": "(train/loss_d)</span>",
        "loss_g chart": 'title="train/loss_g"',
        "FID chart": 'title="fid"',
        "FID legend": "(fid)</span>",
        "plotly drawing": 'class="main-svg"',
    },
    "overview": {"description": "Description", "FID in the description": "FID "},
}


@dataclass(frozen=True)
class Page:
    """A run's page in the UI."""

    experiment_id: str
    run_id: str
    tab: str

    def url(self, base: str) -> str:
        """The page's address (runs show in the UI's "Model training" mode)."""
        tab = "" if self.tab == "overview" else f"/{self.tab}"
        return (f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}{tab}"
                "?workflowType=machine_learning")


def find_chromium() -> str | None:
    """The Chromium executable on PATH, or None."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextmanager
def mlflow_ui(backend_store_uri: str) -> Iterator[str]:
    """`mlflow ui` on a free port of 127.0.0.1 for the duration; yields its base URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           # The UI needs no background job runner (it would start a dozen processes).
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend_store_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Its own process group: the server's workers are stopped with it.
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{base}/health", SERVER_START_TIMEOUT_S)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _chromium(chromium: str, url: str, width: int, height: int, *action: str) -> str:
    """Run headless Chromium on `url` with `action` flags; its stdout."""
    with tempfile.TemporaryDirectory(prefix="ui_screenshot_profile_") as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", f"--user-data-dir={profile}",
                   f"--window-size={width},{height}",
                   f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
                   "--run-all-compositor-stages-before-draw", *action, url]
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=BROWSER_TIMEOUT_S, start_new_session=True)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def capture(chromium: str, page: Page, base: str, out: Path, width: int, height: int
            ) -> dict[str, bool]:
    """Save the page's screenshot to `out`; return which of the tab's EXPECTED items the
    rendered page holds."""
    url = page.url(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One browser for both: headless Chromium runs every command given (a start is ~12 s of
    # CPU here), and the DOM it prints is the page the screenshot shows.
    dom = _chromium(chromium, url, width, height, f"--screenshot={out.resolve()}", "--dump-dom")
    return {label: needle in dom for label, needle in EXPECTED[page.tab].items()}


def default_run(backend_store_uri: str, record: Path) -> tuple[str, str]:
    """(experiment id, run id): the run of `record` (reports/train_run.json), else the newest."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=backend_store_uri)
    if record.exists():
        run_id = json.loads(record.read_text())["mlflow_run_id"]
        return client.get_run(run_id).info.experiment_id, run_id
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise SystemExit(f"no runs in {backend_store_uri}")
    return runs[0].info.experiment_id, runs[0].info.run_id


def main(argv: list[str] | None = None) -> int:
    """Screenshot one run's page; exit status 0 (all found), 1 (missing), 2 (no Chromium)."""
    # The docstring's first paragraph: its first line alone stops mid-sentence.
    cli = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    cli.add_argument("--backend-store-uri", default="sqlite:///mlflow.db")
    cli.add_argument("--run", default="", help="run id (default: reports/train_run.json's)")
    cli.add_argument("--tab", nargs="+", choices=sorted(EXPECTED), default=["model-metrics"])
    cli.add_argument("--out", type=Path, default=Path("ui_run.png"))
    cli.add_argument("--width", type=int, default=1800)
    cli.add_argument("--height", type=int, default=4000)  # tall enough for the fid chart, last
    args = cli.parse_args(argv)
    chromium = find_chromium()
    if chromium is None:
        print("no chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.run:
        from mlflow import MlflowClient

        run = MlflowClient(tracking_uri=args.backend_store_uri).get_run(args.run)
        experiment_id, run_id = run.info.experiment_id, args.run
    else:
        experiment_id, run_id = default_run(args.backend_store_uri,
                                            Path("reports/train_run.json"))
    complete = True
    with mlflow_ui(args.backend_store_uri) as base:
        for tab in args.tab:
            page = Page(experiment_id, run_id, tab)
            out = args.out if len(args.tab) == 1 else args.out.with_name(
                f"{args.out.stem}_{tab}{args.out.suffix}")
            found = capture(chromium, page, base, out, args.width, args.height)
            complete &= all(found.values())
            print(json.dumps({"url": page.url(base), "screenshot": str(out), "found": found}),
                  flush=True)
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
