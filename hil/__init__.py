"""The hardware side of pals: NVML GPUs, the vLLM driver, the wall-clock control loop, profiling and
validation. It may import ``sim``; ``sim`` never imports it (except lazily, for CLI subcommands)."""
