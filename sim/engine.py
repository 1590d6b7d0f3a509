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

import math
from collections import deque
from collections.abc import Callable

import simpy

from sim.gpu import SimGpu
from sim.physics import ReplicaPhysics, StepWork, Stretch
from sim.workload import Request


class Engine:
    """One replica: a scheduler, a KV cache, and the GPUs it runs on."""

    def __init__(self, env: simpy.Environment, phys: ReplicaPhysics, gpus: list[SimGpu], *, replica: int,
                 max_num_seqs: int, max_num_batched_tokens: int, block_size: int, kv_capacity_tokens: int,
                 max_model_len: int, iteration_stepping: bool,
                 on_finish: Callable[[Request], None], on_drop: Callable[[Request], None]) -> None:
        self.env = env
        self.phys = phys
        self.gpus = gpus
        self.replica = replica
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.block_size = block_size
        self.total_blocks = kv_capacity_tokens // block_size
        self.used_blocks = 0
        self.max_model_len = max_model_len
        self.iteration_stepping = iteration_stepping
        self.on_finish = on_finish
        self.on_drop = on_drop
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # The stretch in flight.
        self._stretch: Stretch | None = None
        self._start_s = 0.0
        self._prefills: list[tuple[Request, int]] = []  # (request, chunk) of a prefill-carrying step
        self._decodes: list[Request] = []
        self._token = 0  # identity of the pending end-of-stretch event; stale events carry an older one
        self._iter_done = 0  # iteration mode: iterations finished in the current stretch
        self._replan = False  # iteration mode: end the stretch at the next iteration boundary
        self.tokens_generated = 0  # output tokens sampled by finished steps
        self.iterations = 0  # engine iterations run
        self.preemptions = 0
        self.timer_events = 0  # SimPy events this engine scheduled
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
        if self._blocks(total) > self.total_blocks:
            req.drop_reason = (f"too_long: prompt+output={total} needs more KV blocks than the cache holds "
                               f"({self.total_blocks} x {self.block_size} tokens)")
            self.on_drop(req)
            return
        self.waiting.append(req)
        if self._stretch is None:
            self._plan()
        elif self._decodes and not self._prefills and self._can_admit():
            self._end_early()

    def set_max_num_seqs(self, n: int) -> None:
        """Change the batch knob; takes effect at the next step."""
        if n == self.max_num_seqs:
            return
        self.max_num_seqs = n
        if self._stretch is not None and self._decodes and not self._prefills and self._can_admit():
            self._end_early()

    def _on_cap_change(self, _gpu: SimGpu) -> None:
        if self._stretch is not None and not self._prefills:
            self._end_early()

    # ----- telemetry --------------------------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    def tokens_generated_now(self) -> int:
        """Output tokens sampled up to the current time, counting finished iterations of the stretch in flight."""
        if self._stretch is None or self._prefills:
            return self.tokens_generated
        done = self._stretch.iterations_done_by(self.env.now - self._start_s)
        return self.tokens_generated + done * len(self._decodes)

    def batch_size_now(self) -> int:
        """Sequences in the step running now (0 when idle)."""
        return len(self._decodes) + len(self._prefills) if self._stretch is not None else 0

    # ----- KV blocks --------------------------------------------------------------------------------------
    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    def _reserve(self, req: Request, tokens: int) -> None:
        nb = self._blocks(tokens)
        self.used_blocks += nb - req.blocks
        req.blocks = nb

    def _release(self, req: Request) -> None:
        self.used_blocks -= req.blocks
        req.blocks = 0

    def _can_admit(self) -> bool:
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        head = self.waiting[0]
        chunk = min(head.num_tokens - head.computed, self.token_budget)
        return self._blocks(head.computed + chunk) - head.blocks <= self._free_blocks()

    def _preempt_last(self) -> Request:
        victim = self.running.pop()
        self._release(victim)
        victim.computed = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    # ----- scheduling -------------------------------------------------------------------------------------
    def _plan(self) -> None:
        """Choose the next step (or stretch) and start it."""
        budget = self.token_budget
        decodes: list[Request] = []
        prefills: list[tuple[Request, int]] = []
        preempted = False
        i = 0
        while i < len(self.running):
            req = self.running[i]
            todo = req.num_tokens - req.computed
            n = 1 if todo == 1 else min(todo, budget)
            if n <= 0:
                i += 1
                continue
            need = self._blocks(req.computed + n) - req.blocks
            self_preempted = False
            while need > self._free_blocks():
                victim = self._preempt_last()  # the most recently admitted, always at or after index i
                preempted = True
                if victim is req:
                    self_preempted = True
                    break
            if self_preempted:
                break
            self._reserve(req, req.computed + n)
            budget -= n
            if todo == 1:
                decodes.append(req)
            else:
                prefills.append((req, n))
            i += 1
        if not preempted:
            while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
                req = self.waiting[0]
                n = min(req.num_tokens - req.computed, budget)
                if self._blocks(req.computed + n) - req.blocks > self._free_blocks():
                    break
                self.waiting.popleft()
                self.running.append(req)
                self._reserve(req, req.computed + n)
                budget -= n
                if req.num_tokens - req.computed == 1:
                    decodes.append(req)
                else:
                    prefills.append((req, n))
        if not decodes and not prefills:
            self._stretch = None
            for gpu in self.gpus:
                gpu.begin_segment(None)
            return
        self._decodes, self._prefills = decodes, prefills
        if prefills:
            self._start(self._mixed_step(decodes, prefills))
        else:
            self._start(self._decode_stretch(decodes))

    def _cap_w(self) -> float:
        return min(g.get_power_limit_w() for g in self.gpus)

    def _windowed(self, ctx: int) -> int:
        w = self.phys.model.sliding_window
        return min(ctx, w) if w else 0

    def _mixed_step(self, decodes: list[Request], prefills: list[tuple[Request, int]]) -> Stretch:
        pairs = kv = 0.0
        pairs_w = kv_w = 0.0
        for r in decodes:
            ctx = r.computed + 1
            pairs += ctx
            kv += ctx
            pairs_w += self._windowed(ctx)
            kv_w += self._windowed(ctx)
        logits = len(decodes)
        for r, c in prefills:
            s = r.computed
            pairs += c * s + c * (c + 1) / 2.0
            kv += s + c
            pairs_w += c * self._windowed(s + (c + 1) // 2)
            kv_w += self._windowed(s + c)
            if s + c == r.num_tokens:
                logits += 1
        n_tokens = len(decodes) + sum(c for _, c in prefills)
        work = self.phys.step_work(n_tokens, logits, len(decodes) + len(prefills), pairs, kv, pairs_w, kv_w)
        clock = self.phys.clock_for_cap((work,), self._cap_w())
        return Stretch(self.phys, work, 0.0, 0.0, clock, 1)

    def _decode_stretch(self, decodes: list[Request]) -> Stretch:
        n = len(decodes)
        k = min(r.output_tokens - r.generated for r in decodes)
        # KV blocks for k more tokens per sequence; shorten the stretch when the cache would overflow.
        free = self._free_blocks()
        bs = self.block_size
        if n * (k // bs + 1) > free:
            def extra(m: int) -> int:
                return sum(self._blocks(r.computed + m) - r.blocks for r in decodes)
            lo, hi = 1, k  # extra(1) fits: it was reserved by _plan
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if extra(mid) <= free:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
        for r in decodes:
            self._reserve(r, r.computed + k)
        ctx = sum(r.computed for r in decodes) + n
        ctx_w = sum(self._windowed(r.computed + 1) for r in decodes)
        work0 = self.phys.step_work(n, n, n, ctx, ctx, ctx_w, ctx_w)
        c1 = self.phys.attn_compute_s(n)
        m1 = self.phys.kv_read_s(n)
        cap = self._cap_w()
        if k > 1:
            last = StepWork(work0.compute_s + c1 * (k - 1), work0.memory_s + m1 * (k - 1), work0.fixed_s)
            clock = self.phys.clock_for_cap((work0, last), cap)
        else:
            clock = self.phys.clock_for_cap((work0,), cap)
        return Stretch(self.phys, work0, c1, m1, clock, k)

    def _start(self, stretch: Stretch) -> None:
        self._stretch = stretch
        self._start_s = self.env.now
        self._iter_done = 0
        self._replan = False
        for gpu in self.gpus:
            gpu.begin_segment(stretch)
        self._token += 1
        if self.iteration_stepping:
            self._schedule(stretch.iter_time(0))
        else:
            self._schedule(stretch.time_of(stretch.iterations))

    def _schedule(self, delay: float) -> None:
        token = self._token
        self.timer_events += 1
        self.env.timeout(delay).callbacks.append(lambda _ev: self._on_timer(token))

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
        s.iterations = m
        self._token += 1
        self._schedule(self._start_s + s.time_of(m) - self.env.now)

    def _on_timer(self, token: int) -> None:
        if token != self._token:
            return  # superseded by an early end
        s = self._stretch
        assert s is not None
        if self.iteration_stepping:
            self._iter_done += 1
            if self._iter_done < s.iterations and not self._replan:
                self._token += 1
                self._schedule(s.iter_time(self._iter_done))
                return
            s.iterations = self._iter_done
        self._finish_stretch(s.iterations)
        self._plan()

    def _finish_stretch(self, m: int) -> None:
        now = self.env.now
        self.iterations += m
        finished: list[Request] = []
        for req in self._decodes:
            req.computed += m
            self._sample(req, m, now)
            self._reserve(req, req.computed)
            if req.generated >= req.output_tokens:
                finished.append(req)
        for req, chunk in self._prefills:
            req.computed += chunk
            if req.computed == req.num_tokens:
                self._sample(req, 1, now)
                if req.generated >= req.output_tokens:
                    finished.append(req)
        self._stretch = None
        self._decodes, self._prefills = [], []
        for req in finished:
            self.running.remove(req)
            self._release(req)
            req.finish_s = now
            self.on_finish(req)

    def _sample(self, req: Request, n: int, now: float) -> None:
        if req.generated == 0:
            req.first_token_s = now
        req.generated += n
        self.tokens_generated += n


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
    return int(math.floor(free / per_token)) * par.data
