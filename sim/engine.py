"""A vLLM-like continuous-batching engine as a SimPy component.

Scheduling follows vLLM V1: every step serves the running requests first (one token per decoding
sequence, a chunk of the prompt for those still prefilling), then admits waiting requests FCFS while
``max_num_seqs`` and the step's token budget (``max_num_batched_tokens``) allow; prompts are chunked.
KV-cache blocks are allocated per step; when none are free the most recently admitted request is preempted
(recompute: its cache is dropped and its prompt plus generated tokens are prefilled again later).

Event-level stepping: when a step carries only decodes, the composition stays fixed until a request
finishes, the KV cache fills, a request could be admitted, or the GPU clock must change. The whole run of
iterations until then is one ``Stretch`` and one SimPy event; an arrival or a cap change ends it at the
next iteration boundary. ``stepping: iteration`` keeps one event per iteration as the reference.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable

import numpy as np
import simpy

from sim.gpu import SimGpu
from sim.itl import ItlPieces
from sim.physics import ReplicaPhysics, StepWork, Stretch, duration_runs
from sim.workload import Request

LOG_FIELDS = 9  # a decode-log row: Stretch.shape (7), iterations run, decoding requests


class Engine:
    """One replica: a scheduler, a KV cache, and the GPUs it runs on.

    Every step advances every decoding request by one token, so the engine keeps one iteration counter
    ``G`` and stores each decoding request's progress as offsets from it (``computed = decode_base + G``);
    a heap orders decoding requests by the ``G`` at which they finish. A step then costs time in the
    number of prefilling and finishing requests, not in the batch size. KV-cache occupancy is counted in
    tokens plus one block of slack per sequence (an upper bound of the paged allocation).
    """

    def __init__(self, env: simpy.Environment, phys: ReplicaPhysics, gpus: list[SimGpu], *, replica: int,
                 max_num_seqs: int, max_num_batched_tokens: int, block_size: int, kv_capacity_tokens: int,
                 max_model_len: int, iteration_stepping: bool,
                 on_finish: Callable[[Request], None], on_drop: Callable[[Request], None]) -> None:
        self.env = env
        self.phys = phys
        self.gpus = gpus
        self.ledger = gpus[0].ledger
        if any(g.ledger is not self.ledger for g in gpus):
            raise ValueError("the GPUs of one replica must share one activity ledger")
        self.replica = replica
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.block_size = block_size
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_model_len = max_model_len
        self.iteration_stepping = iteration_stepping
        self.on_finish = on_finish
        self.on_drop = on_drop
        self.on_first_token: Callable[[Request], None] | None = None
        # Token hook (None: off): ``on_tokens(requests, count)`` when each of ``requests`` has just sampled
        # ``count`` output tokens, the last of them at ``env.now``. With iteration stepping it fires once per
        # iteration (count 1), so every token is reported at its own instant; with event stepping the decode
        # tokens of a stretch are reported together when it ends.
        self.on_tokens: Callable[[list[Request], int], None] | None = None
        self._window = phys.model.sliding_window
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # running, prompt (or recompute) not fully in the cache; admission order
        self.decoding: dict[int, Request] = {}  # running, one token per step
        self._finish_heap: list[tuple[int, int, Request]] = []  # (G at which it finishes, admit_seq, request)
        self.G = 0  # decode iterations run
        self._sum_base = 0  # sum of decode_base over decoding requests
        self._prefill_computed = 0  # sum of computed over prefilling requests
        self._admit_seq = 0
        # The stretch in flight.
        self._stretch: Stretch | None = None
        self._start_s = 0.0
        self._chunks: list[tuple[Request, int]] = []  # (request, chunk) of a prefill-carrying step
        self._n_dec = 0  # decoding requests in the stretch in flight
        # A prefill-carrying step in flight: its whole work, the share of it still to run from ``_start_s``, and
        # the time its earlier parts took (a cap change mid-step re-times the rest at the new clock).
        self._step_work: StepWork | None = None
        self._step_left = 1.0
        self._step_elapsed_s = 0.0
        self._pending: simpy.Event | None = None  # the live end-of-stretch event; superseded ones are ignored
        self._iter_done = 0  # iteration mode: iterations finished in the current stretch
        self._replan = False  # iteration mode: end the stretch at the next iteration boundary
        self._wake_pending = False  # an idle engine has a plan scheduled for the current instant
        self.tokens_generated = 0  # output tokens sampled by finished steps
        self.iterations = 0  # engine iterations run
        self.preemptions = 0
        self.timer_events = 0  # SimPy events this engine scheduled
        # Steps that advanced decoding requests, flat: the stretch's (or iteration's) ``Stretch.shape``, the
        # iterations run and the decoding requests. Each iteration gave every one of them a token: one
        # inter-token gap of that iteration's duration. (Plain floats: holding the stretches themselves would
        # keep tens of thousands of objects alive for the garbage collector to scan.)
        self._decode_log: list[float] = []
        self._it: Stretch | None = None  # iteration stepping: the iteration in flight
        self._cap = min(g.get_power_limit_w() for g in gpus)  # lockstep ranks: the lowest cap binds
        for gpu in gpus:
            gpu.on_limit_change(self._on_cap_change)

    # ----- inputs -----------------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """A request arrives at this replica."""
        req.replica = self.replica
        total = req.prompt_tokens + req.output_tokens
        if total > self.max_model_len:
            req.drop_reason = f"too_long: prompt+output={total} exceeds max_model_len={self.max_model_len}"
            self.on_drop(req)
            return
        if total + self.block_size > self.kv_capacity_tokens:
            req.drop_reason = (f"too_long: prompt+output={total} does not fit the KV cache "
                               f"({self.kv_capacity_tokens} tokens)")
            self.on_drop(req)
            return
        self.waiting.append(req)
        if self._stretch is None:
            if not self._wake_pending:  # plan once every request arriving at this instant is queued
                self._wake_pending = True
                self.timer_events += 1
                self.env.timeout(0).callbacks.append(self._wake)
        elif not self._chunks and self._can_admit():
            self._end_early()

    def _wake(self, _event: simpy.Event) -> None:
        self._wake_pending = False
        if self._stretch is None:
            self._plan()

    def set_max_num_seqs(self, n: int) -> None:
        """Change the batch knob: admissions follow it from the next step; running requests are not evicted."""
        if n == self.max_num_seqs:
            return
        self.max_num_seqs = n
        if self._stretch is not None and not self._chunks and self._can_admit():
            self._end_early()

    def _on_cap_change(self, _gpu: SimGpu) -> None:
        self._cap = min(g.get_power_limit_w() for g in self.gpus)
        if self._stretch is None:
            return
        if self._chunks:
            self._retime_step()
        else:
            self._end_early()

    def _retime_step(self) -> None:
        """The cap changed during a prefill-carrying step: the governor moves the clock at once, so the rest of
        the step (its work done so far in proportion to the time it has run) runs at the new cap's clock."""
        s, work = self._stretch, self._step_work
        assert s is not None and work is not None
        elapsed = self.env.now - self._start_s
        total = s.total_time_s()
        if elapsed >= total * (1.0 - 1e-12):
            return  # its end event is due now
        clock = self.phys.clock_for_cap(work, self._cap)  # the step's mix of work is the same all through
        if clock == s.clock:
            return
        self._step_left *= 1.0 - elapsed / total
        self._step_elapsed_s += elapsed
        rest = Stretch(self.phys, StepWork(*(x * self._step_left for x in work)), 0.0, 0.0, clock, 1)
        self._stretch = rest
        self._start_s = self.env.now
        if self.iteration_stepping:
            self._it = rest
        self.ledger.begin(rest)
        self._schedule(rest.total_time_s())

    def _logged_shape(self, s: Stretch) -> tuple[float, ...]:
        """The closed-form shape the ITL log records for a stretch: a re-timed step's whole duration."""
        if self._chunks and self._step_elapsed_s > 0.0:
            return (self._step_elapsed_s + s.total_time_s(), 0.0, 0.0, 0.0, 0.0, 0, 0.0)
        return s.shape()

    # ----- telemetry --------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        """Requests admitted and not finished."""
        return len(self.prefilling) + len(self.decoding)

    @property
    def outstanding(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.prefilling) + len(self.decoding)

    def tokens_generated_now(self) -> int:
        """Output tokens sampled up to now, counting finished iterations of the stretch in flight."""
        if self._stretch is None or self._chunks:
            return self.tokens_generated
        return self.tokens_generated + self._decode_iterations_done() * self._n_dec

    def _decode_iterations_done(self) -> int:
        """Finished iterations of the decode stretch in flight."""
        if self.iteration_stepping:
            return self._iter_done
        return self._stretch.iterations_done_by(self.env.now - self._start_s)

    def itl_pieces(self) -> ItlPieces:
        """The inter-token gaps of every token this engine's steps gave a decoding request (see ``sim.itl``;
        a preempted request's wait for its recomputation is not one)."""
        log = list(self._decode_log)
        s = self._stretch
        if s is not None and self._n_dec and not self.iteration_stepping:  # the iterations done of the one in flight
            log += (*s.shape(), s.iterations_done_by(self.env.now - self._start_s), self._n_dec)
        rows = np.array(log, dtype=float).reshape(-1, LOG_FIELDS)
        first, last, count = duration_runs(rows[:, :-2], rows[:, -2])
        return ItlPieces(first, last, count * np.tile(rows[:, -1], 3))

    def unfinished_requests(self) -> list[Request]:
        """Running and waiting requests, their progress up to now written back (for the records at the end of
        a run; the engine is not used afterwards)."""
        if self._stretch is not None and not self._chunks:
            self.G += self._decode_iterations_done()  # the finished iterations of the stretch in flight
        for req in self.decoding.values():
            self._materialize(req)
        return [*self.prefilling, *self.decoding.values(), *self.waiting]

    # ----- bookkeeping ------------------------------------------------------------------------------------
    def _materialize(self, req: Request) -> None:
        req.computed = req.decode_base + self.G
        req.generated = req.gen_base + self.G

    def _occupancy(self) -> int:
        """KV tokens held (plus one block of slack per running sequence)."""
        n_dec = len(self.decoding)
        return (self._prefill_computed + self._sum_base + n_dec * self.G
                + (len(self.prefilling) + n_dec) * self.block_size)

    def _can_admit(self) -> bool:
        if not self.waiting or self.num_running >= self.max_num_seqs:
            return False
        head = self.waiting[0]
        chunk = min(head.num_tokens - head.computed, self.token_budget - len(self.decoding))
        return chunk > 0 and self._occupancy() + chunk + self.block_size <= self.kv_capacity_tokens

    def _enter_decode(self, req: Request) -> None:
        req.in_decode = True
        req.decode_base = req.computed - self.G
        req.gen_base = req.generated - self.G
        self._sum_base += req.decode_base
        self.decoding[req.id] = req
        heapq.heappush(self._finish_heap, (req.output_tokens - req.gen_base, req.admit_seq, req))

    def _leave_decode(self, req: Request) -> None:
        self._materialize(req)
        req.in_decode = False
        self._sum_base -= req.decode_base
        del self.decoding[req.id]

    def _preempt_last(self) -> None:
        """Recompute preemption of the most recently admitted running request."""
        victim = self.prefilling[-1] if self.prefilling else None
        for req in self.decoding.values():
            if victim is None or req.admit_seq > victim.admit_seq:
                victim = req
        assert victim is not None
        if victim.in_decode:
            self._leave_decode(victim)
        else:
            self.prefilling.remove(victim)
            self._prefill_computed -= victim.computed
        victim.computed = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)

    # ----- scheduling -------------------------------------------------------------------------------------
    def _plan(self) -> None:
        """Choose the next step (or stretch) and start it."""
        preempted = False
        while True:
            n_dec = len(self.decoding)
            budget = self.token_budget - n_dec
            growth = n_dec
            chunks: list[tuple[Request, int]] = []
            for req in self.prefilling:
                c = min(req.num_tokens - req.computed, budget)
                if c <= 0:
                    break
                chunks.append((req, c))
                budget -= c
                growth += c
            occupancy = self._occupancy()
            if occupancy + growth <= self.kv_capacity_tokens or self.num_running <= 1:
                break
            self._preempt_last()
            preempted = True
        if not preempted:
            cap = self.kv_capacity_tokens - self.block_size
            while self.waiting and self.num_running < self.max_num_seqs and budget > 0:
                req = self.waiting[0]
                c = min(req.num_tokens - req.computed, budget)
                if occupancy + growth + c > cap:
                    break
                self.waiting.popleft()
                req.admit_seq = self._admit_seq
                self._admit_seq += 1
                self.prefilling.append(req)
                self._prefill_computed += req.computed
                occupancy += self.block_size
                chunks.append((req, c))
                budget -= c
                growth += c
        self._chunks = chunks
        self._n_dec = n_dec
        if chunks:
            self._start(self._mixed_step(n_dec, chunks))
        elif n_dec:
            self._start(self._decode_stretch(n_dec, occupancy))
        else:
            self._stretch = None
            self.ledger.begin(None)

    def _decode_windowed(self) -> int:
        w = self._window
        if not w:
            return 0
        g = self.G + 1
        return sum(min(r.decode_base + g, w) for r in self.decoding.values())

    def _mixed_step(self, n_dec: int, chunks: list[tuple[Request, int]]) -> Stretch:
        ctx = self._sum_base + n_dec * (self.G + 1)  # every decode attends its cache plus itself
        pairs = kv = float(ctx)
        pairs_w = kv_w = float(self._decode_windowed())
        logits = n_dec
        tokens = n_dec
        new = 0
        w = self._window
        for r, c in chunks:
            s = r.computed
            if s == 0:
                new += 1
            pairs += c * s + c * (c + 1) / 2.0
            kv += s + c
            if w:
                pairs_w += c * min(s + (c + 1) / 2.0, w)
                kv_w += min(s + c, w)
            if s + c == r.num_tokens:
                logits += 1
            tokens += c
        work = self.phys.step_work(tokens, logits, n_dec + len(chunks), pairs, kv, pairs_w, kv_w, new)
        self._step_work, self._step_left, self._step_elapsed_s = work, 1.0, 0.0
        return Stretch(self.phys, work, 0.0, 0.0, self.phys.clock_for_cap(work, self._cap), 1)

    def _decode_stretch(self, n: int, occupancy: int) -> Stretch:
        heap = self._finish_heap
        while heap and not (heap[0][2].in_decode and heap[0][2].admit_seq == heap[0][1]):
            heapq.heappop(heap)  # stale: preempted since it was pushed
        k = heap[0][0] - self.G
        k = max(1, min(k, (self.kv_capacity_tokens - occupancy) // n))
        ctx = self._sum_base + n * (self.G + 1)
        ctx_w = self._decode_windowed()
        phys = self.phys
        work0 = phys.step_work(n, n, n, ctx, ctx, ctx_w, ctx_w)
        c1 = phys.attn_compute_s(n)
        m1 = phys.kv_read_s(n)
        return Stretch(phys, work0, c1, m1, phys.clock_for_stretch(work0, c1, m1, k, self._cap), k)

    def _start(self, stretch: Stretch) -> None:
        self._stretch = stretch
        self._start_s = self.env.now
        self._iter_done = 0
        self._replan = False
        if self.iteration_stepping:
            it = self._iteration(0)
            self._it = it
            self.ledger.begin(it)
            self._schedule(it.total_time_s())
        else:
            self.ledger.begin(stretch)
            self._schedule(stretch.total_time_s())

    def _iteration(self, j: int) -> Stretch:
        """Reference stepping: iteration ``j`` of the planned stretch, its work recomputed from the requests
        themselves (not from the stretch's closed form), at the clock the governor chose for the stretch."""
        planned = self._stretch
        assert planned is not None
        if self._chunks:
            return planned  # a prefill-carrying step is a single iteration, built from the requests
        g = self.G + j + 1  # each decode attends its cache (j tokens longer than at the start) plus itself
        w = self._window
        ctx = ctx_w = 0
        for r in self.decoding.values():
            c = r.decode_base + g
            ctx += c
            if w:
                ctx_w += min(c, w)
        n = len(self.decoding)
        work = self.phys.step_work(n, n, n, ctx, ctx, ctx_w, ctx_w)
        return Stretch(self.phys, work, 0.0, 0.0, planned.clock, 1)

    def _schedule(self, delay: float) -> None:
        """The end of the current step or stretch, ``delay`` from now (supersedes any earlier one)."""
        self.timer_events += 1
        event = self.env.timeout(delay)
        event.callbacks.append(self._on_timer)
        self._pending = event

    def _end_early(self) -> None:
        """End the decode stretch in flight at its next iteration boundary."""
        s = self._stretch
        assert s is not None
        if self.iteration_stepping:
            self._replan = True
            return
        elapsed = self.env.now - self._start_s
        m = s.iterations_done_by(elapsed)
        if m >= s.iterations:
            return  # its end event is due now
        if m == 0 or s.time_of(m) < elapsed:
            m += 1
        if m >= s.iterations:
            return
        s.truncate(m)
        self._schedule(self._start_s + s.total_time_s() - self.env.now)

    def _on_timer(self, event: simpy.Event) -> None:
        if event is not self._pending:
            return  # superseded by an early end
        s = self._stretch
        assert s is not None
        if self.iteration_stepping:
            self._iter_done += 1
            if self._n_dec:
                assert self._it is not None
                self._decode_log += self._logged_shape(self._it)
                self._decode_log += (1, self._n_dec)
                if self.on_tokens is not None:
                    self.on_tokens(list(self.decoding.values()), 1)
            if self._iter_done < s.iterations and not self._replan:
                it = self._iteration(self._iter_done)
                self._it = it
                self.ledger.begin(it)
                self._schedule(it.total_time_s())
                return
            s.truncate(self._iter_done)
        self._finish_stretch(s.iterations)
        self._plan()

    def _finish_stretch(self, m: int) -> None:
        now = self.env.now
        self.iterations += m
        finished: list[Request] = []
        if self._n_dec:
            if not self.iteration_stepping:
                assert self._stretch is not None
                self._decode_log += self._logged_shape(self._stretch)
                self._decode_log += (m, self._n_dec)
                if self.on_tokens is not None:
                    self.on_tokens(list(self.decoding.values()), m)
            self.G += m
            self.tokens_generated += self._n_dec * m
            heap = self._finish_heap
            while heap and heap[0][0] <= self.G:
                _, seq, req = heapq.heappop(heap)
                if req.in_decode and req.admit_seq == seq:
                    self._leave_decode(req)
                    finished.append(req)
        for req, c in self._chunks:
            req.computed += c
            self._prefill_computed += c
            if req.computed == req.num_tokens:
                self.prefilling.remove(req)
                self._prefill_computed -= req.computed
                if req.generated == 0:
                    req.first_token_s = now
                    if self.on_first_token is not None:
                        self.on_first_token(req)
                req.generated += 1
                self.tokens_generated += 1
                if self.on_tokens is not None:
                    self.on_tokens([req], 1)
                if req.generated >= req.output_tokens:
                    finished.append(req)
                else:
                    self._enter_decode(req)
        self._stretch = None
        self._chunks = []
        for req in finished:
            req.finish_s = now
            self.on_finish(req)


def kv_capacity_tokens(phys: ReplicaPhysics, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
    """KV-cache tokens a replica holds: GPU memory vLLM may use, minus weights and activations, per GPU.

    Raises ``ValueError`` when the weights alone do not fit.
    """
    m, par, gpu = phys.model, phys.par, phys.gpu
    expert_total = m.num_moe_layers * m.num_experts * m.expert_weight_bytes
    expert_shards = phys.ep_ranks if phys.ep_ranks > 1 else par.tensor
    weights = m.dense_weight_bytes / par.tensor + expert_total / expert_shards
    # Activation peak of one step (profiled by vLLM at startup) plus CUDA graphs / NCCL buffers.
    activations = max_num_batched_tokens * m.hidden_size * 2.0 * 12 / par.tensor + 1.0 * 1024**3
    usable = gpu.hbm_bytes * gpu_memory_utilization
    free = usable - weights - activations
    if free <= 0:
        raise ValueError(
            f"{m.name} needs {weights / 1024**3:.1f} GiB of weights per GPU (+{activations / 1024**3:.1f} GiB "
            f"activations) but {gpu.name} offers {usable / 1024**3:.1f} GiB at gpu_memory_utilization="
            f"{gpu_memory_utilization}: use more tensor parallelism or a larger GPU")
    per_token = phys.kv_bytes_per_token_per_gpu
    if per_token <= 0:
        return 10**12
    return math.floor(free / per_token) * par.data
