"""``pals sweep``: run a grid of scenarios on Dask, record every run in DIR/results.parquet, write DIR/report.html."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sim.errors import PalsError

console = Console()
err_console = Console(stderr=True)


def _progress_bar() -> Progress:
    return Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("failed [red]{task.fields[failed]}[/]  on workers {task.fields[running]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)


def _stop(bar: Progress) -> None:
    if bar.live.is_started:
        bar.stop()


def sweep(
    spec: Annotated[Path, typer.Argument(help="Sweep spec YAML (base scenario, grid, zip, seeds, derived).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: results.parquet, report.html.")],
    workers: Annotated[int | None, typer.Option("--workers", "-w", min=1,
                                                help="LocalCluster worker processes (default: one per core).")]
    = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Use an existing Dask scheduler, "
                                                  "tcp://HOST:PORT, instead of a LocalCluster.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Complete the sweep in --out: skip the runs already "
                                         "recorded in results.parquet.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="With --resume: run the recorded failed "
                                               "runs again.")] = False,
) -> None:
    """Run every combination of a sweep spec on Dask; append each finished run to DIR/results.parquet
    (atomically) and write DIR/report.html."""
    from sim.sweep.execute import run_sweep

    if retry_failed and not resume:
        err_console.print("[bold red]error:[/] --retry-failed needs --resume", highlight=False)
        raise typer.Exit(code=2)
    if workers is not None and scheduler:
        err_console.print("[bold red]error:[/] --workers and --scheduler exclude each other (the scheduler's "
                          "workers run the sweep)", highlight=False)
        raise typer.Exit(code=2)
    bar = _progress_bar()  # shown from the first update: after the spec is validated, not before an error
    task = bar.add_task("sweep", total=None, failed=0, running=0)

    def update(done: int, failed: int, running: int, total: int) -> None:
        if not bar.live.is_started:  # runs already recorded (--resume) must not count in the speed behind the ETA
            bar.reset(task, total=total, completed=done, failed=failed, running=running)
            bar.start()
        bar.update(task, completed=done, total=total, failed=failed, running=running)

    terminated: list[int] = []

    def on_sigterm(signum: int, _frame: object) -> None:  # as Ctrl-C: cancel the runs, close the cluster
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = run_sweep(spec, out, workers=workers, scheduler=scheduler, resume=resume,
                           retry_failed=retry_failed, progress=update)
    except PalsError as exc:
        _stop(bar)
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        _stop(bar)
        results = out / "results.parquet"
        where = (f"the finished runs are in {escape(str(results))}" if results.is_file()
                 else "no run had finished")
        err_console.print(f"interrupted: {where}; rerun with --resume to complete the sweep", highlight=False)
        raise typer.Exit(code=128 + signal.SIGTERM if terminated else 130) from None
    finally:
        _stop(bar)
        signal.signal(signal.SIGTERM, previous)
    console.print(f"{result.total} runs: {result.ok} ok, {result.failed} failed"
                  + (f" ({result.skipped} already recorded)" if result.skipped else ""), soft_wrap=True)
    console.print(f"results in {result.results_path}  (report: {result.report_path})", soft_wrap=True)
    if result.failed:  # recorded with their errors; a script must still see that the sweep is not all there
        err_console.print(f"error: {result.failed} run(s) failed (their errors are in the results' error column); "
                          "fix them and rerun with --resume --retry-failed", highlight=False)
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add the sweep command to the ``pals`` CLI."""
    app.command(name="sweep")(sweep)
