"""Put GPU power limits back however the program ends.

``restored_power_limits(gpus)`` (or ``PowerLimitGuard(gpus)`` as a context manager) records every GPU's
limit on entry and sets it back:

* on normal exit and on an exception leaving the block (``__exit__``);
* on SIGINT, SIGTERM, SIGHUP (the terminal or SSH session closed) and SIGQUIT: a handler restores the limits,
  then hands the signal on. A previous Python handler is called (for SIGINT that is normally
  ``KeyboardInterrupt``); where the previous disposition was the default action, SIGINT raises
  ``KeyboardInterrupt`` and the others ``SystemExit(128 + signal number)`` (SIGTERM: exit status 143, the shell
  convention), so ``finally`` blocks and ``__exit__`` still run. A signal that was ignored
  stays ignored (and no restore happens: the program goes on). Handlers are installed only from the main
  thread, and the previous ones are put back on exit. Python runs them in the main thread between bytecodes:
  a main thread blocked in one long system call (a minute's ``time.sleep``) may run them only when it returns,
  if the kernel handed the signal to another thread, so wait in short steps or in an event loop (``pals hil
  run`` waits in asyncio, whose signal wake-up does not depend on the receiving thread);
* at interpreter exit (``atexit``), as a backstop.

Restoring is idempotent (the first restore wins, later ones do nothing); a GPU already at its recorded limit is
left alone (a run without the right to set limits changed nothing, so it has nothing to restore). One GPU
failing to restore is logged, kept in ``failures`` and does not stop the others; the interpreter-exit backstop
tries it once more. Works with any ``sim.gpu.Gpu`` (``NvmlGpu``, ``TwinGpu``, ``SimGpu``).
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

# The signals whose default action ends the program and that a program can catch (SIGKILL cannot be).
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
LIMIT_TOLERANCE_W = 1e-3  # a limit within a milliwatt (NVML's resolution) of the recorded one is that limit


class PowerLimitGuard:
    """Records power limits on entry; restores them on exit, on the ``signals`` and at interpreter exit."""

    def __init__(self, gpus: Sequence[Gpu], signals: Sequence[signal.Signals] = HANDLED_SIGNALS) -> None:
        self.gpus = list(gpus)
        self.signals = tuple(signals)
        self.originals_w: list[float] = []
        self.failures: list[tuple[int, str]] = []  # (gpu index, error) of every failed restore
        self._todo: list[tuple[Gpu, float]] = []  # (gpu, limit) still to restore
        self._failed: list[tuple[Gpu, float]] = []  # (gpu, limit) whose restore failed: the backstop retries them
        self._previous: dict[int, Any] = {}
        self._restored_by_signal = False

    # ----- context manager ------------------------------------------------------------------------------
    def __enter__(self) -> PowerLimitGuard:
        self.originals_w = [gpu.get_power_limit_w() for gpu in self.gpus]
        self._todo = list(zip(self.gpus, self.originals_w, strict=True))
        atexit.register(self._at_exit)
        self._install_handlers()
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._restored_by_signal:
                # Another thread of the program (a profiling sweep, say) may have set a cap after the
                # handler restored the limits: set them back once more now that the block is over.
                self._todo = list(zip(self.gpus, self.originals_w, strict=True))
                self._failed.clear()
            self.restore()
        finally:
            self._uninstall_handlers()
            if self.restored:  # keep the interpreter-exit backstop while anything is left to restore
                atexit.unregister(self._at_exit)

    # ----- restoring ------------------------------------------------------------------------------------
    def restore(self) -> list[tuple[int, str]]:
        """Set every GPU still to restore back to its recorded limit (one already there is left alone); later
        calls do nothing. Returns the failures of this call as ``(gpu index, message)``; each is logged, kept in
        ``failures`` and does not stop the other GPUs.

        A signal arriving during a restore runs the rest of it from the handler (no lock: the handler runs on
        the same thread), so no GPU is skipped."""
        failures: list[tuple[int, str]] = []
        while self._todo:
            gpu, limit_w = self._todo[0]
            failed = False
            try:
                if abs(gpu.get_power_limit_w() - limit_w) > LIMIT_TOLERANCE_W:
                    gpu.set_power_limit_w(limit_w)
                    log.info("GPU %s: power limit restored to %.1f W", gpu.index, limit_w)
            except Exception as exc:  # one GPU failing must not stop the others
                failed = True
                failures.append((gpu.index, str(exc)))
                log.error("GPU %s: could not restore its power limit to %.1f W: %s", gpu.index, limit_w, exc)
            if self._todo and self._todo[0][0] is gpu:
                self._todo.pop(0)
                if failed:
                    self._failed.append((gpu, limit_w))
        self.failures.extend(failures)
        return failures

    def _at_exit(self) -> None:
        """The interpreter-exit backstop: restore what is left, and try the failed GPUs once more."""
        self._todo.extend(self._failed)
        self._failed.clear()
        self.restore()

    @property
    def restored(self) -> bool:
        """Whether every recorded limit is back (or none was recorded): nothing left to restore, nothing failed."""
        return not self._todo and not self._failed

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


def limits_note(failures: Sequence[tuple[int, str]]) -> str:
    """How the power limits ended, for a closing message: restored, or which GPUs still need a hand reset."""
    if not failures:
        return "power limits restored"
    gpus = ", ".join(str(i) for i in sorted({i for i, _ in failures}))
    return (f"power limits NOT restored on GPU {gpus} (see the errors above): set them back by hand with "
            "`sudo nvidia-smi -i INDEX -pl WATTS`")


def restore_failures(guard: object) -> list[tuple[int, str]]:
    """The failed restores of a guard (``PowerLimitGuard.failures``); none for a guard that does not track them."""
    return list(getattr(guard, "failures", None) or [])
