"""Physics v1: how long one engine step takes and what power the GPUs draw while doing it.

A step serves a batch: some prefill tokens (chunked) and some decode tokens, each attending over its
context. Per GPU of a replica (the busiest rank under expert parallelism) its parts are

* compute  ``C / (peak · eff_c · f)`` — tensor-core work scales with the SM clock fraction ``f``;
* memory   ``M / (bw · eff_m · g(f))`` — weights actually read (dense part, plus the distinct experts the
  batch touches: under expert parallelism, those of the rank that holds the most of them) and KV bytes; HBM
  does not speed up with the SM clock, but below a knee clock the SMs cannot keep it saturated:
  ``g(f) = min(1, f / knee)``; where vLLM runs the experts with its default fused-MoE config rather than a tuned
  one, the expert weights stream slower in the steps whose partly empty tiles it pads (``sim.catalog.fused_moe``);
* communication — TP all-reduces (two per layer) and EP all-to-alls (dispatch + combine per MoE layer),
  bytes over link bandwidth plus a latency per collective; independent of the SM clock;
* kernel latency ``L·λ / f`` — ``L`` layers, each costing ``λ`` of launch gaps and latency-bound small kernels
  at the max clock; it does not overlap the roofline and, being GPU time, stretches as the clock falls;
* a fixed host overhead per step, a small one per running sequence (scheduling, sampling) and one per newly
  admitted request (tokenisation, request set-up);
* kernel launches: vLLM replays a step of at most ``cuda_graph_max_tokens`` tokens as a captured CUDA graph;
  a larger step runs eagerly, its kernels launched one by one from the host at ``eager_launch_s`` per layer.

Within a kernel compute and memory overlap (roofline: the larger wins), but a step's kernels run one after
another: the GEMMs stream the weights while they compute, and attention, a kernel of its own, reads the KV
cache, memory-bound in decode (a few FLOPs per byte), after them. So the step's roofline is
``max(C/f + K/g, M/g)`` (``K``, the KV bytes' time, is part of ``M``): the GEMMs' roofline plus the KV read.
Held out on the ML.ENERGY H100 rows, a single ``max(C/f, M/g)`` that hid the KV read under the GEMMs' compute
put Llama-3.1-70B's batches of 512-1,024 sequences 23-31 % slow. Kernel latency adds to the roofline. An eager
step's GPU part lasts at least its launch time (the GPU cannot run ahead of the host that feeds it);
communication and host overhead add.

Energy per step: ``t·(P_idle + P_base·f·v²) + P_c·v²·C/(peak·eff_c) + P_m·M/(bw·eff_m) + P_kv·K/(bw·eff_m)``:
a static part over the step, energy per FLOP growing with the square of the core voltage ``v(f)`` (DVFS:
dynamic power ``∝ f·V²``; the voltage sits at a floor below a knee clock and rises linearly to 1 at the max
clock), energy per byte constant, and more of it per byte of KV cache ``K`` (part of ``M``) than per byte of
weights: attention gathers the cache in pages and works on every byte it reads, where a weight byte streams
through a GEMM (Argonne H100, batch 64: Llama-2-7B, whose multi-head cache is 4x Llama-3-8B's, draws 595 W
against 455 W). Power is energy over time. A power cap lowers the clock until the step's power fits; where
even the lowest clock draws more than the cap, the GPU gates its clock part of the time (duty cycling: an
effective clock below the lowest one, the voltage at its floor), so the lowest power limit holds under any load,
as measured (PALS A100: 98-101 W under a 100 W cap at every batch). Where the natural draw is below the cap the
cap changes nothing.

The time a kernel runs, which NVML's utilization counts, is a step less its host wait and, on an eager step the
host launches more slowly than the GPU runs it, less the GPU's wait for its launches (``step_busy_s``).

During a pure-decode stretch the composition is fixed and every sequence's context grows by one token per
iteration, so compute and memory work are linear in the iteration index ``j``: the stretch's duration,
energy, kernel time, and the number of iterations done by any time have closed forms (``Stretch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from sim.catalog.fused_moe import DEFAULT_CONFIG_TILE_TOKENS, local_moe_shape
from sim.catalog.gpus import GpuSpec
from sim.catalog.models import ModelSpec
from sim.routing import ExpertPopularity, busiest_rank_factor

ACT_BYTES = 2.0  # activations exchanged in bf16
EXPERT_LATENCY_COLUMNS = 1024.0  # ``expert_latency_s`` is quoted per this many output columns of an expert's GEMMs


@dataclass(frozen=True)
class Parallelism:
    """How a replica is split over GPUs (vLLM semantics)."""

    tensor: int = 1
    data: int = 1
    expert: bool = False

    @property
    def num_gpus(self) -> int:
        """GPUs in one replica."""
        return self.tensor * self.data


@dataclass(frozen=True)
class EngineOverheads:
    """Serving-engine costs beyond the roofline (fitted by ``pals calibrate`` per GPU type and engine).

    ``step_s``, ``per_seq_s`` and ``per_request_s`` are host (CPU) time while the GPU waits;
    ``layer_latency_s`` is GPU time per layer per step at the max clock (kernel launch gaps, latency-bound
    small kernels) and scales with ``1 / clock``; ``moe_tile_tokens`` is the token tile of the fused-MoE
    GEMM: each touched expert computes whole tiles, so a few tokens per expert cost a full tile;
    ``expert_bandwidth_fraction`` is the share of the achieved HBM bandwidth the fused-MoE kernels reach when
    streaming expert weights (many small GEMMs, one per touched expert); ``expert_latency_s`` is GPU time per
    touched expert per MoE layer at the max clock for every 1,024 output columns of its GEMMs on one GPU
    (``2·width`` for gate and up, ``hidden`` for down): the GEMMs are tiled over their output columns and each
    tile has a fixed cost (scheduling, pipeline fill), which makes fine-grained MoE models (many small experts)
    slower than their bytes alone say, and a wide expert dearer per touch than a narrow slice;
    ``expert_compute_fraction`` is the share of the dense GEMMs' FLOP rate the fused-MoE kernels reach on wide
    experts, and ``expert_gemm_half_dim`` the expert GEMM width (intermediate size on one GPU) at which they reach
    half of that: an expert slice ``n`` wide computes at ``fraction · n / (n + half_dim)`` of the dense rate
    (narrow GEMMs do little work per weight tile loaded), so a 256-wide slice of a small expert under TP4 is slow
    and a 3,584-wide slice of a Mixtral expert is not. Both come from the architecture (the config's
    ``moe_intermediate_size``), not from a per-model factor. ``eager_launch_s`` is host time per layer to launch
    the kernels of a step too large for a captured CUDA graph, one by one (Python dispatch, Triton launchers);
    the GPU part of such a step takes at least that long. ``default_moe_config_slowdown`` is how much slower
    the fused-MoE kernels stream expert weights when vLLM runs them with its default config instead of a tuned
    one, while the step's tokens exceed the local experts and the default's 64-token tiles are not yet full (see
    ``sim.catalog.fused_moe``; 1.26: vLLM PR #37814's kernel benchmark at 32 tokens on 16 local experts). Like
    ``expert_bandwidth_fraction`` it scales the expert stream's time, and with it the HBM energy the stream is
    charged (memory power over the stream's time): the SMs keep issuing loads for as long as it lasts.
    """

    step_s: float = 0.002
    per_seq_s: float = 2e-5
    per_request_s: float = 0.0
    layer_latency_s: float = 0.0
    moe_tile_tokens: float = 16.0
    expert_bandwidth_fraction: float = 1.0
    expert_latency_s: float = 0.0
    expert_gemm_half_dim: float = 0.0
    expert_compute_fraction: float = 1.0
    eager_launch_s: float = 0.0
    default_moe_config_slowdown: float = 1.26


class StepWork(NamedTuple):
    """Clock-independent description of one step on the busiest GPU.

    ``compute_s``, ``memory_s`` and ``latency_s`` are times at the max clock (there the GPU part of a step is
    ``max(compute_s + kv_s, memory_s) + latency_s``; ``ReplicaPhysics.step_time_s`` gives it at any clock);
    ``fixed_s`` is communication plus host time; ``kv_s`` is the part of ``memory_s`` that reads the KV cache;
    ``launch_s`` is the host time to launch an eager step's kernels (0 for a step replayed as a CUDA graph), a
    floor under the GPU part of the step; ``host_s`` is the host part of ``fixed_s`` (scheduling, per-sequence
    and per-request work), during which no kernel runs.
    """

    compute_s: float
    memory_s: float
    fixed_s: float
    latency_s: float = 0.0
    kv_s: float = 0.0  # the KV-cache part of ``memory_s`` (it costs more energy per byte)
    launch_s: float = 0.0  # eager steps: host launch time, a floor under the GPU part of the step
    host_s: float = 0.0  # the host part of ``fixed_s``: the GPU waits (see ``GpuSpec.host_power_share``)


MIN_DUTY_CYCLE = 0.05  # below its lowest clock a capped GPU gates its clock down to this share of the time
CUDA_GRAPH_MAX_TOKENS = 512  # the largest step vLLM V1 captures as a CUDA graph by default
CLOCK_TOLERANCE = 1e-9  # the governor's clock (fraction of the max) is resolved to this
CAP_TOLERANCE_W = 1e-3  # a clock whose peak power is within a milliwatt below the cap is the answer


def default_cuda_graph_max_tokens(max_num_seqs: int) -> int:
    """The largest step vLLM V1 replays as a CUDA graph by default: min(2 x ``max_num_seqs``, 512) tokens."""
    return min(2 * max_num_seqs, CUDA_GRAPH_MAX_TOKENS)


def voltage_squared(gpu: GpuSpec, f: float) -> float:
    """``v(f)²``: the core voltage at clock fraction ``f`` relative to the max clock's, squared."""
    floor, knee = gpu.voltage_floor, gpu.voltage_knee
    v = floor if f <= knee else floor + (1.0 - floor) * (f - knee) / (1.0 - knee)
    return v * v


class ReplicaPhysics:
    """Step-time and power model of one replica: a model on ``parallelism.num_gpus`` GPUs of one type."""

    def __init__(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        parallelism: Parallelism,
        overheads: EngineOverheads | None = None,
        popularity: ExpertPopularity | None = None,
        memory_clock_knee: float = 0.5,
        cuda_graph_max_tokens: int = CUDA_GRAPH_MAX_TOKENS,
        default_moe_config: bool = False,
    ) -> None:
        self.model = model
        self.gpu = gpu
        self.par = parallelism
        self.overheads = overheads or EngineOverheads()
        self.memory_clock_knee = memory_clock_knee
        self.cuda_graph_max_tokens = cuda_graph_max_tokens
        if model.is_moe:
            self.popularity = popularity or ExpertPopularity.uniform(model.num_experts, model.experts_per_token)
        else:
            self.popularity = None
        tp, dp = parallelism.tensor, parallelism.data
        ranks = tp * dp
        self.ep_ranks = ranks if (parallelism.expert and model.is_moe) else 1
        self._flops_rate = gpu.peak_bf16_flops * gpu.compute_efficiency  # FLOP/s at max clock
        self._bw = gpu.hbm_bandwidth_bytes_per_s * gpu.memory_efficiency
        self._link = gpu.nvlink_bandwidth_bytes_per_s * gpu.link_efficiency
        m = model
        lm_head = m.vocab_size * m.hidden_size
        # FLOPs per token on one GPU.
        self._dense_flops_per_token = 2.0 * m.dense_params / ranks
        self._lm_head_flops_per_row = 2.0 * lm_head / ranks
        self._tile = max(1.0, self.overheads.moe_tile_tokens)
        # Each GPU holds whole experts under expert parallelism, a 1/tp slice of every expert otherwise.
        expert_shards = 1 if self.ep_ranks > 1 else tp
        expert_width = m.expert_intermediate_size / expert_shards  # an expert's width on one GPU
        # A touched expert's GEMMs are tiled over their output columns (2·width for gate and up, hidden for down),
        # each tile with a fixed cost: the latency is quoted per 1,024 of those columns.
        self._expert_latency_per_distinct = (m.num_moe_layers * self.overheads.expert_latency_s
                                             * (2.0 * expert_width + m.hidden_size) / EXPERT_LATENCY_COLUMNS)
        # Expert GEMMs run at n / (n + half_dim) of the dense rate, n = expert_width.
        slowdown = (1.0 + self.overheads.expert_gemm_half_dim / expert_width) if expert_width > 0 else 1.0
        slowdown /= max(1e-3, self.overheads.expert_compute_fraction)
        self._expert_flops_per_row = 2.0 * m.num_moe_layers * m.expert_params / ranks * slowdown
        # Attention FLOPs per (query token x cached token), per GPU; heads split over TP, sequences over DP.
        self._attn_flops_full = m.attn_flops_per_context_token / ranks
        self._attn_flops_windowed = m.attn_flops_per_context_token_windowed / ranks
        # Weight bytes streamed per step, per GPU (input embedding is gathered, not streamed).
        self._dense_bytes = (m.dense_params + lm_head) * m.weight_bytes_per_param / tp
        # Bytes per expert the busiest GPU touches (whole or a slice, as it holds them).
        self._expert_bytes_per_distinct = (m.num_moe_layers * m.expert_weight_bytes / expert_shards
                                           / max(1e-3, self.overheads.expert_bandwidth_fraction))
        # vLLM's default fused-MoE config (no tuned file for the local shape) streams the expert weights slower once a
        # step has more tokens than local experts, until its tiles are full (DEFAULT_CONFIG_TILE_TOKENS per expert).
        self.default_moe_config = default_moe_config and m.is_moe
        self._default_config_tokens = (local_moe_shape(m, tp, dp, parallelism.expert)[0],  # busiest rank's experts
                                       DEFAULT_CONFIG_TILE_TOKENS * m.num_experts / max(1, m.experts_per_token))
        self._expert_bytes_default_config = self._expert_bytes_per_distinct * self.overheads.default_moe_config_slowdown
        # KV bytes per cached token, per GPU: KV heads split over TP (replicated beyond the KV head count;
        # MLA's latent cache is not split), sequences split over DP.
        kv_shards = 1 if m.kv_latent else min(tp, m.num_kv_heads)
        self._kv_bytes_full = m.kv_bytes_per_token / kv_shards / dp
        self._kv_bytes_windowed = m.kv_bytes_per_token_windowed / kv_shards / dp
        self.kv_bytes_per_token_per_gpu = m.kv_bytes_per_token / kv_shards
        # Communication per token (bytes per GPU link) and number of collectives per step.
        hidden_bytes = m.hidden_size * ACT_BYTES / dp
        self._allreduce_s_per_token = 0.0
        self._collectives = 0
        all_to_all = self.ep_ranks > 1 and dp > 1  # vLLM uses all-to-all kernels only with data parallelism
        if tp > 1:
            n_ar = 2 * m.num_layers if not all_to_all else m.num_layers + (m.num_layers - m.num_moe_layers)
            self._allreduce_s_per_token = n_ar * 2.0 * (tp - 1) / tp * hidden_bytes / self._link
            self._collectives += n_ar
        self._alltoall_s_per_token = 0.0
        if all_to_all:
            ep = self.ep_ranks
            self._alltoall_s_per_token = (m.num_moe_layers * 2.0 * m.experts_per_token * (ep - 1) / ep
                                          * hidden_bytes / self._link)
            self._collectives += 2 * m.num_moe_layers
        self._collective_latency_s = self._collectives * gpu.collective_latency_s
        self._latency_s = m.num_layers * self.overheads.layer_latency_s
        self._eager_launch_s = m.num_layers * self.overheads.eager_launch_s
        self._distinct_cache: dict[int, float] = {}
        self._busiest_cache: dict[int, float] = {}
        self._p_full = gpu.idle_power_w + gpu.active_base_power_w  # static power at the max clock
        self._host_w = gpu.host_power_share * gpu.active_base_power_w  # above idle while waiting on the host
        self._host_minus_base_w = self._host_w - gpu.active_base_power_w  # a host wait at the max clock
        # The lowest effective clock the governor may choose: the lowest clock, gated down to MIN_DUTY_CYCLE.
        self.lowest_clock = gpu.min_clock_fraction * MIN_DUTY_CYCLE
        self._p_compute = gpu.compute_power_w
        self._p_memory = gpu.memory_power_w
        self._p_kv = gpu.kv_power_w

    # ----- work of one step ---------------------------------------------------------------------------
    def distinct_experts(self, num_tokens: int) -> float:
        """Expected distinct experts per MoE layer touched by ``num_tokens`` tokens."""
        if self.popularity is None:
            return 0.0
        d = self._distinct_cache.get(num_tokens)
        if d is None:
            d = self.popularity.expected_distinct(num_tokens)
            self._distinct_cache[num_tokens] = d
        return d

    def busiest_gpu_experts(self, num_tokens: int) -> float:
        """Experts per MoE layer whose weights the busiest GPU reads: under expert parallelism the expected
        most touched on one rank, otherwise a slice of every touched expert (``distinct_experts``)."""
        if self.popularity is None or self.ep_ranks <= 1:
            return self.distinct_experts(num_tokens)
        d = self._busiest_cache.get(num_tokens)
        if d is None:
            d = self.popularity.busiest_rank_distinct(num_tokens, self.ep_ranks)
            self._busiest_cache[num_tokens] = d
        return d

    def expert_bytes_per_touched(self, num_tokens: int) -> float:
        """HBM bytes streamed, at the achieved rate, per expert the busiest GPU touches in a step of ``num_tokens``
        tokens: its weights over every MoE layer (a slice under tensor parallelism), scaled up by the fused-MoE
        kernels' bandwidth shortfall, and by ``default_moe_config_slowdown`` where vLLM's default config runs
        partly empty 64-token tiles (more tokens than local experts, fewer than 64 per expert)."""
        lo, hi = self._default_config_tokens
        if self.default_moe_config and lo < num_tokens < hi:
            return self._expert_bytes_default_config
        return self._expert_bytes_per_distinct

    def padded_expert_rows(self, num_tokens: int, distinct: float) -> float:
        """Token rows the fused-MoE GEMMs compute per MoE layer: whole tiles for every touched expert.

        ``n`` assignments per touched expert take ``max(1, n/tile + 1/2)`` tiles (half a tile of rounding on
        average once past the first), so the padding vanishes for large batches and dominates for small ones.
        """
        if distinct <= 0.0:
            return 0.0
        per_expert = num_tokens * self.model.experts_per_token / distinct / self._tile
        return distinct * self._tile * max(1.0, per_expert + 0.5)

    def step_work(self, num_tokens: int, num_logits: int, num_seqs: int, attn_pairs_full: float,
                  kv_read_full: float, attn_pairs_windowed: float = 0.0, kv_read_windowed: float = 0.0,
                  num_new: int = 0) -> StepWork:
        """Work of one step on the busiest GPU.

        ``num_tokens``: tokens processed (prefill chunk tokens + one per decoding sequence);
        ``num_logits``: rows that reach the LM head; ``num_seqs``: sequences in the step;
        ``attn_pairs_*``: (query token, cached token) pairs attended, in full and sliding-window layers;
        ``kv_read_*``: cached tokens whose KV is read from HBM (each sequence's context once);
        ``num_new``: requests whose prefill starts in this step. A step of more than ``cuda_graph_max_tokens``
        tokens runs eagerly (``launch_s``).
        """
        flops = (self._dense_flops_per_token * num_tokens + self._lm_head_flops_per_row * num_logits
                 + self._attn_flops_full * attn_pairs_full + self._attn_flops_windowed * attn_pairs_windowed)
        kv = self._kv_bytes_full * kv_read_full + self._kv_bytes_windowed * kv_read_windowed
        mem = self._dense_bytes + kv
        expert_flops = 0.0
        latency = self._latency_s
        if self.popularity is not None:
            distinct = self.distinct_experts(num_tokens)
            expert_flops = (self._expert_flops_per_row * self.padded_expert_rows(num_tokens, distinct)
                            * busiest_rank_factor(num_tokens, self.model.experts_per_token, self.ep_ranks))
            touched = self.busiest_gpu_experts(num_tokens)
            mem += self.expert_bytes_per_touched(num_tokens) * touched
            latency += self._expert_latency_per_distinct * touched
        comm = (self._allreduce_s_per_token + self._alltoall_s_per_token) * num_tokens + self._collective_latency_s
        o = self.overheads
        host = o.step_s + o.per_seq_s * num_seqs + o.per_request_s * num_new
        launch = self._eager_launch_s if num_tokens > self.cuda_graph_max_tokens else 0.0
        return StepWork((flops + expert_flops) / self._flops_rate, mem / self._bw, comm + host, latency, kv / self._bw,
                        launch, host)

    def kv_read_s(self, cached_tokens_full: float, cached_tokens_windowed: float = 0.0) -> float:
        """HBM time at full bandwidth to read this many cached tokens' KV once."""
        return (self._kv_bytes_full * cached_tokens_full + self._kv_bytes_windowed * cached_tokens_windowed) / self._bw

    def attn_compute_s(self, ctx_full: float, ctx_windowed: float = 0.0) -> float:
        """Tensor-core time at max clock for attention over this many (query, cached token) pairs."""
        return (self._attn_flops_full * ctx_full + self._attn_flops_windowed * ctx_windowed) / self._flops_rate

    # ----- clock and power ----------------------------------------------------------------------------
    def memory_speed(self, f: float) -> float:
        """Fraction of the achieved HBM bandwidth reachable at SM clock fraction ``f``."""
        return min(1.0, f / self.memory_clock_knee)

    def step_time_s(self, w: StepWork, f: float) -> float:
        """Duration of a step at clock fraction ``f``."""
        s = self.memory_speed(f)
        gpu_s = max(w.compute_s / f + w.kv_s / s, w.memory_s / s) + w.latency_s / f
        return (gpu_s if gpu_s > w.launch_s else w.launch_s) + w.fixed_s

    def step_busy_s(self, w: StepWork, f: float, t: float | None = None) -> float:
        """Time a kernel runs during a step at clock fraction ``f`` (``t``: its duration, if known): all of it
        but the host wait and, on an eager step the host cannot launch fast enough, the GPU's wait for its
        launches. This is what NVML's utilization counts (the share of time one or more kernels execute)."""
        if t is None:
            t = self.step_time_s(w, f)
        s = self.memory_speed(f)
        gpu_s = max(w.compute_s / f + w.kv_s / s, w.memory_s / s) + w.latency_s / f
        return t - w.host_s - (w.launch_s - gpu_s if w.launch_s > gpu_s else 0.0)

    def step_energy_j(self, w: StepWork, f: float, t: float | None = None) -> float:
        """Energy of one GPU for a step at clock fraction ``f`` (``t``: its duration, if known).

        Idle power throughout; the clocked base power while kernels run (and during communication); a flat
        ``host_power_share`` of the max-clock base while the GPU waits on the host (SMs gated, HBM and links
        awake); the work's compute, memory and KV energy.
        """
        g = self.gpu
        if t is None:
            t = self.step_time_s(w, f)
        v2 = voltage_squared(g, f)
        base_w = g.active_base_power_w * f * v2
        return t * (g.idle_power_w + base_w) - w.host_s * (base_w - self._host_w) \
            + g.compute_power_w * v2 * w.compute_s + g.memory_power_w * w.memory_s + g.kv_power_w * w.kv_s

    def step_power_w(self, w: StepWork, f: float) -> float:
        """Average power of one GPU over a step at clock fraction ``f``."""
        t = self.step_time_s(w, f)
        return self.step_energy_j(w, f, t) / t

    def clock_for_cap(self, work: StepWork, cap_w: float) -> float:
        """Highest clock fraction at which one step draws at most ``cap_w`` (see ``clock_for_stretch``)."""
        return self.clock_for_stretch(work, 0.0, 0.0, 1, cap_w)

    def stretch_peak_power_w(self, w0: StepWork, c1: float, m1: float, k: int, f: float) -> float:
        """Highest per-iteration power of a stretch of ``k`` iterations at clock fraction ``f``.

        Within the iterations where a step stays compute-bound (or memory-bound, or held at its launch floor),
        its power is a ratio of two linear functions of ``j`` and so monotone: the peak is at an end of the
        stretch or beside an iteration where the step turns from one regime to another.
        """
        c0, m0, x, lat, kv0, launch, host = w0
        js = [0] if k <= 1 else [0, k - 1]
        s = self.memory_speed(f)
        lat_s = lat / f
        # The two roofline lines: compute plus the KV read, and all HBM traffic (see ``step_time_s``).
        a1, b1, a2, b2 = c0 / f + kv0 / s, c1 / f + m1 / s, m0 / s, m1 / s
        if k > 2:
            if b1 != b2:
                jx = (a1 - a2) / (b2 - b1)
                if 0.0 < jx < k - 1:
                    js += [math.floor(jx), math.ceil(jx)]
            if launch > 0.0:
                jl = _floor_iterations(a1 + lat_s, b1, a2 + lat_s, b2, launch, k)
                if 0 < jl < k:
                    js += [jl - 1, jl]
        # ``step_power_w`` of each candidate iteration, inlined (the same terms; the roofline from its two lines).
        g = self.gpu
        v2 = voltage_squared(g, f)
        clocked_w = g.active_base_power_w * f * v2
        base_w = g.idle_power_w + clocked_w
        host_e = host * (self._host_w - clocked_w)  # the host wait draws its flat power, not the clocked base
        compute_w = g.compute_power_w * v2
        memory_w = g.memory_power_w
        kv_w = g.kv_power_w
        peak = -math.inf
        for j in js:
            c, m = c0 + c1 * j, m0 + m1 * j
            t = max(a1 + b1 * j, a2 + b2 * j) + lat_s
            t = (t if t > launch else launch) + x
            p = (t * base_w + host_e + compute_w * c + memory_w * m + kv_w * (kv0 + m1 * j)) / t
            if p > peak:
                peak = p
        return peak

    def clock_for_stretch(self, w0: StepWork, c1: float, m1: float, k: int, cap_w: float) -> float:
        """Highest clock fraction at which every iteration of a stretch draws at most ``cap_w``.

        The max clock (1.0) when the natural draw fits; below the lowest clock where even that draws too much
        (an effective, duty-cycled clock, down to ``lowest_clock``). The governor holds this clock until the
        composition or the cap changes.
        """
        # Natural draw at the max clock (inlined: the common, uncapped case). At f = 1 the memory speed is 1.
        c0, m0, x, lat, kv0, launch, host = w0
        p_full, p_c, p_m, p_kv = self._p_full, self._p_compute, self._p_memory, self._p_kv
        host_e = host * self._host_minus_base_w
        js = [0] if k <= 1 else [0, k - 1]
        a1, b1 = c0 + kv0, c1 + m1  # compute plus the KV read (see ``step_time_s``); all HBM traffic: m0, m1
        if k > 2:
            if b1 != m1:
                jx = (a1 - m0) / (m1 - b1)
                if 0.0 < jx < k - 1:
                    js += [math.floor(jx), math.ceil(jx)]
            if launch > 0.0:
                jl = _floor_iterations(a1 + lat, b1, m0 + lat, m1, launch, k)
                if 0 < jl < k:
                    js += [jl - 1, jl]
        for j in js:
            c, m = c0 + c1 * j, m0 + m1 * j
            t = a1 + b1 * j
            t = (t if t > m else m) + lat
            t = (t if t > launch else launch) + x
            p_max_clock = p_full + (host_e + p_c * c + p_m * m + p_kv * (kv0 + m1 * j)) / t
            if p_max_clock > cap_w:
                break
        else:
            return 1.0
        # Power rises with the clock, so the highest clock within the cap is the root of peak power - cap in
        # [lowest effective clock, 1]. A first trial a step below the max clock, from the slope there of dynamic
        # power ∝ f·v(f)² (1.25x: aiming to land just inside the cap), usually brackets the root tightly; then
        # Illinois regula falsi (a secant step that halves the stale end's residual when one end is kept
        # twice) reaches the precision of a bisection to ~1e-9 of the clock range in a few power evaluations
        # instead of thirty. ``lo`` is always a feasible clock.
        g = self.gpu
        f_min = self.lowest_clock
        hi, r_hi = 1.0, p_max_clock - cap_w  # an iteration over the cap at the max clock (the peak may be higher)
        dv = (1.0 - g.voltage_floor) / max(1e-9, 1.0 - g.voltage_knee)  # dv/df at the max clock, where v = 1
        slope_w = (p_max_clock - g.idle_power_w) * (1.0 + 2.0 * dv)
        lo = max(f_min, 1.0 - 1.25 * r_hi / slope_w) if slope_w > 0.0 else f_min
        r_lo = self.stretch_peak_power_w(w0, c1, m1, k, lo) - cap_w
        if r_lo > 0.0:
            hi, r_hi = lo, r_lo
            if lo == f_min:
                return lo
            lo = f_min
            r_lo = self.stretch_peak_power_w(w0, c1, m1, k, lo) - cap_w
            if r_lo > 0.0:
                return lo  # nothing fits (a cap at or below the idle draw): the lowest effective clock
        kept = 0
        for _ in range(60):
            if hi - lo <= CLOCK_TOLERANCE:
                break
            f = (lo * r_hi - hi * r_lo) / (r_hi - r_lo)
            if not lo < f < hi:
                f = 0.5 * (lo + hi)
            r = self.stretch_peak_power_w(w0, c1, m1, k, f) - cap_w
            if r <= 0.0:
                lo, r_lo = f, r
                if kept == -1:
                    r_hi *= 0.5
                kept = -1
                if r > -CAP_TOLERANCE_W:  # within a milliwatt of the cap: nothing left to gain
                    break
            else:
                hi, r_hi = f, r
                if kept == 1:
                    r_lo *= 0.5
                kept = 1
        return lo


def duration_runs(shapes: np.ndarray, iterations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The durations of the first ``iterations[i]`` iterations of stretches of ``Stretch.shape`` ``shapes[i]``, as
    runs each linear in the iteration index: ``(first_s, last_s, count)`` arrays, three runs per stretch (those
    held at the launch floor, then those where one roofline term rules, then the other; some empty)."""
    a1, b1, a2, b2, floor, floor_n, x = shapes.T
    m = iterations.astype(float)
    n = np.minimum(floor_n, m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # parallel lines never cross: inf
        cross = np.where(b1 != b2, (a1 - a2) / (b2 - b1), np.inf)
    split = np.clip(np.ceil(cross), n, m)

    def t(j: np.ndarray) -> np.ndarray:
        return np.maximum(np.maximum(a1 + b1 * j, a2 + b2 * j), floor) + x

    first = np.concatenate([floor + x, t(n), t(split)])
    last = np.concatenate([floor + x, t(split - 1), t(m - 1)])
    count = np.concatenate([n, split - n, m - split])
    return first, last, count


def _sum_linear(a: float, b: float, lo: int, hi: int) -> float:
    """``sum_{j=lo}^{hi-1} (a + b·j)``."""
    n = hi - lo
    return a * n + b * (hi * (hi - 1) - lo * (lo - 1)) * 0.5 if n > 0 else 0.0


def _floor_iterations(a1: float, b1: float, a2: float, b2: float, floor: float, k: int) -> int:
    """How many of the first ``k`` iterations have ``max(a1 + b1·j, a2 + b2·j) < floor`` (slopes ``>= 0``: they
    are the first ones)."""
    first = k
    for a, b in ((a1, b1), (a2, b2)):
        if a >= floor:
            return 0
        if b > 0.0:
            j = (floor - a) / b
            if j < first:
                first = math.ceil(j)
    return max(0, min(k, first))


def sum_max_linear(a1: float, b1: float, a2: float, b2: float, m: int) -> float:
    """``sum_{j=0}^{m-1} max(a1 + b1·j, a2 + b2·j)`` in closed form."""
    if m <= 0:
        return 0.0
    if b1 == b2:
        a = a1 if a1 >= a2 else a2
        return a * m + b1 * m * (m - 1) * 0.5
    # Line 2 overtakes line 1 (or the reverse) at x; split the sum at the first integer past it.
    x = (a1 - a2) / (b2 - b1)
    split = 0 if x <= 0 else (m if x >= m else math.ceil(x))
    if b2 > b1:  # line 1 wins before the split, line 2 after
        return _sum_linear(a1, b1, 0, split) + _sum_linear(a2, b2, split, m)
    return _sum_linear(a2, b2, 0, split) + _sum_linear(a1, b1, split, m)


class Stretch:
    """``k`` engine iterations with a fixed composition at a fixed clock, in closed form.

    Iteration ``j`` (0-based) has compute time ``(c0 + c1·j)/f`` and memory time ``(m0 + m1·j)/g(f)``
    (attention and KV reads grow by one token per sequence per iteration), the larger of the memory time and
    the compute time plus the KV read's (see ``ReplicaPhysics.step_time_s``; raised to the launch floor of an
    eager step, less the kernel latency), plus fixed time ``x``; its memory energy is
    ``e0 + e1·j`` (weights and the starting KV cache, then the growing cache at the KV energy per byte). A
    prefill-carrying step is a stretch of one iteration with zero slopes.
    """

    __slots__ = ("_a1", "_a2", "_b1", "_b2", "_e_c", "_e_h", "_e_m0", "_e_m1", "_floor", "_floor_n", "_host",
                 "_memo", "_p_static", "_total_e", "_total_t", "c0", "c1", "clock", "iterations", "m0", "m1", "x")

    def __init__(self, phys: ReplicaPhysics, work0: StepWork, c1: float, m1: float, clock: float,
                 iterations: int) -> None:
        c0, m0, x, lat, kv0, launch, host = work0
        x += lat / clock
        floor = launch - lat / clock  # the launch floor under the larger of the two roofline lines
        self.c0, self.c1, self.m0, self.m1, self.x = c0, c1, m0, m1, x
        self.clock = clock
        self.iterations = iterations
        self._host = host
        # Memory energy of iteration j: P_m·(m0 + m1·j) + P_kv·(kv0 + m1·j) (the slope is all KV cache).
        self._e_m0 = phys._p_memory * m0 + phys._p_kv * kv0
        self._e_m1 = (phys._p_memory + phys._p_kv) * m1
        # Iteration j's roofline is the larger of two lines: compute plus the KV read, and all HBM traffic.
        if clock == 1.0:  # uncapped: the common case
            self._a1, self._b1, self._a2, self._b2 = c0 + kv0, c1 + m1, m0, m1
            self._p_static = phys._p_full
            self._e_c = phys._p_compute
            self._e_h = host * phys._host_minus_base_w
        else:
            g = phys.gpu
            s = phys.memory_speed(clock)
            v2 = voltage_squared(g, clock)
            self._a1, self._b1 = c0 / clock + kv0 / s, c1 / clock + m1 / s
            self._a2, self._b2 = m0 / s, m1 / s
            clocked_w = g.active_base_power_w * clock * v2
            self._p_static = g.idle_power_w + clocked_w
            self._e_c = g.compute_power_w * v2
            self._e_h = host * (phys._host_w - clocked_w)
        # Each iteration's host wait draws the flat host power instead of the clocked base: ``_e_h`` per iteration.
        # The first ``_floor_n`` iterations sit at the floor (the roofline terms grow with j, the floor does not).
        self._floor = floor if floor > 0.0 else 0.0
        self._floor_n = _floor_iterations(self._a1, self._b1, self._a2, self._b2, floor, iterations) \
            if floor > 0.0 else 0
        self._total_t = -1.0
        self._total_e = -1.0
        self._memo = (-1.0, 0, 0.0)

    def truncate(self, m: int) -> None:
        """Keep only the first ``m`` iterations (the stretch ended early)."""
        self.iterations = m
        self._floor_n = min(self._floor_n, m)
        self._total_t = self._total_e = -1.0
        self._memo = (-1.0, 0, 0.0)

    def total_time_s(self) -> float:
        """Duration of the whole stretch."""
        if self._total_t < 0:
            self._total_t = self.time_of(self.iterations)
        return self._total_t

    def total_energy_j(self) -> float:
        """Energy of one GPU over the whole stretch."""
        if self._total_e < 0:
            m = self.iterations
            tri = m * (m - 1) / 2.0
            self._total_e = (self.total_time_s() * self._p_static + self._e_c * (self.c0 * m + self.c1 * tri)
                             + (self._e_m0 + self._e_h) * m + self._e_m1 * tri)
        return self._total_e

    def iter_time(self, j: int) -> float:
        """Duration of iteration ``j``."""
        t = max(self._a1 + self._b1 * j, self._a2 + self._b2 * j)
        return (t if t > self._floor else self._floor) + self.x

    def iter_energy(self, j: int) -> float:
        """Energy of one GPU during iteration ``j``."""
        return (self.iter_time(j) * self._p_static + self._e_c * (self.c0 + self.c1 * j)
                + self._e_m0 + self._e_h + self._e_m1 * j)

    def shape(self) -> tuple[float, float, float, float, float, int, float]:
        """The closed form's constants ``(a1, b1, a2, b2, floor, floor_n, x)``: iteration ``j`` lasts
        ``max(a1 + b1·j, a2 + b2·j, floor) + x``, the first ``floor_n`` of them at the floor (see
        ``duration_runs``)."""
        return self._a1, self._b1, self._a2, self._b2, self._floor, self._floor_n, self.x

    def time_of(self, m: int) -> float:
        """Time to run the first ``m`` iterations."""
        n = self._floor_n
        if n <= 0:
            return sum_max_linear(self._a1, self._b1, self._a2, self._b2, m) + self.x * m
        if m <= n:
            return (self._floor + self.x) * m
        # Past the floor iterations the roofline terms rule: the plain sum, less theirs, plus the floor's.
        return (sum_max_linear(self._a1, self._b1, self._a2, self._b2, m) + self.x * m
                + self._floor * n - sum_max_linear(self._a1, self._b1, self._a2, self._b2, n))

    def energy_of(self, m: int, t_m: float | None = None) -> float:
        """Energy of one GPU over the first ``m`` iterations (``t_m``: their duration, if known)."""
        tri = m * (m - 1) / 2.0
        if t_m is None:
            t_m = self.time_of(m)
        return (t_m * self._p_static + self._e_c * (self.c0 * m + self.c1 * tri)
                + (self._e_m0 + self._e_h) * m + self._e_m1 * tri)

    def busy_of(self, m: int, t_m: float | None = None) -> float:
        """Time a kernel runs in the first ``m`` iterations (``t_m``: their duration, if known): their duration
        less each one's host wait and, for those held at the launch floor, the GPU's wait for its launches
        (the floor less the larger roofline term; see ``ReplicaPhysics.step_busy_s``)."""
        if t_m is None:
            t_m = self.time_of(m)
        n = self._floor_n
        if n <= 0:  # the common case: no iteration waits for its launches
            return t_m - self._host * m
        if n > m:
            n = m
        return t_m - self._host * m - (self._floor * n - sum_max_linear(self._a1, self._b1, self._a2, self._b2, n))

    def iter_busy(self, j: int) -> float:
        """Time a kernel runs in iteration ``j``."""
        roofline = max(self._a1 + self._b1 * j, self._a2 + self._b2 * j)
        launch_wait = self._floor - roofline if self._floor > roofline else 0.0
        return self.iter_time(j) - self._host - launch_wait

    def busy_by(self, elapsed_s: float) -> float:
        """Time a kernel runs from the stretch's start to ``elapsed_s`` later (the iteration in flight counted
        pro rata: its host wait spread over it)."""
        if elapsed_s >= self.total_time_s():
            return self.busy_of(self.iterations, self.total_time_s())
        m, t_m = self._done_by(elapsed_s)
        return self.busy_of(m, t_m) + self.iter_busy(m) / self.iter_time(m) * (elapsed_s - t_m)

    def iterations_done_by(self, elapsed_s: float) -> int:
        """Iterations completed within ``elapsed_s`` of the stretch's start (0..iterations)."""
        if elapsed_s >= self.total_time_s():
            return self.iterations
        return self._done_by(elapsed_s)[0]

    def _done_by(self, elapsed_s: float) -> tuple[int, float]:
        """``(m, time_of(m))`` for the largest ``m`` with ``time_of(m) <= elapsed_s`` (memoised)."""
        memo = self._memo
        if memo[0] == elapsed_s:
            return memo[1], memo[2]
        m = self._invert(elapsed_s)
        # The quadratic solve can be off by one from rounding; settle on the exact answer.
        t = self.time_of(m)
        while m > 0 and t > elapsed_s:
            m -= 1
            t = self.time_of(m)
        while m < self.iterations:
            t_next = self.time_of(m + 1)
            if t_next > elapsed_s:
                break
            m += 1
            t = t_next
        self._memo = (elapsed_s, m, t)
        return m, t

    def _invert(self, elapsed_s: float) -> int:
        """Approximate largest m with time_of(m) <= elapsed, from the quadratic of the dominant line."""
        a1, b1, a2, b2, x = self._a1, self._b1, self._a2, self._b2, self.x
        k = self.iterations
        n = self._floor_n
        if n > 0:
            if elapsed_s < (self._floor + x) * n:
                return math.floor(elapsed_s / (self._floor + x))
            # Past the floor iterations: the same elapsed time on the curve without the floor.
            elapsed_s -= self._floor * n - sum_max_linear(a1, b1, a2, b2, n)
        # Which line dominates before and after the split (see sum_max_linear).
        if b1 == b2:
            split = k
            a, b = (a1, b1) if a1 >= a2 else (a2, b2)
        else:
            xs = (a1 - a2) / (b2 - b1)
            split = 0 if xs <= 0 else (k if xs >= k else math.ceil(xs))
            a, b = (a1, b1) if b2 > b1 else (a2, b2)
        lo, rem = 0, elapsed_s
        if 0 < split < k:
            t_split = self.time_of(split)
            if elapsed_s >= t_split:
                a, b = (a2, b2) if b2 > b1 else (a1, b1)
                lo, rem = split, elapsed_s - t_split
        elif split == 0 and b1 != b2:
            a, b = (a2, b2) if b2 > b1 else (a1, b1)
        a += x
        # sum_{j=lo}^{m-1} (a + b j) = rem  ->  (b/2) n^2 + (a + b·lo - b/2) n - rem = 0 with n = m - lo
        p = a + b * lo - b / 2.0
        n = (-p + math.sqrt(p * p + 2.0 * b * rem)) / b if b > 0 else rem / p if p > 0 else k
        m = lo + math.floor(n)
        return 0 if m < 0 else (k if m > k else m)

    def energy_by(self, elapsed_s: float) -> float:
        """Energy of one GPU from the stretch's start to ``elapsed_s`` later (power constant per iteration)."""
        if elapsed_s >= self.total_time_s():
            return self.total_energy_j()
        m, t_m = self._done_by(elapsed_s)
        # Iteration m is in flight: its power is constant, so its share of energy is linear in time.
        return self.energy_of(m, t_m) + self.iter_energy(m) / self.iter_time(m) * (elapsed_s - t_m)
