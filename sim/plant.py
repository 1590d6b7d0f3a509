"""The simulated plant: a scenario wired into SimPy (workload -> router -> engines -> SimGpus), driven by
the same controllers as real hardware, with telemetry sampled every control period.

Explicit wiring in the desmod style: ``SimPlant`` builds every component from the scenario, then ``run``
returns plain records that ``sim.metrics`` turns into DataFrames and the summary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import simpy

from sim.build import build_physics, load_budget, max_model_len, resolve_model
from sim.catalog.gpus import get_gpu
from sim.control import Action, Controller, ControllerContext, Observation, build_controller
from sim.control.coordinator import Claim, Split, even_split, need_split
from sim.control.models import PerformanceModel, PhysicsModel, SimulatedModel
from sim.control.offline import random_forest_for
from sim.control.policies import batch_candidates, cap_candidates, choose
from sim.engine import Engine, kv_capacity_tokens
from sim.gpu import ActivityLedger, SimGpu
from sim.scenario import DeploymentConfig, Scenario, StaticBatchesWorkload
from sim.workload import Request, RequestSource, token_means


def workload_rng(scenario: Scenario, deployment_index: int) -> np.random.Generator:
    """The random stream of a deployment's workload: one child of the scenario's seed per deployment (the
    hardware loop's load generator draws the same requests from it)."""
    streams = np.random.SeedSequence(scenario.seed).spawn(len(scenario.deployments))
    return np.random.default_rng(streams[deployment_index])


def resolve_target(cfg: DeploymentConfig, model: PhysicsModel, max_cap_w: float) -> float:
    """A deployment's throughput target in tokens/s (nan: none)."""
    t = cfg.throughput_target
    if t is None:
        return math.nan
    if t.tokens_per_s is not None:
        return t.tokens_per_s
    return t.fraction_of_max * model.predict(max_cap_w, cfg.engine.max_num_seqs).tokens_per_s


def _median(values: list[float]) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class DeploymentRuntime:
    """One deployment in the simulation: its replicas, router, source and controller."""

    def __init__(self, plant: SimPlant, index: int, cfg: DeploymentConfig, rng: np.random.Generator,
                 first_gpu_index: int) -> None:
        env, scenario = plant.env, plant.scenario
        self.plant = plant
        self.index = index
        self.cfg = cfg
        self.name = cfg.name
        self.model = resolve_model(scenario, cfg)
        self.gpu_spec = get_gpu(cfg.gpu)
        self.phys = build_physics(scenario, cfg, self.gpu_spec, self.model)
        self.kv_capacity_tokens = kv_capacity_tokens(self.phys, cfg.engine.gpu_memory_utilization,
                                                     cfg.engine.max_num_batched_tokens)
        self.requests: list[Request] = []
        self.completed: list[Request] = []
        self.dropped: list[Request] = []
        self.window_finished: list[Request] = []
        self.gpus: list[SimGpu] = []
        self.engines: list[Engine] = []
        n_per = self.phys.par.num_gpus
        for r in range(cfg.replicas):
            ledger = ActivityLedger(env, self.gpu_spec)
            gpus = [SimGpu(env, self.gpu_spec, first_gpu_index + r * n_per + k, scenario.power.cap_actuation_delay_s,
                           ledger) for k in range(n_per)]
            self.gpus.extend(gpus)
            self.engines.append(Engine(
                env, self.phys, gpus, replica=r, max_num_seqs=cfg.engine.max_num_seqs,
                max_num_batched_tokens=cfg.engine.max_num_batched_tokens, block_size=cfg.engine.block_size,
                kv_capacity_tokens=self.kv_capacity_tokens, max_model_len=max_model_len(cfg, self.model),
                iteration_stepping=cfg.engine.stepping == "iteration",
                on_finish=self._finished, on_drop=self._dropped))
        self.window_first_tokens: list[Request] = []
        for engine in self.engines:
            engine.on_first_token = self.window_first_tokens.append
        self._rr = 0
        self.source = RequestSource(env, scenario, index, self.submit, rng)
        self.source.on_exhausted = plant.check_done
        tokens = token_means(scenario, index)
        self.perf_model = PhysicsModel(self.phys, cfg.replicas, tokens.prompt_tokens_mean, tokens.output_tokens_mean,
                                  cfg.engine.max_num_batched_tokens,
                                  static_batches=isinstance(cfg.workload, StaticBatchesWorkload),
                                  kv_capacity_tokens=self.kv_capacity_tokens,
                                  output_tokens_cv=tokens.output_tokens_cv,
                                  prompt_tokens_cv=tokens.prompt_tokens_cv)
        self.target_tokens_per_s = resolve_target(cfg, self.perf_model, self.gpu_spec.power_limit_max_w)
        c = scenario.control
        self.offline_model: PerformanceModel = self.perf_model
        if c.offline_model == "random_forest" and c.policy not in ("static", "oracle"):
            self.offline_model = random_forest_for(scenario, index, len(self.gpus), tokens.prompt_tokens_mean,
                                                   tokens.output_tokens_mean)
        self.controller: Controller = build_controller(c.policy, ControllerContext(
            deployment=cfg.name, num_gpus=len(self.gpus),
            power_limit_range_w=(self.gpu_spec.power_limit_min_w, self.gpu_spec.power_limit_max_w),
            default_power_limit_w=self.gpu_spec.default_power_limit_w, max_num_seqs=cfg.engine.max_num_seqs,
            period_s=c.period_s, power_cap_w=c.power_cap_w, control_max_num_seqs=c.max_num_seqs,
            params=dict(c.params), model=self._model_for(c.policy, scenario, index)))
        self.max_num_seqs = cfg.engine.max_num_seqs
        self._last_action: Action | None = None
        # Telemetry state at the previous sample.
        self.last_energy_j = [0.0] * len(self.engines)  # per replica (its ranks share one ledger)
        self.last_busy_s = [0.0] * len(self.engines)
        self.last_clock_s = [0.0] * len(self.engines)
        self.last_tokens = [0] * len(self.engines)

    def _model_for(self, policy: str, scenario: Scenario, index: int) -> PerformanceModel:
        """The offline model a policy plans with (``control.offline_model``: the physics steady state or a
        random forest), or, for the oracle, the plant itself measured in short simulations."""
        if policy == "oracle":
            return SimulatedModel(scenario, index, float(scenario.control.params.get("oracle_probe_s", 30.0)))
        return self.offline_model

    def target_correction(self) -> float:
        """How far above its target the controller aims (margin x PID correction), rounded to 2 %: 1 for
        policies without feedback."""
        margin = float(getattr(self.controller, "margin", 0.0))
        correction = float(getattr(self.controller, "correction", 1.0))
        return round((1.0 + margin) * correction / 0.02) * 0.02

    def claim(self, correction: float) -> Claim:
        """What this deployment asks of a shared budget: the GPU power that its (corrected) target needs,
        per its offline model."""
        lo, hi = self.gpu_spec.power_limit_min_w, self.gpu_spec.power_limit_max_w
        need = math.nan
        if not math.isnan(self.target_tokens_per_s):
            best = choose(self.offline_model, cap_candidates(lo, hi, 25.0),
                          batch_candidates(self.cfg.engine.max_num_seqs), len(self.gpus),
                          self.target_tokens_per_s * correction, math.inf)
            need = best.power_cap_w * len(self.gpus)
        return Claim(len(self.gpus), lo, hi, need)

    def events_scheduled(self) -> int:
        """Simulation events this deployment's components scheduled."""
        return (sum(e.timer_events for e in self.engines) + self.source.events
                + sum(g.timer_events for g in self.gpus))

    @property
    def outstanding(self) -> int:
        """Requests submitted and neither finished nor dropped."""
        return len(self.requests) - len(self.completed) - len(self.dropped)

    def submit(self, req: Request) -> None:
        """Route an arriving request to a replica."""
        self.requests.append(req)
        if self.cfg.router == "round-robin":
            engine = self.engines[self._rr % len(self.engines)]
            self._rr += 1
        else:
            engine = self.engines[0]
            best = engine.outstanding
            for e in self.engines[1:]:
                if e.outstanding < best:
                    engine, best = e, e.outstanding
        engine.submit(req)

    def _finished(self, req: Request) -> None:
        self.completed.append(req)
        self.window_finished.append(req)
        self._settled(req)

    def _dropped(self, req: Request) -> None:
        self.dropped.append(req)
        self._settled(req)

    def _settled(self, req: Request) -> None:
        """A request left the system: tell its source (closed loops, batches), and stop once all is served."""
        if req.on_finish is not None:
            req.on_finish(req)
        if self.source.exhausted and self.outstanding == 0:
            self.plant.check_done()

    def apply(self, action: Action) -> None:
        """Apply a controller's action: caps to every GPU (clamped to range), batch knob to every engine."""
        if action == self._last_action:
            return
        self._last_action = action
        caps = action.power_cap_w
        if len(caps) != len(self.gpus):
            raise ValueError(f"{self.name}: action has {len(caps)} caps for {len(self.gpus)} GPUs")
        for gpu, cap in zip(self.gpus, caps, strict=True):
            lo, hi = gpu.get_power_limit_range_w()
            gpu.set_power_limit_w(min(max(float(cap), lo), hi))
        # The knob lives within the engine's own max_num_seqs (vLLM's, fixed at start-up), and a decode step needs
        # a token of the step budget per sequence (which the scenario check already holds at max_num_seqs).
        self.max_num_seqs = min(max(1, int(action.max_num_seqs)), self.cfg.engine.max_num_seqs)
        for engine in self.engines:
            engine.set_max_num_seqs(self.max_num_seqs)


@dataclass
class Timeseries:
    """Telemetry records, one tuple per control period and replica in ``RECORD_COLUMNS`` order
    (``power_cap_w`` holds the replica's per-GPU caps); ``sim.metrics.timeseries_frame`` expands them to one
    row per GPU."""

    rows: list[tuple] = field(default_factory=list)

    def column(self, name: str) -> list:
        """One field of every record."""
        i = RECORD_COLUMNS.index(name)
        return [row[i] for row in self.rows]


RECORD_COLUMNS = ("time_s", "window_s", "deployment", "replica", "first_gpu", "num_gpus", "power_w", "energy_j",
                   "power_cap_w", "clock_mhz", "utilization", "batch", "max_num_seqs", "waiting",
                   "throughput_tokens_per_s", "budget_w", "budget_share_w", "target_tokens_per_s")
TIMESERIES_COLUMNS = ("time_s", "window_s", "deployment", "replica", "gpu", "power_w", "energy_j", "power_cap_w",
                      "clock_mhz", "utilization", "batch", "max_num_seqs", "waiting", "throughput_tokens_per_s",
                      "budget_w", "budget_share_w", "target_tokens_per_s")


@dataclass
class RunResult:
    """Plain records of one simulated run."""

    scenario: Scenario
    end_s: float
    deployments: list[DeploymentRuntime]
    timeseries: Timeseries
    budget_windows: list[tuple[float, float, float]]  # (window end, total GPU power, budget) per period
    sim_events: int
    wall_s: float
    infeasible_windows: int = 0  # windows whose budget was below the sum of the lowest caps


TICK_TOLERANCE = 1e-9  # relative: a control tick this close to the run's end is the end itself


class SimPlant:
    """Builds and runs the simulation of one scenario."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.env = simpy.Environment()
        self.control_ticks = 0
        self.budget = load_budget(scenario)
        self._stop = self.env.event()
        self.deployments: list[DeploymentRuntime] = []
        gpu_index = 0
        for i, dep in enumerate(scenario.deployments):
            rt = DeploymentRuntime(self, i, dep, workload_rng(scenario, i), gpu_index)
            gpu_index += len(rt.gpus)
            self.deployments.append(rt)
        self.total_gpus = gpu_index
        self.timeseries = Timeseries()
        self.budget_windows: list[tuple[float, float, float]] = []
        self._last_sample_s = 0.0
        self._splits: dict[float, Split] = {}
        self.infeasible_windows = 0
        self.env.timeout(scenario.duration_s).callbacks.append(lambda _ev: self._stop_now())
        self.env.process(self._control_loop())

    def check_done(self) -> None:
        """Stop once every finite workload is exhausted and fully served."""
        if all(d.source.exhausted and d.outstanding == 0 for d in self.deployments):
            self._stop_now()

    def _stop_now(self) -> None:
        if not self._stop.triggered:
            self._stop.succeed()

    def split(self, total_budget: float) -> Split:
        """Shares of a budget between the deployments. The need split follows each controller's feedback:
        a deployment whose PID finds its target harder to reach than its model predicted claims more."""
        deps = self.deployments
        if len(deps) == 1 or not math.isfinite(total_budget) or self.scenario.power.split == "even":
            key: tuple = (total_budget,)
            make = even_split
        else:
            key = (total_budget, *(d.target_correction() for d in deps))
            make = need_split
        split = self._splits.get(key)
        if split is None:
            corrections = key[1:] or (1.0,) * len(deps)
            claims = [d.claim(c) for d, c in zip(deps, corrections, strict=True)]
            split = self._splits[key] = make(total_budget, claims)
        return split

    def _control_loop(self):
        period = self.scenario.control.period_s
        # Apply the initial action at t=0 (before any telemetry), as a real loop would on start-up.
        budget = self.budget.at(0.0)
        for dep, share in zip(self.deployments, self.split(budget).shares_w, strict=True):
            dep.apply(dep.controller.decide(self._observe(dep, 0.0, record=False, budget=budget, share=share,
                                                          next_share=share, next_budget=budget)))
        end = self.scenario.duration_s
        while True:
            self.control_ticks += 1
            # Tick k at k·period exactly (a sum of periods drifts); one within rounding of the end is the end's.
            tick = self.control_ticks * period
            if tick >= end * (1.0 - TICK_TOLERANCE):
                return  # the run's own end samples the last window
            yield self.env.timeout(tick - self.env.now)
            self.sample(act=True)

    def sample(self, act: bool) -> None:
        """Record one telemetry window for every GPU; let each controller act when ``act``."""
        now = self.env.now
        window = now - self._last_sample_s
        if window <= 0:
            return
        budget = self.budget.at(self._last_sample_s)  # in force during the window just ended
        split = self.split(budget)
        self.infeasible_windows += not split.feasible
        next_budget = self.budget.at(now)
        upcoming = self.split(next_budget)  # in force from now on: what the controllers must respect
        total_power = 0.0
        for i, dep in enumerate(self.deployments):
            obs = self._observe(dep, window, record=True, budget=budget, share=split.shares_w[i],
                                next_share=upcoming.shares_w[i], next_budget=next_budget)
            total_power += sum(obs.gpu_power_w)
            if act:
                dep.apply(dep.controller.decide(obs))
        self.budget_windows.append((now, total_power, budget))
        self._last_sample_s = now

    def _observe(self, dep: DeploymentRuntime, window: float, record: bool, budget: float, share: float,
                 next_share: float, next_budget: float) -> Observation:
        """Telemetry of the window just ended (recorded against the budget and share then in force), as an
        observation that carries the share in force from now on."""
        now = self.env.now
        powers: list[float] = []
        caps: list[float] = []
        n_per = dep.phys.par.num_gpus
        tokens_total = 0
        inv = 1.0 / window if window > 0 else 0.0
        rows = self.timeseries.rows
        max_mhz = dep.gpu_spec.sm_clock_max_mhz
        for r, engine in enumerate(dep.engines):
            tokens = engine.tokens_generated_now()
            d_tokens = tokens - dep.last_tokens[r]
            dep.last_tokens[r] = tokens
            tokens_total += d_tokens
            # The ranks of a replica run in lockstep and share one activity ledger: read it once.
            ledger = engine.ledger
            energy, busy, clock_s = ledger.counters()
            power = (energy - dep.last_energy_j[r]) * inv if window > 0 else ledger.power_w()
            util = (busy - dep.last_busy_s[r]) * inv
            clock = (clock_s - dep.last_clock_s[r]) * inv * max_mhz
            dep.last_energy_j[r] = energy
            dep.last_busy_s[r] = busy
            dep.last_clock_s[r] = clock_s
            rep_gpus = dep.gpus[r * n_per:(r + 1) * n_per]
            rep_caps = [g.get_power_limit_w() for g in rep_gpus]
            powers.extend([power] * n_per)
            caps.extend(rep_caps)
            if record:  # one record per replica; expanded to one row per GPU when the frame is built
                rows.append((now, window, dep.name, r, rep_gpus[0].index, n_per, power, energy, rep_caps,
                             clock, util, engine.num_running, engine.max_num_seqs,
                             len(engine.waiting), d_tokens * inv, budget, share, dep.target_tokens_per_s))
        finished = dep.window_finished
        dep.window_finished = []
        firsts = dep.window_first_tokens
        ttft = _median([q.first_token_s - q.arrival_s for q in firsts])
        firsts.clear()
        tpots = [(q.finish_s - q.first_token_s) / (q.generated - 1) for q in finished if q.generated > 1]
        return Observation(
            time_s=now, window_s=window, deployment=dep.name,
            output_tokens_per_s=tokens_total / window if window > 0 else 0.0,
            gpu_power_w=tuple(powers), power_cap_w=tuple(caps),
            power_limit_range_w=dep.gpus[0].get_power_limit_range_w(), max_num_seqs=dep.max_num_seqs,
            queue_len=sum(len(e.waiting) for e in dep.engines), running=sum(e.num_running for e in dep.engines),
            ttft_p50_s=ttft, tpot_p50_s=_median(tpots),
            budget_w=next_share, throughput_target_tokens_per_s=dep.target_tokens_per_s,
            scenario_budget_w=next_budget)

    def run(self) -> RunResult:
        """Run to ``duration_s`` (or until a finite workload is served) and return the records."""
        t0 = time.perf_counter()
        self.env.run(until=self._stop)
        self.sample(act=False)  # the last, possibly partial, window
        for dep in self.deployments:
            for engine in dep.engines:
                for req in engine.unfinished_requests():
                    req.drop_reason = "unfinished: still in the engine when the run ended"
                    dep.dropped.append(req)
        wall = time.perf_counter() - t0
        return RunResult(self.scenario, self.env.now, self.deployments, self.timeseries, self.budget_windows,
                         self.events_scheduled(), wall, self.infeasible_windows)

    def events_scheduled(self) -> int:
        """Simulation events scheduled: engine steps and wake-ups, arrivals, cap actuations, control ticks."""
        per_dep = sum(d.events_scheduled() for d in self.deployments)
        return per_dep + self.control_ticks + 1  # + the end-of-run timeout


def simulate(scenario: Scenario) -> RunResult:
    """Build and run a scenario."""
    return SimPlant(scenario).run()
