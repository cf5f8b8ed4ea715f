"""The terminal: messages on stderr, timed stages, a progress bar, Ctrl-C that stops after the current step."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(what: str):
    say(f"{what}...")
    start = time.monotonic()
    yield
    say(f"  done in {time.monotonic() - start:.1f} s")


class Progress:
    """``step 3/28 [#####.......] 1.9 s/step, 47 s left`` on stderr; redrawn in place on a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.inplace = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, step: int, total: int, latents=None) -> None:
        per_step = (time.monotonic() - self.start) / step
        filled = round(20 * step / total)
        line = (f"step {step}/{total} [{'#' * filled}{'.' * (20 - filled)}] {per_step:.2f} s/step, "
                f"{per_step * (total - step):.0f} s left")
        if self.inplace:
            self.stream.write("\r" + line + ("\n" if step == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class CtrlC:
    """While active, the first Ctrl-C asks sampling to stop before its next step; a second one stops at once."""

    def __init__(self):
        self._pressed = False
        self._previous = None

    def pressed(self) -> bool:
        return self._pressed

    def _handle(self, signum, frame):
        if self._pressed:
            raise KeyboardInterrupt
        self._pressed = True
        say("\nCancelling after this step (Ctrl-C again to stop now)...")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *_):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
