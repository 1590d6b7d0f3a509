"""Offline power-performance models: predicted throughput and power of a deployment at (cap, batch).

``PhysicsModel`` asks ``sim.physics`` for the steady state of a saturated engine: every iteration each of the
``b`` running sequences yields a token, and over ``O`` iterations (``P``, ``O``: mean prompt and output
lengths) every sequence is replaced once, so ``b`` prompts are prefilled in mixed steps beside the decodes.
A running sequence carries ``P + O·(1 + cv²)/2`` tokens of context on average (``cv``: the coefficient of
variation of the output lengths): a request ``L`` tokens long stays ``L`` iterations, so long ones are
over-represented in the batch (length-biased sampling; ``P + O/2`` when every output is as long).
Prompt lengths may vary too (``prompt_tokens_cv``): a mixed step's prefill is then drawn from a log-normal law of
mean ``P`` (``prompt_length_classes``), so most mixed steps carry a short prompt and a few a long one, which sets
the median and the tail of the inter-token latency (the mean prefill work is the same).
Static batches (the PALS profiling style) are costed batch by batch: chunked prefill of the whole batch,
then ``O - 1`` decode iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist
from typing import Any, Protocol

from sim.physics import ReplicaPhysics, StepWork


@dataclass(frozen=True)
class Prediction:
    """A model's estimate for one configuration."""

    tokens_per_s: float  # output tokens, whole deployment
    power_w_per_gpu: float

    def tokens_per_j(self, num_gpus: int) -> float:
        """Output tokens per joule of GPU energy."""
        return self.tokens_per_s / (self.power_w_per_gpu * num_gpus)


class PerformanceModel(Protocol):
    """Predicts a deployment's throughput and per-GPU power at a cap and batch knob."""

    def predict(self, power_cap_w: float, max_num_seqs: int) -> Prediction:
        """Estimate for every GPU capped at ``power_cap_w`` and at most ``max_num_seqs`` running per replica."""


class _MemoModel:
    """A model whose predictions are computed once per (cap, batch) and remembered."""

    def __init__(self) -> None:
        self._cache: dict[tuple[float, int], Prediction] = {}

    def predict(self, power_cap_w: float, max_num_seqs: int) -> Prediction:
        """The (remembered) estimate at this cap and batch knob."""
        key = (float(power_cap_w), max(1, int(max_num_seqs)))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._estimate(*key)
        return hit

    def _estimate(self, power_cap_w: float, max_num_seqs: int) -> Prediction:
        raise NotImplementedError


