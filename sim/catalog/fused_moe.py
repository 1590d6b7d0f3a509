"""Which fused-MoE kernel configuration vLLM runs a deployment's experts with: a tuned one, or its default.

vLLM's Triton fused-MoE kernel reads its tile sizes from a tuned file named by the layer's local shape (``E``
experts on one GPU, each ``N`` wide on one GPU) and the device; where no such file exists it logs "Using default
MoE config. Performance might be sub-optimal!" and falls back to a default. Up to early 2026 that default had two
branches: 16-token tiles while the step's tokens ``M`` are at most ``E``, and 64-token tiles, a 32-wide K loop and
no pipelining hints above it. Above ``E`` the default streams an expert's weights markedly slower than a tuned tile
until its tiles fill (64 tokens per expert); kernel benchmarks put it 1.26x slower than the tuned config at 32
tokens for a 16-local-expert A100 shape (vLLM PR #37814), 1.6x for Mixtral's shape on an H20 and within 3 % once
tiles fill (vLLM PR #44152). The physics charges that as ``EngineOverheads.default_moe_config_slowdown`` on the
expert weight stream (see ``sim.physics``).

``DEFAULT_CONFIG_SHAPES`` lists, per catalog GPU, the bf16 local shapes of catalog models for which vLLM's
``fused_moe/configs`` folder held no tuned file in v0.11 (checked by file name): expert-parallel layouts of
Qwen3-235B-A22B, the small-expert models under TP4 on the A100, Qwen3-30B-A3B on one B200 (its file arrived in
December 2025, vLLM PR #31448). Every other shape is taken as tuned; a scenario can say otherwise
(``engine.fused_moe_config``).
"""

from __future__ import annotations

from sim.catalog.models import ModelSpec

# The default config's token tile above ``E`` tokens: past this many tokens per expert its tiles are full.
DEFAULT_CONFIG_TILE_TOKENS = 64

DEFAULT_CONFIG_SHAPES: dict[str, frozenset[tuple[int, int]]] = {
    # DeepSeek-MoE-16B, Qwen1.5-MoE-A2.7B (1408 / 4) and OLMoE (1024 / 4) under TP4, as PALS ran them.
    "a100-sxm4-80gb": frozenset({(64, 352), (60, 352), (64, 256)}),
    "a100-sxm4-40gb": frozenset({(64, 352), (60, 352), (64, 256)}),  # checked for this device name too
    # Qwen3-235B-A22B with expert parallelism over 8 and 4 GPUs (16 or 32 whole 1,536-wide experts per GPU).
    "h100-sxm": frozenset({(16, 1536), (32, 1536)}),
    "h200": frozenset({(16, 1536), (32, 1536)}),
    # The same on B200, and Qwen3-30B-A3B on one GPU (E=128, N=768: tuned file added after v0.11).
    "b200": frozenset({(16, 1536), (32, 1536), (128, 768)}),
}


def local_moe_shape(model: ModelSpec, tensor: int, data: int = 1, expert: bool = False) -> tuple[int, int]:
    """``(E, N)`` of the busiest GPU's fused-MoE layer: under expert parallelism whole experts spread over the
    ``tensor x data`` ranks (the first ranks take one more where they do not divide evenly), else every expert
    sliced ``tensor`` ways (a scenario has data-parallel ranks only with expert parallelism)."""
    if expert:
        return -(-model.num_experts // max(1, tensor * data)), model.expert_intermediate_size
    return model.num_experts, model.expert_intermediate_size // max(1, tensor)


def runs_default_moe_config(model: ModelSpec, gpu_name: str, tensor: int, data: int = 1,
                            expert: bool = False) -> bool:
    """Whether vLLM runs this deployment's experts with its default fused-MoE config (no tuned file for the
    local shape on this GPU; see ``DEFAULT_CONFIG_SHAPES``). Always False for a dense model."""
    if not model.is_moe:
        return False
    return local_moe_shape(model, tensor, data, expert) in DEFAULT_CONFIG_SHAPES.get(gpu_name, frozenset())
