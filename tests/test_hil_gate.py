"""The admission gate (the batch knob on a real server): never more in flight than the limit in force at each
admission, FIFO, waiters admitted as soon as the limit allows, cancellation leaves it consistent."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.gate import AdmissionGate

# A program: ("arrive",) a new caller asks for admission; ("release", k) the k-th holder (mod count) leaves;
# ("limit", n) the controller sets a new limit; ("cancel", k) the k-th waiter gives up.
OPS = st.lists(st.one_of(
    st.tuples(st.just("arrive")),
    st.tuples(st.just("release"), st.integers(0, 1000)),
    st.tuples(st.just("limit"), st.integers(1, 6)),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
), min_size=1, max_size=60)


async def _run_program(initial: int, ops: list[tuple]) -> None:
    gate = AdmissionGate(initial)
    holders: list[int] = []
    waiters: dict[int, asyncio.Task[None]] = {}
    admissions: list[int] = []
    next_id = 0

    async def caller(cid: int) -> None:
        await gate.acquire()
        # The invariant, checked at the instant of every admission, against the limit then in force.
        assert gate.in_flight <= gate.limit, (gate.in_flight, gate.limit)
        admissions.append(cid)
        holders.append(cid)

    for op in ops:
        if op[0] == "arrive":
            waiters[next_id] = asyncio.ensure_future(caller(next_id))
            next_id += 1
        elif op[0] == "release" and holders:
            holders.pop(op[1] % len(holders))
            gate.release()
        elif op[0] == "limit":
            gate.set_limit(op[1])
        elif op[0] == "cancel":
            pending = [cid for cid, t in waiters.items() if not t.done()]
            if pending:
                cid = pending[op[1] % len(pending)]
                waiters[cid].cancel()
        for _ in range(3):
            await asyncio.sleep(0)  # let admitted callers run
        # Consistency after every step.
        assert gate.in_flight == len(holders)
        pending = [cid for cid, t in waiters.items() if not t.done()]
        assert gate.waiting == len(pending)
        # Liveness: nobody waits while there is room.
        assert not (pending and gate.in_flight < gate.limit)
    # FIFO: callers are admitted in arrival order (cancelled ones skipped).
    assert admissions == sorted(admissions)
    for t in waiters.values():
        t.cancel()
    await asyncio.gather(*waiters.values(), return_exceptions=True)


@settings(max_examples=150, deadline=None)
@given(initial=st.integers(1, 6), ops=OPS)
def test_gate_never_admits_beyond_the_limit(initial: int, ops: list[tuple]) -> None:
    asyncio.run(_run_program(initial, ops))


def test_lowering_the_limit_evicts_nobody_and_blocks_admissions() -> None:
    async def main() -> None:
        gate = AdmissionGate(3)
        for _ in range(3):
            await gate.acquire()
        gate.set_limit(1)
        assert gate.in_flight == 3  # running requests run to completion, as in the engine
        waiter = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        gate.release()
        gate.release()
        await asyncio.sleep(0)
        assert not waiter.done() and gate.in_flight == 1  # 1 in flight = the new limit: still no room
        gate.release()
        await asyncio.sleep(0)
        assert waiter.done() and gate.in_flight == 1
        gate.set_limit(4)
        more = [asyncio.ensure_future(gate.acquire()) for _ in range(5)]
        await asyncio.sleep(0)
        assert sum(f.done() for f in more) == 3 and gate.in_flight == 4 and gate.waiting == 2
        for f in more:
            f.cancel()
        await asyncio.gather(*more, return_exceptions=True)
        assert gate.max_in_flight_seen == 4

    asyncio.run(main())


def test_gate_rejects_bad_limits_and_unbalanced_release() -> None:
    with pytest.raises(ValueError):
        AdmissionGate(0)
    gate = AdmissionGate(2)
    with pytest.raises(ValueError):
        gate.set_limit(0)
    with pytest.raises(RuntimeError):
        gate.release()