class PhysicsModel(_MemoModel):
    """Steady-state predictions from the simulator's physics (no simulation run)."""

    def __init__(self, phys: ReplicaPhysics, replicas: int, prompt_tokens_mean: float, output_tokens_mean: float,
                 max_num_batched_tokens: int, static_batches: bool = False,
                 kv_capacity_tokens: float = math.inf, output_tokens_cv: float = 0.0,
                 prompt_tokens_cv: float = 0.0) -> None:
        super().__init__()
        self.phys = phys
        self.replicas = replicas
        self.prompt = max(1.0, prompt_tokens_mean)
        self.output = max(1.0, output_tokens_mean)
        self.budget = max_num_batched_tokens
        self.static_batches = static_batches
        self.kv_capacity_tokens = kv_capacity_tokens
        self.output_tokens_cv = output_tokens_cv
        self.prompt_tokens_cv = prompt_tokens_cv
        self._steps: dict[tuple[float, int], list[tuple[float, float]]] = {}  # each kind of step: duration, count
        self._busy: dict[tuple[float, int], float] = {}  # share of the time a kernel runs

    def _estimate(self, power_cap_w: float, max_num_seqs: int) -> Prediction:
        """Saturated throughput and per-GPU power at this cap and batch knob."""
        if self.static_batches:
            return self._static(power_cap_w, max_num_seqs)
        return self._continuous(power_cap_w, max_num_seqs)

    def busy_fraction(self, power_cap_w: float, max_num_seqs: int) -> float:
        """Share of the steady state's time during which a kernel runs on a GPU (NVML's utilization): the
        rest is the host's scheduling between kernels and, on eager steps, the GPU waiting for launches."""
        self.predict(power_cap_w, max_num_seqs)
        return self._busy[(float(power_cap_w), max(1, int(max_num_seqs)))]

    def median_step_s(self, power_cap_w: float, max_num_seqs: int) -> float:
        """Median duration of the steady state's steps (the median inter-token latency)."""
        return self.step_quantile_s(power_cap_w, max_num_seqs, 0.5)

    def step_quantile_s(self, power_cap_w: float, max_num_seqs: int, q: float) -> float:
        """The ``q`` quantile (0-1) of the steady state's step durations: the shortest step at or below which a
        share ``q`` of them lie."""
        self.predict(power_cap_w, max_num_seqs)
        steps = sorted(self._steps[(float(power_cap_w), max(1, int(max_num_seqs)))])
        target = q * sum(count for _, count in steps)
        seen = 0.0
        for t, count in steps:
            seen += count
            if seen >= target:
                return t
        return steps[-1][0]

    def _run(self, works: list[tuple[StepWork, float]], cap_w: float, key: tuple[float, int]) -> tuple[float, float]:
        """Time and energy of weighted steps, each at the clock its cap allows."""
        phys = self.phys
        t_total = e_total = busy = 0.0
        durations = []
        for work, count in works:
            f = phys.clock_for_cap(work, cap_w)
            t = phys.step_time_s(work, f)
            durations.append((t, count))
            t_total += count * t
            e_total += count * phys.step_energy_j(work, f, t)
            busy += count * phys.step_busy_s(work, f, t)
        self._steps[key] = durations
        self._busy[key] = busy / t_total if t_total > 0.0 else 0.0
        return t_total, e_total

    def running_seqs(self, max_num_seqs: int) -> float:
        """Sequences a replica runs at once in the steady state: the batch knob, unless fewer fit.

        Served: the step budget bounds how many sequences can be kept running (b·(1 + P/O) tokens per
        iteration), and the KV cache holds about b·(P + O·(1 + cv²)/2) tokens (the mean context of a running
        sequence). Static batches: a batch whose cache does not fit runs as many sequences at once as the cache
        holds (each carrying P + O/2 tokens on average over its life); the rest wait.
        """
        p, o, b = self.prompt, self.output, float(max(1, max_num_seqs))
        if self.static_batches:
            fits = self.kv_capacity_tokens / (p + o / 2.0)
            return float(max(1, math.floor(fits))) if fits < b else b
        return min(b, self.budget / (1.0 + p / o), max(1.0, self.kv_capacity_tokens / self._running_context()))

    def _running_context(self) -> float:
        """Mean context a running sequence carries under continuous batching: P + O·(1 + cv²)/2 (long requests
        stay in the batch longer)."""
        return self.prompt + self.output * (1.0 + self.output_tokens_cv ** 2) / 2.0

    def _continuous(self, cap_w: float, b: int) -> Prediction:
        p, o = self.prompt, self.output
        key = (cap_w, b)
        context = self._running_context()
        b = self.running_seqs(b)
        # Over O iterations, each of the b running sequences is replaced once: b prompts are prefilled. The
        # sequences finish independently, so an iteration carries k prefills with binomial probability (about
        # Poisson(b/O): O·(1 - e^(-b/O)) iterations carry at least one), each such step also decoding the others:
        # a step with one short prefill is not one with three.
        steps: list[tuple[StepWork, float]] = []
        decode_only = -1  # index of the decode-only steps in ``steps``
        surplus = 0.0  # tokens the decodes beside extra chunk steps yield
        decoding = max(1, round(b))
        for k, share in prefill_count_classes(b, o):
            ctx = (b - k) * context
            if k == 0.0:
                decode_only = len(steps)
                steps.append((self.phys.step_work(decoding, decoding, decoding, ctx, ctx), o * share))
                continue
            new = max(1, round(k))
            # k prompts' lengths sum to a law of mean k·P and coefficient of variation cv / sqrt(k).
            for length, weight in prompt_length_classes(k * p, self.prompt_tokens_cv / math.sqrt(k)):
                count = o * share * weight
                pairs = length * (length / k + 1) / 2.0  # each prompt token attends the ones before it and itself
                chunks = max(1, math.ceil(length / max(1.0, self.budget - (b - k))))
                if chunks == 1:
                    steps.append((self.phys.step_work(max(1, round(b - k + length)), decoding, decoding,
                                                      ctx + pairs, ctx + length, num_new=new), count))
                    continue
                # Prompts larger than the step budget left beside the decodes are chunked over several steps, as
                # the engine does: the first chunk admits the requests, chunk i attends and reads back the i - 1
                # before it, and only the last yields the new sequences' first tokens.
                chunk = length / chunks
                first_pairs = chunk * (chunk / k + 1) / 2.0
                steps.append((self.phys.step_work(max(1, round(b - k + chunk)), max(1, round(b - k)), decoding,
                                                  ctx + first_pairs, ctx + chunk, num_new=new), count))
                steps.append((self.phys.step_work(max(1, round(b - k + chunk)),
                                                  max(1, round(b - k + k / (chunks - 1))), decoding,
                                                  ctx + (pairs - first_pairs) / (chunks - 1),
                                                  ctx + chunk * (chunks + 2) / 2.0), count * (chunks - 1)))
                surplus += count * (chunks - 1) * (b - k)
        if decode_only >= 0 and surplus > 0.0:
            # Every request still yields O tokens, b·O a cycle: the decodes beside the extra chunk steps yield some
            # of them, so the cycle needs fewer decode-only steps.
            work, count = steps[decode_only]
            steps[decode_only] = (work, max(0.0, count - surplus / b))
        t, e = self._run(steps, cap_w, key)
        return Prediction(self.replicas * b * o / t, e / t)

    def _static(self, cap_w: float, b: int) -> Prediction:
        p, o = self.prompt, self.output
        key = (cap_w, b)
        # A batch whose cache does not fit goes by at the concurrency the cache holds (``running_seqs``).
        b = int(self.running_seqs(b))
        prompt_tokens = b * p
        chunks = max(1, math.ceil(prompt_tokens / self.budget))
        chunk = prompt_tokens / chunks
        # Prefill: chunks of the batch's prompts, each token attending the ones before it and itself (on average
        # (p + 1) / 2 of them) and each prompt's cache read once, as the engine counts them.
        pre = self.phys.step_work(max(1, round(chunk)), max(1, round(b / chunks)), b, chunk * (p + 1) / 2.0,
                                  chunk, num_new=round(b / chunks))
        steps = [(pre, float(chunks))]
        if o > 1:
            ctx = b * (p + o / 2.0)
            steps.append((self.phys.step_work(b, b, b, ctx, ctx), o - 1.0))
        t, e = self._run(steps, cap_w, key)
        return Prediction(self.replicas * b * o / t, e / t)


