"""Put GPU power limits back however the program ends.

``restored_power_limits(gpus)`` (or ``PowerLimitGuard(gpus)`` as a context manager) records every GPU's
limit on entry and sets it back:

* on normal exit and on an exception leaving the block (``__exit__``);
* on SIGINT and SIGTERM: a handler restores the limits, then hands the signal on. A previous Python handler
  is called (for SIGINT that is normally ``KeyboardInterrupt``); where the previous disposition was the
  default action, SIGINT raises ``KeyboardInterrupt`` and SIGTERM raises ``SystemExit(128 + 15)`` (exit status
  143, the shell convention), so ``finally`` blocks and ``__exit__`` still run. A signal that was ignored
  stays ignored (and no restore happens: the program goes on). Handlers are installed only from the main
  thread, and the previous ones are put back on exit. Python runs them in the main thread between bytecodes:
  a main thread blocked in one long system call (a minute's ``time.sleep``) may run them only when it returns,
  if the kernel handed the signal to another thread, so wait in short steps or in an event loop (``pals hil
  run`` waits in asyncio, whose signal wake-up does not depend on the receiving thread);
* at interpreter exit (``atexit``), as a backstop.

Restoring is idempotent (the first restore wins, later ones do nothing) and one GPU failing to restore is
logged and does not stop the others. Works with any ``sim.gpu.Gpu`` (``NvmlGpu``, ``TwinGpu``, ``SimGpu``).
Not covered: SIGKILL and power loss (nothing can run then); the GPU keeps its last limit until the next
driver reload or ``nvidia-smi -pl``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from sim.gpu import Gpu

log = logging.getLogger("pals.hil")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PowerLimitGuard:
    """Records power limits on entry; restores them on exit, on SIGINT/SIGTERM and at interpreter exit."""

    def __init__(self, gpus: Sequence[Gpu], signals: Sequence[signal.Signals] = HANDLED_SIGNALS) -> None:
        self.gpus = list(gpus)
        self.signals = tuple(signals)
        self.originals_w: list[float] = []
        self.failures: list[tuple[int, str]] = []  # (gpu index, error) of every failed restore
        self._todo: list[tuple[Gpu, float]] = []  # (gpu, limit) still to restore
        self._previous: dict[int, Any] = {}
        self._restored_by_signal = False

    # ----- context manager ------------------------------------------------------------------------------
    def __enter__(self) -> PowerLimitGuard:
        self.originals_w = [gpu.get_power_limit_w() for gpu in self.gpus]
        self._todo = list(zip(self.gpus, self.originals_w, strict=True))
        atexit.register(self.restore)
        self._install_handlers()
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._restored_by_signal:
                # Another thread of the program (a profiling sweep, say) may have set a cap after the
                # handler restored the limits: set them back once more now that the block is over.
                self._todo = list(zip(self.gpus, self.originals_w, strict=True))
            self.restore()
        finally:
            self._uninstall_handlers()
            if self.restored:  # keep the interpreter-exit backstop while anything is left to restore
                atexit.unregister(self.restore)

    # ----- restoring ------------------------------------------------------------------------------------
    def restore(self) -> list[tuple[int, str]]:
        """Set every GPU still to restore back to its recorded limit; later calls do nothing. Returns the
        failures of this call as ``(gpu index, message)``; each is logged and does not stop the other GPUs.

        A signal arriving during a restore runs the rest of it from the handler (no lock: the handler runs on
        the same thread), so no GPU is skipped."""
        failures: list[tuple[int, str]] = []
        while self._todo:
            gpu, limit_w = self._todo[0]
            try:
                gpu.set_power_limit_w(limit_w)
            except Exception as exc:  # one GPU failing must not stop the others
                failures.append((gpu.index, str(exc)))
                log.error("GPU %s: could not restore its power limit to %.1f W: %s", gpu.index, limit_w, exc)
            else:
                log.info("GPU %s: power limit restored to %.1f W", gpu.index, limit_w)
            if self._todo and self._todo[0][0] is gpu:
                self._todo.pop(0)
        self.failures.extend(failures)
        return failures

    @property
    def restored(self) -> bool:
        """Whether every recorded limit has been restored (or none was recorded)."""
        return not self._todo

    # ----- signals --------------------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("power-limit guard entered off the main thread: no signal handlers (exit and atexit still "
                        "restore the limits)")
            return
        for sig in self.signals:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue  # ignored: the program goes on, so its limits stay
            self._previous[sig] = previous
            signal.signal(sig, self._on_signal)

    def _uninstall_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:  # someone else's handler since: leave it
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: restoring power limits", signum)
        self._restored_by_signal = True
        self.restore()
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._uninstall_handlers()
        if callable(previous):
            previous(signum, frame)
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def restored_power_limits(gpus: Sequence[Gpu]) -> Iterator[PowerLimitGuard]:
    """``with restored_power_limits(gpus) as guard:`` — the limits on entry are back however the block ends."""
    with PowerLimitGuard(gpus) as guard:
        yield guard
