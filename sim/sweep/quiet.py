"""A Dask worker plugin that makes worker processes ignore Ctrl-C (imported only where Dask is)."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class QuietOnCtrlC(WorkerPlugin):
    """The worker process ignores SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the
    driver alone should handle it (cancel the runs, close the cluster) instead of every worker printing a
    traceback. Registered with the cluster, it also covers the workers restarted later."""

    name = "pals-quiet-on-ctrl-c"
    idempotent = True

    def setup(self, worker: Any) -> None:
        """Ignore SIGINT in this worker process (its main thread runs the worker's event loop)."""
        with contextlib.suppress(ValueError):  # not the main thread: leave it as it is
            signal.signal(signal.SIGINT, signal.SIG_IGN)