class SimulatedModel(_MemoModel):
    """Perfect knowledge of the simulated plant: each configuration is measured by simulating the deployment
    itself (its workload, its replicas) with that cap and batch knob held fixed for ``probe_s`` seconds.

    Used by the ``oracle`` policy as the upper bound; too slow for anything else.
    """

    def __init__(self, scenario: Any, deployment_index: int, probe_s: float = 30.0) -> None:
        super().__init__()
        self.scenario = scenario
        self.index = deployment_index
        self.probe_s = probe_s

    def _estimate(self, power_cap_w: float, max_num_seqs: int) -> Prediction:
        """Throughput and per-GPU power measured in a short simulation."""
        from sim.run import run_scenario
        from sim.scenario import scenario_from_dict

        data = self.scenario.model_dump(mode="json", exclude={"base_dir"})
        data["deployments"] = [data["deployments"][self.index]]
        data["duration_s"] = min(self.probe_s, data["duration_s"])
        data["power"] = {**data["power"], "budget_w": None, "cap_actuation_delay_s": 0.0}
        data["control"] = {"policy": "static", "period_s": data["control"]["period_s"],
                           "power_cap_w": power_cap_w, "max_num_seqs": max_num_seqs}
        sc = scenario_from_dict(data, "oracle probe", self.scenario.base_dir)
        t = run_scenario(sc).summary["totals"]
        return Prediction(t["throughput_tokens_per_s"], t["avg_power_w"] / t["num_gpus"])


class RandomForestModel(_MemoModel):
    """The PALS paper's offline model: random forests trained on measured (or simulated) operating points.

    Two scikit-learn forests, one for throughput per GPU and one for power per GPU, over the features power
    cap, log2 of the batch knob and the mean prompt and output lengths, trained on profile-table rows of one
    deployment layout (``sim.profile.rows_for_deployment``). Throughput is learnt per GPU so that a table
    measured on one replica predicts a deployment of several. Like any forest it does not extrapolate: a cap
    or batch outside the table's range gets the nearest measured behaviour.
    """

    def __init__(self, rows: Any, num_gpus: int, prompt_tokens_mean: float, output_tokens_mean: float,
                 seed: int = 0, n_estimators: int = 100) -> None:
        super().__init__()
        import numpy as np
        from sklearn.ensemble import RandomForestRegressor

        x = self.features(rows["power_cap_w"], rows["max_num_seqs"], rows["prompt_tokens_mean"],
                          rows["output_tokens_mean"])
        per_gpu = rows["throughput_tokens_per_s"].to_numpy(float) / rows["num_gpus"].to_numpy(float)
        self.num_gpus = num_gpus
        self.prompt = prompt_tokens_mean
        self.output = output_tokens_mean
        self.rows = len(rows)
        self._throughput = RandomForestRegressor(n_estimators=n_estimators, random_state=seed, n_jobs=1)
        self._power = RandomForestRegressor(n_estimators=n_estimators, random_state=seed + 1, n_jobs=1)
        # Throughput spans orders of magnitude over the batch sizes: the forest learns its logarithm.
        self._throughput.fit(x, np.log(per_gpu))
        self._power.fit(x, rows["power_w_per_gpu"].to_numpy(float))

    @staticmethod
    def features(caps_w: Any, batches: Any, prompts: Any, outputs: Any) -> Any:
        """The forests' input matrix: cap (W), log2(batch), mean prompt and output tokens."""
        import numpy as np

        return np.column_stack([np.asarray(caps_w, float), np.log2(np.asarray(batches, float)),
                                np.asarray(prompts, float), np.asarray(outputs, float)])

    def _estimate(self, power_cap_w: float, max_num_seqs: int) -> Prediction:
        """The forests' average at this cap and batch knob."""
        x = self.features([power_cap_w], [max_num_seqs], [self.prompt], [self.output])
        tokens = math.exp(float(self._throughput.predict(x)[0])) * self.num_gpus
        return Prediction(max(tokens, 1e-9), max(float(self._power.predict(x)[0]), 1e-9))


