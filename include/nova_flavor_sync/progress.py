"""Progress of long work: a bar with rate and ETA on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger(__name__)


class Progress:
    """Call ``update(done, total)`` as work advances; ``finish()`` at the end.

    On a terminal it redraws one line on ``stream`` at most ``redraw_s`` apart; otherwise
    it logs a line each time another ``every`` items are done, so Airflow task logs and
    log files get a few readable lines rather than a stream of carriage returns.
    """

    def __init__(
        self, what: str, *, stream: TextIO | None = None, every: int = 10_000, redraw_s: float = 0.2,
        clock=time.monotonic,
    ) -> None:
        self.what, self.every, self.redraw_s, self.clock = what, every, redraw_s, clock
        self.stream = stream
        self.tty = bool(stream is not None and stream.isatty())
        self.started = clock()
        self._last_draw = -redraw_s
        self._last_logged = 0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if self.tty:
            if now - self._last_draw >= self.redraw_s or done >= total:
                self._last_draw = now
                self._drawn = True
                self.stream.write("\r" + self.line(done, total, now, bar=True))  # type: ignore[union-attr]
                self.stream.flush()  # type: ignore[union-attr]
        elif done - self._last_logged >= self.every or (done >= total and done > self._last_logged):
            self._last_logged = done
            log.info("%s", self.line(done, total, now, bar=False))

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")  # type: ignore[union-attr]
            self.stream.flush()  # type: ignore[union-attr]

    def line(self, done: int, total: int, now: float, *, bar: bool) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        share = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 and total > done else 0.0
        text = f"{self.what}: {done:,}/{total:,} ({share:.0%}) {rate:,.0f}/s ETA {_clock(eta)}"
        if bar:
            filled = int(share * 30)
            text = f"[{'#' * filled}{'.' * (30 - filled)}] {text}"
        return text


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def terminal_progress(what: str, *, enabled: bool = True) -> Progress | None:
    """A Progress drawing on stderr when it is a terminal, logging otherwise (None if not enabled)."""
    return Progress(what, stream=sys.stderr) if enabled else None
