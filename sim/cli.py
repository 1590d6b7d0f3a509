"""The ``pals`` command line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sim.errors import PalsError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pals: simulate power-aware LLM serving (dense and MoE) under power budgets.")
console = Console()
err_console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    """Print the error (one ``error:`` line per problem it lists) and exit with status 2."""
    for line in str(exc).splitlines() or [""]:
        err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def print_table(title: str, header: list[str], rows: list[list[str]], whole_names: bool = False) -> None:
    """A metric table on the terminal: the first column left-aligned, the figures right-aligned
    (``whole_names``: the first column never wrapped or cut, for names that differ only at their end)."""
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=whole_names and i == 0)
    for r in rows:
        table.add_row(*r)
    console.print(table)


def print_summary(summary: dict) -> None:
    """The summary table on the terminal."""
    from sim.report import summary_rows

    header, rows = summary_rows(summary)
    print_table(f"{summary['scenario']} (policy {summary['policy']}, seed {summary['seed']})", header, rows)
    t = summary["totals"]
    console.print(f"{t['duration_s']:.1f} s simulated on {t['num_gpus']} GPUs in {t['wall_s']:.2f} s wall, "
                  f"{t['sim_events']:,} events")


@app.command()
def run(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/latest"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: a.b.0.c=value (repeatable).")]
    = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Skip report.html.")] = False,
) -> None:
    """Simulate a scenario; write scenario.resolved.yaml, requests.parquet, timeseries.parquet, summary.json and
    report.html into --out; print the summary."""
    from sim.run import run_scenario, write_outputs
    from sim.scenario import load_scenario

    try:
        if out.exists() and not out.is_dir():
            raise PalsError(f"--out {out}: exists and is not a folder")
        sc = load_scenario(scenario, set_ or [])
        outputs = run_scenario(sc)
        write_outputs(out, sc, outputs, report=not no_report)
    except PalsError as exc:
        _fail(exc)
    print_summary(outputs.summary)
    console.print(f"outputs in {out}/" + ("" if no_report else f"  (report: {out / 'report.html'})"))


@app.command()
def compare(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    policies: Annotated[str, typer.Option("--policies", "-p", help="Comma-separated policies.")] = "static,pals",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/compare"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: a.b.0.c=value (repeatable).")]
    = None,
) -> None:
    """Run a scenario under several policies; print their totals side by side and write DIR/<policy>/ outputs,
    DIR/compare.json and DIR/report.html."""
    from sim.compare import compare_rows, run_compare
    from sim.scenario import load_scenario

    names = [p.strip() for p in policies.split(",") if p.strip()]
    try:
        if out.exists() and not out.is_dir():
            raise PalsError(f"--out {out}: exists and is not a folder")
        sc = load_scenario(scenario, set_ or [])
        results = run_compare(sc, names, out)
    except PalsError as exc:
        _fail(exc)
    header, rows = compare_rows({p: r.summary for p, r in results.items()})
    print_table(f"{sc.name}: totals by policy (seed {sc.seed})", header, rows)
    console.print(f"outputs in {out}/<policy>/  (comparison report: {out / 'report.html'})")


@app.command()
def reproduce(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/reproduce"),
    quick: Annotated[bool, typer.Option("--quick", help="Shortened runs (minutes of simulated time).")] = False,
) -> None:
    """Reproduce the PALS paper's three experiments (and again on 8xH100): DIR/reproduction.json,
    DIR/reproduction.md (ours beside the paper's) and DIR/report.html."""
    from sim.reproduce import reproduce as run_reproduction
    from sim.reproduce import reproduction_markdown

    try:
        if out.exists() and not out.is_dir():
            raise PalsError(f"--out {out}: exists and is not a folder")
        result = run_reproduction(out, quick=quick)
    except PalsError as exc:
        _fail(exc)
    console.print(reproduction_markdown(result), markup=False, highlight=False)
    console.print(f"outputs in {out}/")


profile_app = typer.Typer(no_args_is_help=True, help="Profile tables: measured or simulated operating points (CSV).")
app.add_typer(profile_app, name="profile")


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PalsError(f"{option} {text!r}: expected comma-separated numbers, e.g. 150,200,250") from None
    if not values or any(not (0 < v < math.inf) for v in values):
        raise PalsError(f"{option} {text!r}: expected positive numbers")
    return values


def _whole(text: str, option: str) -> list[int]:
    """Comma-separated positive whole numbers (batch sizes)."""
    values = _floats(text, option)
    if any(v != int(v) for v in values):
        raise PalsError(f"{option} {text!r}: expected positive whole numbers, e.g. 8,16,32")
    return [int(v) for v in values]


def _gpu_names(text: str, option: str) -> list[str]:
    """Comma-separated catalog GPU names."""
    from sim.catalog.gpus import UnknownGpuError, get_gpu

    names = [g.strip() for g in text.split(",") if g.strip()]
    for name in names:
        try:
            get_gpu(name)
        except UnknownGpuError as exc:
            raise PalsError(f"{option}: {exc}") from None
    return names


@profile_app.command("import")
def profile_import(
    kind: Annotated[str, typer.Argument(help="Dataset: pals-a100, mlenergy or argonne.")],
    path: Annotated[Path, typer.Argument(help="The dataset's CSV file (ML.ENERGY: a folder of JSON files).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile table CSV to write.")],
    prompt_tokens_mean: Annotated[float | None, typer.Option(
        help="ML.ENERGY only: mean prompt tokens (the files do not carry it).")] = None,
    prompt_tokens_cv: Annotated[float | None, typer.Option(
        help="ML.ENERGY only: coefficient of variation of the prompt lengths (std / mean).")] = None,
) -> None:
    """Turn a public dataset into the profile table."""
    from sim.profile import (
        IMPORTERS,
        MAX_TOKENS_CV,
        MLENERGY_PROMPT_TOKENS_CV,
        MLENERGY_PROMPT_TOKENS_MEAN,
        import_mlenergy,
        write_table,
    )

    try:
        if kind not in IMPORTERS:
            raise PalsError(f"unknown dataset {kind!r}: expected one of {', '.join(IMPORTERS)}")
        for option, value in (("--prompt-tokens-mean", prompt_tokens_mean), ("--prompt-tokens-cv", prompt_tokens_cv)):
            if value is not None and kind != "mlenergy":
                raise PalsError(f"{option}: only for mlenergy (the {kind} data gives its prompt lengths)")
        if prompt_tokens_mean is not None and not 0 < prompt_tokens_mean < math.inf:
            raise PalsError(f"--prompt-tokens-mean {prompt_tokens_mean:g}: expected a positive number of tokens")
        if prompt_tokens_cv is not None and not 0 <= prompt_tokens_cv <= MAX_TOKENS_CV:
            raise PalsError(f"--prompt-tokens-cv {prompt_tokens_cv:g}: expected a number from 0 to {MAX_TOKENS_CV:g}")
        if kind == "mlenergy":
            mean = MLENERGY_PROMPT_TOKENS_MEAN if prompt_tokens_mean is None else prompt_tokens_mean
            cv = MLENERGY_PROMPT_TOKENS_CV if prompt_tokens_cv is None else prompt_tokens_cv
            table = import_mlenergy(path, mean, cv)
        else:
            table = IMPORTERS[kind](path)
        write_table(table, out)
    except PalsError as exc:
        _fail(exc)
    console.print(f"{len(table)} rows ({', '.join(sorted(set(table['model'])))}) written to {out}")


@profile_app.command("sim")
def profile_sim(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file (its first deployment is profiled).")],
    caps: Annotated[str, typer.Option("--caps", help="Comma-separated power caps (W).")],
    batches: Annotated[str, typer.Option("--batches", help="Comma-separated max_num_seqs values.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile table CSV to write.")],
    workload: Annotated[str | None, typer.Option(
        help="static-batches or saturate (default: static-batches for a static-batches scenario, else saturate).")]
    = None,
) -> None:
    """Write the profile table of a deployment from the simulator: every cap x batch, one simulated run each."""
    from sim.profile import simulated_profile, write_table
    from sim.scenario import load_scenario

    try:
        sc = load_scenario(scenario, [])
        table = simulated_profile(sc, _floats(caps, "--caps"), _whole(batches, "--batches"), workload)
        write_table(table, out)
    except PalsError as exc:
        _fail(exc)
    console.print(f"{len(table)} simulated operating points written to {out}")


@app.command()
def validate(
    table: Annotated[Path, typer.Argument(help="Profile table CSV (measured operating points).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/validate"),
    analytic: Annotated[bool, typer.Option("--analytic", help="Closed-form steady state instead of simulating.")]
    = False,
) -> None:
    """Simulate every row of a profile table; write validation.csv, validation.json (MAPE per metric, per
    source, model and GPU) and validation.html into --out."""
    from sim.profile import read_table
    from sim.validate import predict_table, summary_table, write_validation

    try:
        if out.exists() and not out.is_dir():
            raise PalsError(f"--out {out}: exists and is not a folder")
        rows = read_table(table)
        method = "analytic" if analytic else "simulate"
        validated = predict_table(rows, str(table), method)
        summary = write_validation(validated, out, f"Validation of {table.name}", method)
    except (PalsError, ValueError) as exc:
        _fail(exc)
    print_table(f"{table.name}: predicted vs measured, MAPE (%)", *summary_table(summary), whole_names=True)
    console.print(f"outputs in {out}/  (report: {out / 'validation.html'})")


@app.command()
def calibrate(
    tables: Annotated[list[Path], typer.Argument(help="Profile table CSVs (measured operating points), read as one.")],
    gpu: Annotated[str | None, typer.Option(help="Fit only this GPU's rows (default: every GPU in the tables).")]
    = None,
    applies_to: Annotated[str, typer.Option(
        "--applies-to", help="Comma-separated other GPU names that share the fit (same die).")] = "",
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", help="Where to write <gpu>.json (default: traces/calibration, read by the catalog).")] = None,
    measured: Annotated[list[str] | None, typer.Option(
        "--measured", help="NAME=VALUE: a parameter measured on the node, held there instead of fitted "
                           "(repeatable), e.g. idle_power_w=61 (nvidia-smi, no work running) or "
                           "compute_efficiency=0.77 (a GEMM microbenchmark).")] = None,
) -> None:
    """Fit the per-GPU-type and engine physics parameters to measured rows (scipy least squares) and write
    them, with the data they came from, where the catalog reads them. Rows of the --applies-to GPUs (same
    die) are fitted together with the GPU's own. Give --measured for what you measured on the node: the
    operating points place the idle draw loosely, yet under a low cap it decides what is left for work."""
    from sim.calibrate import PARAMS, fit, write_calibration
    from sim.catalog.calibration import CALIBRATION_DIR

    try:
        others = _gpu_names(applies_to, "--applies-to")
        rows = _read_tables(tables)
        point = ["gpu", "model", "num_gpus", "tensor_parallel", "expert_parallel", "power_cap_w", "max_num_seqs",
                 "workload", "prompt_tokens_mean", "output_tokens_mean"]
        repeats = int(rows.duplicated(subset=point).sum())
        if repeats:
            err_console.print(f"warning: {repeats} row(s) repeat another row's operating point: the fit and its "
                              "standard errors count each as a separate measurement", highlight=False)
        held = _measured(measured)
        gpus = [gpu] if gpu else sorted(set(rows["gpu"]) - set(others))
        _one_gpu_for_measured(held, gpus)
        for name in gpus:
            result = fit(rows, name, same_die=tuple(others), measured=held)
            path = write_calibration(result, ", ".join(str(t) for t in tables), rows, others,
                                     out_dir or CALIBRATION_DIR)
            lines = [[p.name, f"{getattr(result.gpu if p.part == 'gpu' else result.engine, p.name):.4g}",
                      _standard_error(result.std[p.name], p.name in result.held, p.name in result.measured)]
                     for p in PARAMS]
            print_table(f"{name}: fitted on {result.rows} rows", ["parameter", "value", "± std. error"], lines)
            console.print("in-sample MAPE: " + ", ".join(f"{k} {v:.1f} %" for k, v in result.mape.items()))
            for a, b, r in result.correlated:
                console.print(f"the data trades {a} against {b} (correlation {r:+.2f})")
            console.print(f"written to {path}")
    except (PalsError, ValueError) as exc:
        _fail(exc)


@app.command()
def holdout(
    tables: Annotated[list[Path], typer.Argument(help="Profile table CSVs (measured operating points), read as one.")],
    by: Annotated[str, typer.Option(help="Column whose values are held out: model, power_cap_w, max_num_seqs, "
                                         "source or gpu.")] = "model",
    train: Annotated[str, typer.Option(
        help="Comma-separated values of --by to fit on, predicting all the others (one fold); default: leave "
             "each value out in turn.")] = "",
    gpu: Annotated[str | None, typer.Option(help="Check this GPU's fit (default: every GPU in the tables).")] = None,
    applies_to: Annotated[str, typer.Option(
        "--applies-to", help="Comma-separated other GPU names fitted together with it (same die).")] = "",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write holdout.json into this folder.")] = None,
    measured: Annotated[list[str] | None, typer.Option(
        "--measured", help="NAME=VALUE: a parameter measured on the node, held there instead of fitted "
                           "(repeatable), e.g. idle_power_w=61 (nvidia-smi, no work running) or "
                           "compute_efficiency=0.77 (a GEMM microbenchmark).")] = None,
) -> None:
    """How well a calibration predicts what it never saw: fit without some rows (a model, some caps, ...)
    and predict them. Writes nothing where the catalog reads; prints MAPE per fold and, with several folds, over
    every held-out row together (and --out/holdout.json)."""
    from sim.calibrate import held_out_errors, pooled_mape
    from sim.io import write_json_atomic

    try:
        if out is not None and out.exists() and not out.is_dir():
            raise PalsError(f"--out {out}: exists and is not a folder")
        others = _gpu_names(applies_to, "--applies-to")
        rows = _read_tables(tables)
        train_values: list[Any] | None = None
        if train.strip():
            train_values = _floats(train, "--train") if by in ("power_cap_w", "max_num_seqs") else \
                [v.strip() for v in train.split(",") if v.strip()]
        report = {}
        held = _measured(measured)
        gpus = [gpu] if gpu else sorted(set(rows["gpu"]) - set(others))
        _one_gpu_for_measured(held, gpus)
        for name in gpus:
            folds = held_out_errors(rows, name, by, train_values, tuple(others), held)
            metrics = [m for m in HELD_OUT_LABELS if any(m in f.mape for f in folds)]
            lines = [[", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in f.held_out),
                      str(f.train_rows), str(f.test_rows),
                      *[f"{f.mape[m]:.1f}" if m in f.mape else "-" for m in metrics]] for f in folds]
            pooled = pooled_mape(folds)
            if len(folds) > 1:  # every held-out row, each predicted by the fit that left it out
                lines.append(["all folds", "-", str(sum(f.test_rows for f in folds)),
                              *[f"{pooled[m]:.1f}" if m in pooled else "-" for m in metrics]])
            print_table(f"{name}: each fold fitted without its rows, then predicting them",
                        [by, "fit rows", "held out", *[f"{HELD_OUT_LABELS[m]} %" for m in metrics]], lines)
            report[name] = {"folds": [{"held_out": list(f.held_out), "train_rows": f.train_rows,
                                       "test_rows": f.test_rows, "rows_measured": f.rows_measured,
                                       "mape_percent": f.mape} for f in folds],
                            "all_folds_mape_percent": pooled}
        if out is not None:
            write_json_atomic(out / "holdout.json", {"tables": [str(t) for t in tables], "by": by,
                                                     "train": train_values, "measured": held,
                                                     "gpus": report})
            console.print(f"written to {out / 'holdout.json'}")
    except (PalsError, ValueError) as exc:
        _fail(exc)


HELD_OUT_LABELS = {"throughput_tokens_per_s": "throughput MAPE", "power_w_per_gpu": "power MAPE",
                   "itl_median_s": "ITL MAPE"}


def _read_tables(tables: list[Path]) -> Any:
    """Profile tables read, checked against the catalog and concatenated (one DataFrame)."""
    import pandas as pd

    from sim.profile import check_catalog, read_table

    parts = []
    for table in tables:
        part = read_table(table)
        check_catalog(part, str(table))
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _measured(options: list[str] | None) -> dict[str, float]:
    """``--measured NAME=VALUE`` options as a mapping (the names and values are checked by the fit)."""
    out: dict[str, float] = {}
    for option in options or []:
        name, sep, value = option.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            number = float(value)
        except ValueError:
            raise PalsError(f"--measured {option!r}: expected NAME=VALUE with a number, e.g. idle_power_w=61") \
                from None
        if name.strip() in out:
            raise PalsError(f"--measured {option!r}: {name.strip()} is given twice")
        out[name.strip()] = number
    return out


def _one_gpu_for_measured(measured: dict[str, float], gpus: list[str]) -> None:
    """Figures measured on a node belong to one GPU type: refuse them for a fit over several."""
    if measured and len(gpus) > 1:
        raise PalsError(f"--measured: the tables hold rows of several GPUs ({', '.join(gpus)}); name the one "
                        "it was measured on with --gpu")


def _standard_error(std: float, held: bool, measured: bool = False) -> str:
    if measured:
        return "measured"
    if held:
        return "held"
    return f"{std:.2g}" if math.isfinite(std) else "at a bound"


@app.command()
def schema() -> None:
    """Print the scenario JSON schema."""
    from sim.scenario import Scenario

    s = Scenario.model_json_schema()
    s.get("properties", {}).pop("base_dir", None)
    typer.echo(json.dumps(s, indent=2))


@app.command()
def catalog() -> None:
    """List the GPUs and models of the catalog."""
    from sim.catalog import GPUS, MODEL_NAMES, load_model

    t = Table(title="GPUs")
    for i, c in enumerate(("name", "bf16 TFLOP/s", "HBM TB/s", "HBM GiB", "power limit W", "idle W", "NVLink GB/s")):
        t.add_column(c, no_wrap=i == 0)  # names that differ at their end (a100-sxm4-40gb / -80gb) stay whole
    for g in GPUS.values():
        t.add_row(g.name, f"{g.peak_bf16_flops / 1e12:.0f}", f"{g.hbm_bandwidth_bytes_per_s / 1e12:.2f}",
                  f"{g.hbm_bytes / 1024**3:.0f}", f"{g.power_limit_min_w:.0f}-{g.power_limit_max_w:.0f}",
                  f"{g.idle_power_w:.0f}", f"{g.nvlink_bandwidth_bytes_per_s / 1e9:.0f}")
    console.print(t)
    m = Table(title="Models")
    for i, c in enumerate(("name", "params (B)", "active (B)", "experts", "top-k", "KV KiB/token")):
        m.add_column(c, no_wrap=i == 0)
    for name in MODEL_NAMES:
        s = load_model(name)
        m.add_row(name, f"{s.total_params / 1e9:.1f}", f"{s.active_params_per_token / 1e9:.1f}",
                  str(s.num_experts or "-"), str(s.experts_per_token or "-"), f"{s.kv_bytes_per_token / 1024:.0f}")
    console.print(m)


def _register_subcommands() -> None:
    """The sweep command and the hardware side's commands (``hil`` is imported only here, for the CLI)."""
    from hil.cli import register as register_hil
    from hil.twin_cli import register as register_twin
    from sim.sweep.cli import register as register_sweep

    register_sweep(app)
    register_hil(app)
    register_twin(app)


_register_subcommands()


def main() -> None:
    """Entry point: PalsError → one message and exit code 2."""
    from sim.catalog.calibration import calibration_problem

    problem = calibration_problem()  # a bad PALS_CALIBRATION_DIR or calibration file: refuse before any command
    if problem:
        err_console.print(f"[bold red]error:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    try:
        app()
    except PalsError as exc:  # pragma: no cover - commands handle their own
        err_console.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