COUNT_TAIL = 1e-4  # prefill counts in a tail less likely than this are lumped into the class next to it
MAX_COUNT_CLASSES = 16  # beyond this many counts, neighbouring ones are merged (at large rates)


PROMPT_LENGTH_CLASSES = 16  # equal-probability classes a varying prompt length is split into


def prompt_length_classes(mean: float, cv: float) -> list[tuple[float, float]]:
    """``(length, probability)`` classes of a log-normal prompt length of this mean and coefficient of variation.

    ``PROMPT_LENGTH_CLASSES`` classes of equal probability, each at its conditional mean, so the classes' mean is
    the law's exactly: ``mean·(Φ(b - σ) - Φ(a - σ))·Q`` for the class between standard-normal quantiles ``a``
    and ``b`` (``σ² = ln(1 + cv²)``). One class at the mean when the lengths do not vary.
    """
    if cv <= 0.0:
        return [(mean, 1.0)]
    sigma = math.sqrt(math.log1p(cv * cv))
    q = PROMPT_LENGTH_CLASSES
    mass = [0.0] + [_NORMAL.cdf(z - sigma) for z in _class_edges(q)] + [1.0]
    return [(mean * (mass[i + 1] - mass[i]) * q, 1.0 / q) for i in range(q)]


_NORMAL = NormalDist()


@cache
def _class_edges(q: int) -> tuple[float, ...]:
    """The inner standard-normal quantiles ``i / q``, ``i = 1 … q - 1``, that bound ``q`` equal-probability
    classes."""
    return tuple(_NORMAL.inv_cdf(i / q) for i in range(1, q))


def prefill_count_classes(running: float, mean_output: float) -> list[tuple[float, float]]:
    """``(k, probability)`` for the number of prefills an iteration of a saturated engine carries.

    Each of the ``running`` sequences finishes at a given iteration with probability ``1 / mean_output`` (lengths
    spread like a geometric law's), and each finish admits a new prompt: the count is binomial, with mean
    ``running / mean_output``; Poisson when many sequences run and each rarely finishes, all of them every
    iteration when outputs are one token long. Counts in the lower or upper tail (below ``COUNT_TAIL``) are
    lumped into the first or last class kept, and at large rates neighbouring counts are merged (at most
    ``MAX_COUNT_CLASSES`` classes), each class at its mean count: the probabilities sum to 1 and the mean count
    is ``running / mean_output`` exactly.
    """
    n = max(1, round(running))
    rate = running / mean_output
    p = min(1.0, rate / n)
    if p >= 1.0:
        return [(float(n), 1.0)]
    if p <= 0.0:
        return [(0.0, 1.0)]
    rate = n * p
    sd = math.sqrt(rate * (1.0 - p))
    k = max(0, math.floor(rate - 10.0 * sd - 10.0))  # what lies below has probability < 1e-20
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1.0)
    classes: list[list[float]] = []  # [count, probability]
    cdf = below = 0.0
    while True:
        prob = math.exp(log_n - math.lgamma(k + 1.0) - math.lgamma(n - k + 1.0) + k * log_p + (n - k) * log_q)
        cdf += prob
        if not classes and cdf <= COUNT_TAIL:
            below += prob  # lumped into the first class kept
        else:
            classes.append([float(k), prob])
        if k >= n or (len(classes) >= 2 and k >= rate and 1.0 - cdf <= COUNT_TAIL):
            break
        k += 1
    classes[0][1] += below  # (the count shifts the mean by less than a tail's worth; the last class restores it)
    size = math.ceil(len(classes) / MAX_COUNT_CLASSES)  # neighbouring counts merged, at their mean
    if size > 1:
        groups = [classes[i:i + size] for i in range(0, len(classes), size)]
        classes = [[sum(c[0] * c[1] for c in g) / sum(c[1] for c in g), sum(c[1] for c in g)] for g in groups]
    others = classes[:-1]
    last = 1.0 - sum(c[1] for c in others)
    return [(c[0], c[1]) for c in others] + [((rate - sum(c[0] * c[1] for c in others)) / last, last)]
