"""The scenario's workload, replayed in wall-clock time against a real server.

The requests come from the simulator's own ``sim.workload.RequestSource`` (the same class, seeded from the
same stream: ``SeedSequence(scenario.seed).spawn(#deployments)[i]``), running in a SimPy environment of
its own that is advanced to the current scenario time instead of being simulated ahead. Open-loop and trace
workloads therefore issue exactly the simulator's requests (arrival times, prompt and output tokens); closed
loops and static batches draw their next requests, and think times, from the same stream in the same order
as the simulator, when the real server finishes the previous ones.
"""

from __future__ import annotations

from collections.abc import Callable

import simpy

from sim.plant import workload_rng
from sim.scenario import Scenario
from sim.workload import Request, RequestSource


class WorkloadReplay:
    """One deployment's request source, driven by the caller's clock (scenario seconds).

    ``advance(now_s)`` issues every request due by ``now_s`` through ``submit``; ``settle(req, now_s)`` tells
    the source that a request finished (or was dropped) at ``now_s``, so closed loops think and send again
    and static batches start the next batch.
    """

    def __init__(self, scenario: Scenario, deployment_index: int, submit: Callable[[Request], None]) -> None:
        self.env = simpy.Environment()
        self.scenario = scenario
        self.source = RequestSource(self.env, scenario, deployment_index, submit,
                                    workload_rng(scenario, deployment_index))

    @property
    def exhausted(self) -> bool:
        """No further request will ever be issued."""
        return self.source.exhausted

    @property
    def issued(self) -> int:
        """Requests issued so far."""
        return self.source.issued

    def next_due_s(self) -> float:
        """Scenario time of the next pending event of the source (``inf``: none until a request settles)."""
        return float(self.env.peek())

    def advance(self, now_s: float) -> None:
        """Process every source event due by ``now_s`` (issuing its requests)."""
        if now_s > self.env.now:
            self.env.run(until=now_s)
        while self.env.peek() <= now_s:
            self.env.step()

    def settle(self, req: Request, now_s: float) -> None:
        """``req`` left the server at ``now_s`` (completed, or dropped with ``drop_reason`` set)."""
        self.advance(now_s)
        if req.on_finish is not None:
            req.on_finish(req)
        self.advance(now_s)  # a closed-loop client with no think time sends its next request at once


def planned_requests(scenario: Scenario, deployment_index: int = 0) -> list[Request]:
    """Every request an open-loop or trace workload issues over the scenario, in order (as the simulator issues
    them). For closed loops and static batches, the requests issued at t=0 (the rest depend on completions)."""
    out: list[Request] = []
    replay = WorkloadReplay(scenario, deployment_index, out.append)
    replay.advance(scenario.duration_s)
    return out
