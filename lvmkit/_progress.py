"""Progress reports that suit where the output goes.

In a terminal or a notebook, :func:`progress_bar` returns a tqdm bar. Elsewhere (CI logs,
``nohup``, output redirected to a file) a redrawn bar floods the log with carriage
returns, so it returns a :class:`LineProgress` with the same ``update`` / ``set_postfix``
/ ``close`` interface, which writes one plain line every ``every`` of the total (5% by
default) and one at the end.

The environment variable ``LVMKIT_PROGRESS`` overrides the choice: ``bar`` or ``lines``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["LineProgress", "progress_bar", "track"]

T = TypeVar("T")
_MODES = ("auto", "bar", "lines")


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where tqdm draws a widget or HTML bar)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class LineProgress:
    """A progress report of plain lines, one per ``every`` of ``total`` and one at the end.

    Each line reads ``desc: n/total (p%) key=value ... [elapsed, rate it/s, ETA]``.

    :param total: number of steps of the whole task (steps done before count as well).
    :param initial: steps already done (a resumed run).
    :param desc: what is running, at the start of each line.
    :param stream: where lines go (default: ``sys.stderr`` at the time of each write).
    :param every: fraction of ``total`` between lines, in (0, 1].
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "",
        *,
        stream: IO[str] | None = None,
        every: float = 0.05,
    ) -> None:
        if not (isinstance(total, int) and isinstance(initial, int) and 0 <= initial
                and total >= 0):
            raise ValueError(
                f"need integers total >= 0 and initial >= 0, got {total!r}, {initial!r}"
            )
        if not 0 < every <= 1:
            raise ValueError(f"every must be in (0, 1], got {every!r}")
        self.total, self.n, self.desc = total, initial, desc
        self.every = every
        self._stream = stream
        self._start_n = initial
        self._start = time.perf_counter()
        self._postfix: dict[str, Any] = {}
        self._last_bucket = self._bucket(initial)
        self._closed = False
        self._written_n = -1
        self._due = False
        self.lines_written = 0

    def _bucket(self, n: int) -> int:
        if self.total == 0:
            return 0
        return math.floor(min(n, self.total) / self.total / self.every + 1e-9)

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps; a line is due when that crosses a multiple of ``every``.

        The due line is written by the next :meth:`set_postfix` (so that it shows this
        step's values, as in ``update(1); set_postfix(loss=...)``), the next ``update`` or
        :meth:`close`.
        """
        self._flush()
        self.n += n
        bucket = self._bucket(self.n)
        if bucket > self._last_bucket:
            self._last_bucket = bucket
            self._due = True

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Values shown at the end of the lines, e.g. ``loss=...`` (``refresh`` is accepted
        for tqdm's signature)."""
        self._postfix = dict(values)
        self._flush()

    def close(self) -> None:
        """Write the last line (unless one was written at this step); later calls do
        nothing."""
        if self._closed:
            return
        self._closed = True
        if self._due or self.n != self._written_n:
            self._write()

    def _flush(self) -> None:
        if self._due:
            self._write()

    def _write(self) -> None:
        elapsed = time.perf_counter() - self._start
        done = self.n - self._start_n
        parts = [f"{self.desc}: " if self.desc else "", f"{self.n}/{self.total}"]
        if self.total:
            parts.append(f" ({100 * self.n / self.total:.0f}%)")
        parts += [f" {key}={value}" for key, value in self._postfix.items()]
        timing = [_duration(elapsed)]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            timing.append(f"{rate:.3g} it/s")
            if self.total > self.n:
                timing.append(f"ETA {_duration((self.total - self.n) / rate)}")
        parts.append(f" [{', '.join(timing)}]")
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write("".join(parts) + "\n")
        stream.flush()
        self.lines_written += 1
        self._written_n = self.n
        self._due = False


def progress_bar(
    total: int,
    initial: int = 0,
    desc: str = "",
    *,
    mode: str | None = None,
    stream: IO[str] | None = None,
    every: float = 0.05,
) -> Any:
    """A progress report for a task of ``total`` steps: a tqdm bar in a terminal or a
    notebook, else a :class:`LineProgress`.

    Both have ``update(n=1)``, ``set_postfix(refresh=..., **values)`` and ``close()``.

    :param total: steps of the whole task.
    :param initial: steps already done.
    :param desc: a label for the task.
    :param mode: ``"auto"`` (the default, from where ``stream`` goes), ``"bar"`` or
        ``"lines"``; ``None`` reads ``LVMKIT_PROGRESS`` (``auto`` if unset).
    :param stream: where to report (default: ``sys.stderr``).
    :param every: fraction of ``total`` between lines of a :class:`LineProgress`.
    """
    if mode is None:
        mode = os.environ.get("LVMKIT_PROGRESS", "").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(
            f"progress mode must be one of {', '.join(_MODES)} (from the argument or "
            f"LVMKIT_PROGRESS), got {mode!r}"
        )
    target = stream if stream is not None else sys.stderr
    if mode == "auto":
        mode = "bar" if _in_notebook() or _is_terminal(target) else "lines"
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=stream)
    return LineProgress(total, initial, desc, stream=stream, every=every)


def track(
    iterable: Iterable[T], desc: str = "", total: int | None = None, **kwargs: Any
) -> Iterator[T]:
    """Yield from ``iterable`` with a :func:`progress_bar` (``total`` defaults to its
    ``len``); other keywords go to :func:`progress_bar`."""
    if total is None:
        total = len(iterable)  # type: ignore[arg-type]
    bar = progress_bar(total, desc=desc, **kwargs)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
