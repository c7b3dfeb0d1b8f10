"""Progress: a redrawn bar on a terminal, a few log lines elsewhere."""

from __future__ import annotations

import io
import logging

from nova_flavor_sync.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_on_a_terminal_one_line_is_redrawn_with_rate_and_eta():
    screen, clock = Terminal(), Clock()
    progress = Progress("Reading", stream=screen, clock=clock)
    for done in (1000, 2000, 4000):
        clock.now += 1
        progress.update(done, 8000)
    progress.finish()
    frames = screen.getvalue().split("\r")[1:]
    assert len(frames) == 3 and screen.getvalue().endswith("\n")
    assert frames[-1].startswith("[###############...............] Reading: 4,000/8,000 (50%) 1,333/s ETA 0:00:03")


def test_elsewhere_it_logs_every_n_items_and_the_end(caplog):
    clock = Clock()
    progress = Progress("Writing", stream=io.StringIO(), every=1000, clock=clock)
    with caplog.at_level(logging.INFO, logger="nova_flavor_sync.progress"):
        for done in range(250, 2751, 250):
            clock.now += 0.5
            progress.update(done, 2750)
        progress.finish()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "Writing: 1,000/2,750", "Writing: 2,000/2,750", "Writing: 2,750/2,750"
    ]
