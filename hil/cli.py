"""``pals hil run | profile | validate``: the scenario's controller on a real node (or the digital twin)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from hil.limits import limits_note
from sim.errors import PalsError

hil_app = typer.Typer(no_args_is_help=True, help="Hardware in the loop: the simulator's controller driving a vLLM "
                                                 "server and NVML power limits (or the digital twin).")

GPUS_HELP = "Comma-separated NVML GPU indices (e.g. 0,1,2,3), or 'twin' for the twin's devices at --endpoint."
ENDPOINT_HELP = "Base URL of the vLLM OpenAI-compatible server (or of `pals twin`), e.g. http://127.0.0.1:8000."


def _cli():  # the pals CLI helpers, imported late (sim.cli imports this module while it is being built)
    from sim import cli

    return cli


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PalsError(f"--out {out}: exists and is not a folder")


@hil_app.command("run")
def hil_run(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file (one deployment, one replica).")],
    endpoint: Annotated[str, typer.Option("--endpoint", help=ENDPOINT_HELP)],
    gpus: Annotated[str, typer.Option("--gpus", help=GPUS_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/hil"),
    duration_s: Annotated[float | None, typer.Option("--duration-s", help="Scenario seconds to run (default: the "
                                                     "scenario's duration_s).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: a.b.0.c=value (repeatable).")]
    = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Skip report.html.")] = False,
    flush_every_s: Annotated[float, typer.Option("--flush-every-s", help="Wall seconds between snapshots of the "
                                                 "records on disk.")] = 2.0,
) -> None:
    """Run a scenario on a real server and GPUs with its controller; write the same files as `pals run`
    (scenario.resolved.yaml, requests.parquet, timeseries.parquet, summary.json, report.html) plus
    token_times.parquet. Ctrl-C, SIGTERM or SIGHUP stop cleanly: limits restored, records kept."""
    from hil.devices import open_gpus
    from hil.engine import normalise_url
    from hil.loop import run_hil
    from sim.scenario import load_scenario

    cli = _cli()
    overrides = list(set_ or [])
    if duration_s is not None:
        if not duration_s > 0:
            cli._fail(PalsError(f"--duration-s {duration_s:g}: expected a positive number of seconds"))
        overrides.append(f"duration_s={duration_s!r}")
    try:
        _check_out(out)
        if not flush_every_s > 0:
            raise PalsError(f"--flush-every-s {flush_every_s:g}: expected a positive number of seconds")
        sc = load_scenario(scenario, overrides)
        endpoint = normalise_url(endpoint)
        with open_gpus(gpus, endpoint) as devices:
            cli.console.print(f"running {sc.name} ({sc.duration_s:g} s of scenario time, policy "
                              f"{sc.control.policy}) on {len(devices.gpus)} GPU(s) via {endpoint}, speed-up "
                              f"{devices.speedup:g}", highlight=False)
            outcome = run_hil(sc, devices.gpus, endpoint, out, speedup=devices.speedup, guard=devices.guard,
                              report=not no_report, flush_every_s=flush_every_s,
                              log=lambda m: cli.err_console.print(m, highlight=False))
    except PalsError as exc:
        cli._fail(exc)
    except KeyboardInterrupt:  # Ctrl-C outside the run's own handling (start-up, final writing): the guard restored
        cli.err_console.print(f"interrupted: power limits restored unless an error above says otherwise; whatever "
                              f"was recorded is in {out}/", highlight=False)
        raise typer.Exit(code=130) from None
    print_hil_summary(outcome.summary)
    cli.console.print(f"outputs in {out}/" + ("" if no_report else f"  (report: {out / 'report.html'})"))
    if outcome.interrupted_by:
        cli.err_console.print(f"interrupted by {outcome.interrupted_by}: {limits_note(outcome.restore_failures)}, the "
                              f"records up to {outcome.summary['totals']['duration_s']:.1f} s are in {out}/",
                              highlight=False)
        raise typer.Exit(code=128 + int(signal.Signals[outcome.interrupted_by]))  # the shell's convention
    if outcome.restore_failures:
        cli.err_console.print(f"error: {limits_note(outcome.restore_failures)}", highlight=False)
        raise typer.Exit(code=2)


def print_hil_summary(summary: dict) -> None:
    """The summary table of a hardware run on the terminal, and what was measured where."""
    from sim.report import summary_rows

    cli = _cli()
    header, rows = summary_rows(summary)
    cli.print_table(f"{summary['scenario']} on hardware (policy {summary['policy']}, seed {summary['seed']})",
                    header, rows)
    t, h = summary["totals"], summary["hil"]
    cli.console.print(f"{t['duration_s']:.1f} s of scenario time measured on {t['num_gpus']} GPU(s) "
                      f"({', '.join(h['gpu_names'])}) in {h['wall_s']:.1f} s wall (speed-up {h['speedup']:g}); "
                      f"at most {h['max_in_flight']} requests in flight", highlight=False)
    for err in h.get("actuation_errors") or []:
        cli.err_console.print(f"power limit refused: {err}", highlight=False)


@hil_app.command("profile")
def hil_profile(
    endpoint: Annotated[str, typer.Option("--endpoint", help=ENDPOINT_HELP)],
    gpus: Annotated[str, typer.Option("--gpus", help=GPUS_HELP)],
    caps: Annotated[str, typer.Option("--caps", help="Comma-separated power caps (W).")],
    batches: Annotated[str, typer.Option("--batches", help="Comma-separated max_num_seqs values.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile table CSV to write.")],
    scenario: Annotated[Path | None, typer.Option("--scenario", help="Scenario whose first deployment names the "
                                                  "model, GPU and token lengths (default: the server's model, "
                                                  "prompts of 512 and outputs of 128 tokens).")] = None,
    window_s: Annotated[float, typer.Option("--window-s", help="Measurement window per point (scenario s).")]
    = 30.0,
    warmup_s: Annotated[float, typer.Option("--warmup-s", help="Warm-up before each window (scenario s).")]
    = 10.0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a scenario field (repeatable).")]
    = None,
) -> None:
    """Measure throughput and per-GPU power at every cap x batch on the node (the server kept saturated with
    max_num_seqs requests in flight) and write them as a profile table (source=hil), which `pals validate` and
    `pals calibrate` read."""
    from hil.devices import open_gpus
    from hil.engine import normalise_url
    from hil.profile import ProfileSpec, profile_node
    from sim.profile import write_table

    cli = _cli()
    try:
        cap_list = cli._floats(caps, "--caps")
        batch_list = cli._whole(batches, "--batches")
        if not window_s > 0 or warmup_s < 0:
            raise PalsError("--window-s must be positive and --warmup-s non-negative")
        spec = ProfileSpec.from_options(scenario, list(set_ or []), window_s, warmup_s)
        endpoint = normalise_url(endpoint)
        with open_gpus(gpus, endpoint) as devices:
            table = profile_node(spec, devices.gpus, endpoint, cap_list, batch_list, speedup=devices.speedup,
                                 guard=devices.guard, log=lambda m: cli.console.print(m, highlight=False))
        write_table(table, out)
        if table.attrs.get("power_limits_not_restored"):  # the table stands; the node was not left as found
            cli.err_console.print(f"{len(table)} operating points written to {out}; error: "
                                  f"{limits_note(table.attrs['power_limits_not_restored'])}", highlight=False)
            raise typer.Exit(code=2)
    except PalsError as exc:
        cli._fail(exc)
    except KeyboardInterrupt:
        cli.err_console.print("interrupted: power limits restored unless an error above says otherwise; no table "
                              "written", highlight=False)
        raise typer.Exit(code=130) from None
    cli.print_table(f"profile of {endpoint}", ["cap W", "batch", "tokens/s", "W per GPU", "ITL p50 s"],
                    [[f"{r.power_cap_w:g}", str(r.max_num_seqs), f"{r.throughput_tokens_per_s:,.1f}",
                      f"{r.power_w_per_gpu:.1f}", f"{r.itl_median_s:.4f}"] for r in table.itertuples()])
    cli.console.print(f"{len(table)} measured operating points written to {out}")


@hil_app.command("validate")
def hil_validate(
    run_dir: Annotated[Path, typer.Argument(help="Folder of a finished `pals hil run`.")],
) -> None:
    """Simulate the recorded run's scenario (same duration) and compare, metric by metric: a terminal table,
    DIR/hil_validation.json and DIR/hil_validation.html."""
    from hil.validate import validate_run

    cli = _cli()
    try:
        result = validate_run(run_dir)
    except PalsError as exc:
        cli._fail(exc)
    header = ["metric", "measured", "simulated", "error %"]
    cli.print_table(f"{result['scenario']}: hardware vs simulator ({result['policy']})", header, result["table"])
    cli.console.print(f"outputs in {run_dir}/hil_validation.json and {run_dir}/hil_validation.html")


def register(app: typer.Typer) -> None:
    """Add the hil commands to the ``pals`` CLI."""
    app.add_typer(hil_app, name="hil")
