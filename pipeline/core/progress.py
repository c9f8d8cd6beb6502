"""Progress bars that suit where the output goes: a live bar on a terminal; outside one
(`dvc repro > log`, `dvc queue logs`, `ray job logs`, CI) a plain line every
`PROGRESS_SECONDS_OFF_TERMINAL`, instead of a carriage-return frame per update."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

PROGRESS_SECONDS_OFF_TERMINAL = 15.0


class _Lines:
    """A stream for tqdm that turns each redrawn frame into one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        frame = text.strip("\r\n")
        if frame.strip():
            self.stream.write(frame + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """A bar whose postfix updates wait for its next line (tqdm's would redraw at once)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh, **kwargs)


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)` on stderr: live on a terminal, else a line every
    PROGRESS_SECONDS_OFF_TERMINAL seconds (and one at the end)."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    return _LogBar(iterable, file=_Lines(stream), mininterval=PROGRESS_SECONDS_OFF_TERMINAL,
                   ascii=True, ncols=100, **kwargs)
