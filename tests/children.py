"""Child processes for multi-process tests: a Python script with a line protocol on stdout.

Used by tests/test_multiprocess_lock.py, tests/test_queue.py and tests/test_lock_report.py
(``hold_lock``).  A child's script runs after
``PRELUDE``, which imports os, sys, time and mmkv and defines the two halves of the protocol:
``say(*words)`` writes one line to the parent (unbuffered, with os.write: safe in a signal handler,
and a child killed right after it has still said it), ``wait_for(word)`` reads one line from the
parent and exits with status 5 (after saying ``protocol-error``) when it is not ``word``.
"""
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager

import pytest

PRELUDE = textwrap.dedent("""
    import os, sys, time
    import mmkv

    def say(*words):
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())

    def wait_for(word):
        line = sys.stdin.readline().strip()
        if line != word:
            say("protocol-error", repr(line))
            sys.exit(5)
""")

TIMEOUT = 30          # the most any single step may take; only hit when something hangs


class Child:
    """A python child running prelude + script, read line by line with timeouts."""

    def __init__(self, prelude, script, *args):
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script), *map(str, args)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        self.pid = self.p.pid
        self._buf = b""
        self.lines = []           # every line received so far

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-3000:]

    def readline(self, timeout=TIMEOUT):
        """The next complete line, or None at EOF (an unterminated tail is dropped: a child
        killed in the middle of a print did not finish saying it); fails the test on timeout."""
        end = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                pytest.fail(f"child {self.pid} said nothing for {timeout}s; stderr: {self.stderr()}")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                self._buf = b""
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        text = line.decode()
        self.lines.append(text)
        return text

    def expect(self, word, timeout=TIMEOUT):
        """Read until a line whose first word is word; returns the remaining words."""
        while True:
            line = self.readline(timeout)
            if line is None:
                pytest.fail(f"child {self.pid} exited (rc {self.p.wait(5)}) before saying {word!r}; "
                            f"said {self.lines[-5:]}; stderr: {self.stderr()}")
            parts = line.split()
            if parts and parts[0] == word:
                return parts[1:]
            if parts and parts[0] in ("protocol-error", "error"):
                pytest.fail(f"child {self.pid}: {line}; stderr: {self.stderr()}")

    def silent_for(self, seconds) -> bool:
        """True when the child writes nothing for that long."""
        return b"\n" not in self._buf and not select.select([self.p.stdout.fileno()], [], [], seconds)[0]

    def send(self, word):
        self.p.stdin.write(word.encode() + b"\n")
        self.p.stdin.flush()

    def finish(self, timeout=TIMEOUT):
        """Wait for a normal exit; returns the exit code."""
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"child {self.pid} did not exit; stderr: {self.stderr()}")

    def kill(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            os.kill(self.pid, sig)
        return self.p.wait(TIMEOUT)

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(TIMEOUT)
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.err.close()


@contextmanager
def spawner(prelude=PRELUDE):
    """start(script, *args) -> Child; every child started is closed at the end."""
    started = []

    def start(script, *args):
        child = Child(prelude, script, *args)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.close()


HOLD_LOCK = """
    db = mmkv.open(sys.argv[1])
    with db.lock():
        say("locked")
        time.sleep(float(sys.argv[2]))
    db.close()
    say("released")
"""


def hold_lock(path, seconds) -> Child:
    """A child that takes the store lock of path, says "locked" (returned once it has), keeps
    the lock for ``seconds`` and exits.  The caller ends it with ``finish()`` (or ``kill()``)
    and ``close()``."""
    child = Child(PRELUDE, HOLD_LOCK, path, seconds)
    child.expect("locked")
    return child
