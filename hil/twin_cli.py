"""``pals twin``: serve a scenario's first deployment as a digital twin (see ``hil.twin``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the twin command to the ``pals`` CLI."""

    @app.command()
    def twin(
        scenario: Annotated[Path, typer.Argument(help="Scenario YAML file (its first deployment is served).")],
        host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="TCP port (0: pick a free one and print it).")] = 8000,
        speedup: Annotated[float, typer.Option(
            "--speedup", help="Simulated seconds per wall-clock second.")] = 1.0,
        set_: Annotated[list[str] | None, typer.Option(
            "--set", help="Override a field: a.b.0.c=value (repeatable).")] = None,
    ) -> None:
        """Serve a digital twin: an OpenAI completions API (vLLM semantics) whose token timing comes from the
        simulator running in real time (x --speedup), and an NVML-like device endpoint (/nvml/devices) to read
        power and energy and set power limits. Runs until Ctrl-C or SIGTERM."""
        from sim.cli import _fail, console
        from sim.errors import PalsError
        from sim.scenario import load_scenario

        try:
            if not (speedup > 0 and math.isfinite(speedup)):
                raise PalsError(f"--speedup {speedup:g}: expected a positive number")
            if not 0 <= port <= 65535:
                raise PalsError(f"--port {port}: expected 0-65535")
            sc = load_scenario(scenario, set_ or [])
        except PalsError as exc:
            _fail(exc)

        from hil.twin import TwinServer, serve

        def announce(server: TwinServer) -> None:
            sim = server.sim
            dep = sim.deployment
            console.print(f"pals twin: {sc.name}: {server.model_name} on {len(sim.engines)} replica(s) x "
                          f"{sim.phys.par.num_gpus} {sim.gpu_spec.name} ({len(sim.gpus)} devices), "
                          f"max_num_seqs {dep.engine.max_num_seqs}, max_model_len {sim.max_model_len}, "
                          f"speed-up {sim.speedup:g}x", highlight=False, soft_wrap=True)
            console.print(f"serving on {server.url}  (completions: {server.url}/v1/completions, devices: "
                          f"{server.url}/nvml/devices)", highlight=False, soft_wrap=True)
            console.file.flush()

        try:
            serve(sc, host, port, speedup, announce)
        except OSError as exc:
            _fail(PalsError(str(exc)))
        console.print("pals twin: stopped", highlight=False)
