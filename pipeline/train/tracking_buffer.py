"""Rank 0's tracking, off the training's critical path: a bounded buffer that a background
thread sends to MLflow, retrying with backoff while the server does not answer.

Steps never wait for the server: `metrics` and `image` only queue. When the queue is full, new
items go to the spill folder (`<run storage>/unlogged/`) instead; at the end `close` gives the
sender a bounded time to drain, spills the rest, and says what was not logged.
`python -m pipeline sync-run <run>` uploads a spill folder later (`sync`), deleting each file
once it is logged, so a second sync logs nothing twice.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import tracking

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # one line per spilled batch of rows
IMAGES_FILE = "images.jsonl"  # one line per spilled image: its file, key and step
DRIVER_FILE = "driver.json"  # what the driver could not do at the end (outputs, status)
MAX_QUEUED = 512  # batches of rows and images: a few MB of grids at most
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Unlogged:
    """What did not reach the server: counts, and where it waits (None: nothing)."""

    metric_rows: int
    images: int
    spill_dir: str | None

    def words(self) -> str:
        return f"{self.metric_rows} metric row(s) and {self.images} grid image(s)"

    def to_dict(self) -> dict[str, Any]:
        return {"metric_rows": self.metric_rows, "images": self.images,
                "spill_dir": self.spill_dir}


@dataclass(frozen=True)
class _Item:
    rows: list[dict[str, float]] | None = None
    image: Any = None  # a PIL image
    key: str = ""
    step: int = 0


class TrackingBuffer:
    """Queue metric rows and images for one MLflow run; a daemon thread sends them."""

    def __init__(self, tracking_uri: str, run_id: str, spill_dir: Path,
                 max_queued: int = MAX_QUEUED) -> None:
        self.tracking_uri, self.run_id, self.spill_dir = tracking_uri, run_id, Path(spill_dir)
        self.max_queued = max_queued
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._closing = self._draining = False
        self._spilled_rows = self._spilled_images = 0
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-buffer", daemon=True)
        self._thread.start()

    # --- the training's side: never blocks on the server ---------------------------------------

    def metrics(self, rows: Sequence[Mapping[str, float]]) -> None:
        """Queue MLflow rows ({"step": ..., key: value}) for logging."""
        if rows:
            self._put(_Item(rows=[dict(row) for row in rows]))

    def image(self, image: Any, key: str, step: int) -> None:
        """Queue a PIL image to log under `key` at `step`."""
        self._put(_Item(image=image, key=key, step=step))

    def _put(self, item: _Item) -> None:
        with self._cond:
            if len(self._queue) < self.max_queued:
                self._queue.append(item)
                self._cond.notify()
                return
        self._spill(item)  # full: the file keeps it, in the training's thread (rare, small)

    # --- the sender ------------------------------------------------------------------------------

    def _send(self, item: _Item) -> None:
        if item.rows is not None:
            tracking.log_metric_rows(self.tracking_uri, self.run_id, item.rows)
        else:
            tracking.log_image(self.tracking_uri, self.run_id, item.image, item.key, item.step)

    def _send_loop(self) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, all sent
                item = self._queue[0]
            try:
                self._send(item)
            except Exception as err:  # any failure to log: keep it, retry
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    logger.warning("MLflow tracking server not answering (%s): training goes on, "
                                   "metrics and grids wait in a buffer", _first_line(err))
                with self._cond:
                    if self._closing:
                        return  # close() spills what is left
                    # Draining at the end: retry every second until close() gives up.
                    self._cond.wait(min(backoff, 1.0) if self._draining else backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if self._failing_since is not None:
                logger.info("MLflow tracking server answers again after %.0f s: sending the "
                            "buffer", time.monotonic() - self._failing_since)
                self._failing_since = None
            backoff = FIRST_BACKOFF_S
            with self._cond:
                if self._queue and self._queue[0] is item:
                    self._queue.popleft()

    def close(self, timeout_s: float) -> Unlogged:
        """Give the sender up to `timeout_s` to drain, then spill what is left."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._draining = True
            self._cond.notify_all()  # a sender waiting out a backoff retries now
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(0.1)
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1.0)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for item in left:
            self._spill(item)
        spilled = self._spilled_rows or self._spilled_images
        return Unlogged(self._spilled_rows, self._spilled_images,
                        str(self.spill_dir) if spilled else None)

    def _spill(self, item: _Item) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        if item.rows is not None:
            with (self.spill_dir / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps({"rows": item.rows}) + "\n")
            self._spilled_rows += len(item.rows)
            return
        name = f"{item.key.replace('/', '#')}_{item.step:012d}.png"
        item.image.save(self.spill_dir / name)
        with (self.spill_dir / IMAGES_FILE).open("a") as handle:
            handle.write(json.dumps({"file": name, "key": item.key, "step": item.step}) + "\n")
        self._spilled_images += 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# --- later: the spill folder to the server --------------------------------------------------------


def sync(spill_dir: Path, tracking_uri: str, run_id: str,
         upload_outputs: Callable[[], None] | None = None) -> Unlogged:
    """Log what `spill_dir` holds to run `run_id`; then what the driver could not do (the
    outputs, via `upload_outputs`; the final status and description). Returns what was sent.
    Each file is deleted once logged, so an interrupted sync resumes without duplicates."""
    from PIL import Image

    spill_dir = Path(spill_dir)
    rows = images = 0
    metrics = spill_dir / METRICS_FILE
    if metrics.exists():
        batch = [row for line in metrics.read_text().splitlines() if line.strip()
                 for row in json.loads(line)["rows"]]
        tracking.log_metric_rows(tracking_uri, run_id, batch)
        metrics.unlink()
        rows = len(batch)
    index = spill_dir / IMAGES_FILE
    if index.exists():
        entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
        for entry in entries:
            picture = spill_dir / entry["file"]
            if picture.exists():
                with Image.open(picture) as image:
                    tracking.log_image(tracking_uri, run_id, image.copy(), entry["key"],
                                       int(entry["step"]))
                picture.unlink()
                images += 1
        index.unlink()
    driver = spill_dir / DRIVER_FILE
    if driver.exists():
        todo = json.loads(driver.read_text())
        if todo.get("outputs") and upload_outputs is not None:
            upload_outputs()
        if todo.get("description"):
            tracking.set_description(tracking_uri, run_id, todo["description"])
        if todo.get("status"):
            tracking.end_run(tracking_uri, run_id, todo["status"])
        driver.unlink()
    return Unlogged(rows, images, str(spill_dir))


def record_driver_todo(spill_dir: Path, todo: Mapping[str, Any]) -> None:
    """Note what the driver could not do at the end, for `sync`."""
    spill_dir = Path(spill_dir)
    spill_dir.mkdir(parents=True, exist_ok=True)
    (spill_dir / DRIVER_FILE).write_text(json.dumps(dict(todo)) + "\n")


def pending(spill_dir: Path) -> Unlogged:
    """What `spill_dir` holds that the server has not taken yet (zeros: nothing)."""
    spill_dir = Path(spill_dir)

    def lines(name: str) -> list[dict[str, Any]]:
        path = spill_dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    rows = sum(len(entry["rows"]) for entry in lines(METRICS_FILE))
    images = len(lines(IMAGES_FILE))
    waiting = rows or images or (spill_dir / DRIVER_FILE).exists()
    return Unlogged(rows, images, str(spill_dir) if waiting else None)
