"""Progress of long work, the same way in every stage.

:func:`progress_bar` is the one progress mechanism of the package. On a terminal it is a
``tqdm`` bar. Without one (a log file, a CI job, ``nohup``), it writes a line at most every
:data:`LOG_INTERVAL_S` seconds and one when the work ends, so that a log shows a long stage
advancing instead of minutes of silence. ``progress=False`` (``--no-progress``) silences both.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

logger = logging.getLogger("fusellm.progress")

#: Seconds between two progress lines when there is no terminal.
LOG_INTERVAL_S = 30.0


class _Silent:
    """``progress=False``: the bar's methods, doing nothing."""

    def update(self, n: int = 1) -> None:
        del n

    def set_postfix(self, **values: Any) -> None:
        del values

    def close(self) -> None:
        pass


class _LogLines:
    """A progress line every ``interval`` seconds and a last one at the end."""

    def __init__(self, total: int, desc: str, unit: str, interval: float) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit(now, final=False)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit(time.monotonic(), final=True)

    def _emit(self, now: float, *, final: bool) -> None:
        seconds = max(now - self.t0, 1e-9)
        rate = self.n / seconds
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        line = (
            f"{self.desc}: {done} {self.unit}s{share} in {seconds:.0f} s, {rate:.3g} {self.unit}/s"
        )
        if not final and self.total and rate > 0:
            line += f", about {(self.total - self.n) / rate:.0f} s left"
        if self.postfix:
            line += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        if logging.getLogger("fusellm").hasHandlers():
            logger.info("%s", line)
        else:  # a stage command without the pipeline's log: its standard error is the log
            print(line, file=sys.stderr, flush=True)


def progress_bar(
    progress: bool | None, total: int, desc: str, unit: str, *, leave: bool = True
) -> Any:
    """A progress indicator with ``update(n)``, ``set_postfix(**values)`` and ``close()``.

    Args:
        progress: ``True``: a bar; ``False``: nothing; ``None``: a bar on a terminal, else a log
            line every :data:`LOG_INTERVAL_S` seconds.
        total: the amount of work (0 when unknown).
        desc: what is being done (the bar's label).
        unit: the unit of ``total`` (singular).
        leave: keep the finished bar on the terminal.
    """
    if progress is False:
        return _Silent()
    if progress is None and not sys.stderr.isatty():
        return _LogLines(total, desc, unit, LOG_INTERVAL_S)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return _LogLines(total, desc, unit, LOG_INTERVAL_S)
    return tqdm(total=total or None, desc=desc, unit=unit, leave=leave)
