"""Progress of a long command on stderr: a bar redrawn in place on a terminal, plain lines elsewhere.

    with Progress("dump", total=len(db), unit="keys", stream=sys.stderr) as p:
        for item in items:
            ...
            p.advance()

On a terminal (``stream.isatty()``) one line is redrawn with ``\\r`` at most ten times a second:
a bar and a percentage when the total is known, the count, the rate; the last drawing ends with a
newline.  Elsewhere nothing is written unless ``lines=True`` (the commands' ``--progress``): then
one plain line every two seconds and one at the end.  Writing never raises into the work: a
closed or full stream silences the reporter.
"""
import time

#: Seconds between two drawings of the bar on a terminal, and between two plain lines.
TTY_INTERVAL, LINE_INTERVAL = 0.1, 2.0
BAR_WIDTH = 30


class Progress:
    """Counts done units of a job and shows it on ``stream`` (see the module's docstring)."""

    def __init__(self, label: str, total=None, unit: str = "keys", stream=None, lines: bool = False):
        import sys
        self.label, self.total, self.unit = label, total, unit
        self.stream = sys.stderr if stream is None else stream
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError, OSError):
            self.tty = False
        self.enabled = self.tty or lines
        self.done = 0
        self.started = self.last = time.monotonic()
        self.drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        return False

    def advance(self, n: int = 1) -> None:
        """Count n more units; draw when it is time."""
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self.last >= (TTY_INTERVAL if self.tty else LINE_INTERVAL):
                self.last = now
                self._draw(now, final=False)

    def update(self, done: int, total: int) -> None:
        """Set the count and the total (a callback of the form ``progress(done, total)``, as
        compact() and backup() call it; a job of several phases starts each from 0)."""
        self.total = total
        self.advance(done - self.done)

    def finish(self) -> None:
        """Draw the final state (on a terminal, or when lines were asked for and one was drawn or
        the job took longer than one interval)."""
        if self.enabled and (self.tty or self.drawn or time.monotonic() - self.started >= LINE_INTERVAL):
            self._draw(time.monotonic(), final=True)
        self.enabled = False

    def text(self, now: float) -> str:
        """The progress line (without its end)."""
        seconds = max(now - self.started, 1e-9)
        rate = f"{self.done / seconds:,.0f} {self.unit}/s"
        if self.total:
            frac = min(1.0, self.done / self.total)
            filled = int(frac * BAR_WIDTH)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            return (f"{self.label}: [{bar}] {100 * frac:5.1f}% {self.done:,}/{self.total:,} {self.unit}, "
                    f"{rate}, {seconds:.1f}s")
        return f"{self.label}: {self.done:,} {self.unit}, {rate}, {seconds:.1f}s"

    def _draw(self, now: float, final: bool) -> None:
        end = ("\n" if final else "") if self.tty else "\n"
        start = "\r" if self.tty else ""
        try:
            self.stream.write(start + self.text(now) + end)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False          # stderr closed or gone: the work goes on silently
        self.drawn = True
