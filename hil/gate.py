"""The batch knob on a real server: admission control in front of it.

vLLM's ``--max-num-seqs`` is fixed when the server starts, so the controller's batch knob is applied on the
client side: at most ``limit`` requests are in flight at once, first come first served. The limit can go up
(waiters are admitted at once) or down (requests in flight run to completion; nobody new is admitted until
fewer than the new limit remain), like ``Engine.set_max_num_seqs`` in the simulator.
"""

from __future__ import annotations

import asyncio
from collections import deque


class AdmissionGate:
    """An asyncio gate admitting at most ``limit`` holders at a time, FIFO, with a limit that can change."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"admission limit must be at least 1, got {limit}")
        self._limit = int(limit)
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.admitted_total = 0
        self.max_in_flight_seen = 0

    @property
    def limit(self) -> int:
        """Most holders admitted at once."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Holders admitted and not yet released."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers waiting for admission."""
        return sum(1 for f in self._waiters if not f.done())

    def set_limit(self, limit: int) -> None:
        """Change the limit; raising it admits waiters at once, lowering it evicts nobody."""
        if limit < 1:
            raise ValueError(f"admission limit must be at least 1, got {limit}")
        self._limit = int(limit)
        self._wake()

    async def acquire(self) -> None:
        """Wait for admission (FIFO). Cancelling the wait leaves the gate unchanged."""
        if self._in_flight < self._limit and not self._pending():
            self._admit()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted in the same instant it was cancelled: give it back
                self.release()
            raise

    def release(self) -> None:
        """A holder is done: admit the next waiter if the limit allows."""
        if self._in_flight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_flight -= 1
        self._wake()

    def _pending(self) -> bool:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        return bool(self._waiters)

    def _admit(self) -> None:
        self._in_flight += 1
        self.admitted_total += 1
        self.max_in_flight_seen = max(self.max_in_flight_seen, self._in_flight)

    def _wake(self) -> None:
        while self._in_flight < self._limit and self._pending():
            fut = self._waiters.popleft()
            self._admit()
            fut.set_result(None)

    async def __aenter__(self) -> AdmissionGate:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
