"""Model architectures read from Hugging Face ``config.json`` fields.

Only architecture comes from here; nothing in the physics is tuned per model. A ``ModelSpec`` holds
the figures the physics needs: parameter and byte counts of the dense part and of one expert, the
FLOPs of one token, and the KV-cache bytes of one token. Supported families: Llama / Qwen / Mistral
(dense), Mixtral, Qwen2-MoE / Qwen3-MoE, OLMoE, DeepSeek-MoE / DeepSeek-V2 (MLA), Phi-3.5-MoE,
gpt-oss (MXFP4 experts, sliding-window layers) and Llama 4 (nested ``text_config``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_CONFIG_DIR = Path(__file__).parent / "models"
MODEL_NAMES: tuple[str, ...] = tuple(sorted(p.stem for p in _CONFIG_DIR.glob("*.json")))

_DTYPE_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "float8_e4m3fn": 1.0}
# MXFP4: 4-bit values plus one shared 8-bit scale per 32 values = 4.25 bits per weight.
_MXFP4_BYTES = 4.25 / 8


class ModelConfigError(ValueError):
    """A model config is missing a field or holds an impossible value."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture figures of one model, derived from its config fields."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    # Parameters (counts, not bytes).
    dense_params: int  # everything that every token uses: attention, dense FFNs, shared experts, norms, router
    embedding_params: int  # input embedding + LM head (counted once if tied)
    expert_params: int  # one routed expert of one MoE layer
    num_moe_layers: int
    num_experts: int  # routed experts per MoE layer (0 for dense)
    experts_per_token: int  # top-k
    # Bytes per parameter.
    weight_bytes_per_param: float
    expert_bytes_per_param: float
    # KV cache and attention.
    kv_bytes_per_token: float  # all layers, all KV heads (full-attention layers)
    kv_bytes_per_token_windowed: float  # bytes per token of sliding-window layers
    sliding_window: int  # tokens kept by sliding-window layers (0: none)
    attn_flops_per_context_token: float  # score + value FLOPs per query token per cached token, full layers
    attn_flops_per_context_token_windowed: float
    max_position_embeddings: int
    kv_latent: bool = False  # MLA: one latent vector per layer shared by all heads (not split by TP)
    expert_intermediate_size: int = 0  # hidden width of one routed expert's MLP (0 for dense)

    @property
    def is_moe(self) -> bool:
        """True when the model has routed experts."""
        return self.num_experts > 0

    @property
    def total_params(self) -> int:
        """All parameters, including every expert and the embeddings."""
        return self.dense_params + self.embedding_params + self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def active_params_per_token(self) -> int:
        """Parameters one token multiplies through (LM head included, input embedding lookup excluded)."""
        lm_head = self.vocab_size * self.hidden_size
        return self.dense_params + lm_head + self.num_moe_layers * self.experts_per_token * self.expert_params

    @property
    def dense_weight_bytes(self) -> float:
        """Bytes of the non-expert weights (embeddings included)."""
        return (self.dense_params + self.embedding_params) * self.weight_bytes_per_param

    @property
    def expert_weight_bytes(self) -> float:
        """Bytes of one routed expert of one layer."""
        return self.expert_params * self.expert_bytes_per_param

    @property
    def total_weight_bytes(self) -> float:
        """Bytes of all weights."""
        return self.dense_weight_bytes + self.num_moe_layers * self.num_experts * self.expert_weight_bytes


def _get(cfg: dict[str, Any], *keys: str, default: Any = None, required: bool = False, where: str = "") -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if required:
        raise ModelConfigError(f"{where}: missing field {' or '.join(repr(k) for k in keys)}")
    return default


def _int(cfg: dict[str, Any], *keys: str, default: int | None = None, required: bool = False, where: str = "",
         positive: bool = False) -> int:
    """A whole-number field (the first of ``keys`` present), checked: an error names the field and the value."""
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        if required:
            raise ModelConfigError(f"{where}: missing field {' or '.join(repr(k) for k in keys)}")
        return int(default or 0)
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value != int(value):
        raise ModelConfigError(f"{where}: {key} must be a whole number, got {value!r}")
    if positive and value <= 0:
        raise ModelConfigError(f"{where}: {key} must be positive, got {int(value)}")
    return int(value)


def model_from_config(cfg: dict[str, Any], name: str = "custom", where: str | None = None) -> ModelSpec:
    """Build a ``ModelSpec`` from a Hugging Face ``config.json`` mapping.

    ``where`` names the source (a file path) in error messages.
    """
    where = where or name
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{where}: a model config must be a mapping of config.json fields")
    if isinstance(cfg.get("text_config"), dict):  # Llama 4 and other multimodal wrappers
        outer = {k: cfg[k] for k in ("torch_dtype", "dtype", "tie_word_embeddings", "quantization_config")
                 if k in cfg}
        cfg = {**outer, **cfg["text_config"]}

    hidden = _int(cfg, "hidden_size", "d_model", required=True, where=where, positive=True)
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers", required=True, where=where, positive=True)
    heads = _int(cfg, "num_attention_heads", "n_head", required=True, where=where, positive=True)
    kv_heads = _int(cfg, "num_key_value_heads", default=heads, where=where, positive=True)
    head_dim = _int(cfg, "head_dim", default=hidden // heads, where=where, positive=True)
    vocab = _int(cfg, "vocab_size", required=True, where=where, positive=True)
    intermediate = _int(cfg, "intermediate_size", default=4 * hidden, where=where, positive=True)
    tied = bool(cfg.get("tie_word_embeddings", False))
    max_pos = _int(cfg, "max_position_embeddings", default=4096, where=where, positive=True)
    if head_dim <= 0:
        raise ModelConfigError(f"{where}: head_dim is 0 (hidden_size {hidden} < num_attention_heads {heads}): give "
                               "head_dim")
    weight_bytes = _DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), 2.0)
    quant = cfg.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "fp8":  # e.g. DeepSeek-V3: every linear layer in FP8
        weight_bytes = 1.0
    expert_bytes = _MXFP4_BYTES if method == "mxfp4" else weight_bytes

    # --- attention (per layer) ---
    kv_lora_rank = _int(cfg, "kv_lora_rank", default=0, where=where)
    if kv_lora_rank:  # DeepSeek-V2/V3 multi-head latent attention
        rope = _int(cfg, "qk_rope_head_dim", required=True, where=where)
        nope = _int(cfg, "qk_nope_head_dim", required=True, where=where)
        v_dim = _int(cfg, "v_head_dim", required=True, where=where)
        q_lora = _int(cfg, "q_lora_rank", default=0, where=where)
        q_params = hidden * heads * (nope + rope) if not q_lora else hidden * q_lora + q_lora * heads * (nope + rope)
        attn_params = (q_params + hidden * (kv_lora_rank + rope) + kv_lora_rank * heads * (nope + v_dim)
                       + heads * v_dim * hidden)
        kv_per_layer = (kv_lora_rank + rope) * weight_bytes  # latent vector + shared rope key, cached once
        # Absorbed MLA: scores over (latent + rope) dims, values over the latent, for every head.
        attn_flops_layer = 2.0 * heads * (kv_lora_rank + rope) + 2.0 * heads * kv_lora_rank
    else:
        attn_params = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
        if cfg.get("attention_bias") or cfg.get("model_type") in ("qwen2_moe", "qwen2"):
            attn_params += (heads + 2 * kv_heads) * head_dim
        kv_per_layer = 2 * kv_heads * head_dim * weight_bytes
        attn_flops_layer = 4.0 * heads * head_dim  # QK^T and AV, 2 FLOPs per multiply-add

    # --- which layers use sliding-window attention (gpt-oss alternates) ---
    layer_types = cfg.get("layer_types")
    window = _int(cfg, "sliding_window", default=0, where=where)
    if layer_types and window:
        n_windowed = sum(1 for t in layer_types if t == "sliding_attention")
    else:
        n_windowed, window = 0, 0
    n_full = layers - n_windowed

    # --- MoE structure ---
    num_experts = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0, where=where)
    top_k = _int(cfg, "num_experts_per_tok", "experts_per_token", "moe_topk", default=0, where=where)
    if num_experts and not top_k:
        raise ModelConfigError(f"{where}: MoE config has {num_experts} experts but no num_experts_per_tok")
    if num_experts and top_k > num_experts:
        raise ModelConfigError(f"{where}: num_experts_per_tok={top_k} exceeds the {num_experts} experts")
    moe_layer_ids: list[int] = []
    if num_experts:
        first_dense = _int(cfg, "first_k_dense_replace", default=0, where=where)
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        if cfg.get("moe_layer_freq") is not None:  # DeepSeek: layer i is MoE when i % freq == 0
            freq = _int(cfg, "moe_layer_freq", where=where) or 1
            moe_layer_ids = [i for i in range(layers) if i >= first_dense and i % freq == 0]
        else:  # Qwen decoder_sparse_step, Llama 4 interleave_moe_layer_step: (i + 1) % step == 0
            step = _int(cfg, "decoder_sparse_step", "interleave_moe_layer_step", default=1, where=where) or 1
            moe_layer_ids = [i for i in range(layers)
                             if i >= first_dense and (i + 1) % step == 0 and i not in mlp_only]
    n_moe = len(moe_layer_ids)
    expert_inter = _int(cfg, "moe_intermediate_size", default=intermediate, where=where, positive=True) \
        if num_experts else 0
    expert_params = 3 * hidden * expert_inter if num_experts else 0  # gated MLP: gate, up, down
    if num_experts and cfg.get("model_type") == "gpt_oss":
        expert_params += 2 * expert_inter + hidden  # gate_up and down biases

    shared = 0
    if num_experts:
        if cfg.get("shared_expert_intermediate_size"):  # Qwen2-MoE
            shared = 3 * hidden * _int(cfg, "shared_expert_intermediate_size", where=where) + hidden  # + its gate
        elif cfg.get("n_shared_experts"):  # DeepSeek-MoE / V2
            shared = 3 * hidden * expert_inter * _int(cfg, "n_shared_experts", where=where)
        elif cfg.get("model_type") in ("llama4_text", "llama4"):
            shared = 3 * hidden * expert_inter
    router = hidden * num_experts if num_experts else 0
    dense_ffn_inter = _int(cfg, "intermediate_size_mlp", default=intermediate, where=where, positive=True)
    dense_ffn = 3 * hidden * dense_ffn_inter
    norms = 2 * hidden
    per_layer_common = attn_params + norms
    dense_params = layers * per_layer_common + (layers - n_moe) * dense_ffn + n_moe * (shared + router) + hidden
    embedding_params = vocab * hidden * (1 if tied else 2)

    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        dense_params=dense_params,
        embedding_params=embedding_params,
        expert_params=expert_params,
        num_moe_layers=n_moe,
        num_experts=num_experts,
        experts_per_token=top_k,
        weight_bytes_per_param=weight_bytes,
        expert_bytes_per_param=expert_bytes,
        kv_bytes_per_token=n_full * kv_per_layer,
        kv_bytes_per_token_windowed=n_windowed * kv_per_layer,
        sliding_window=window,
        attn_flops_per_context_token=n_full * attn_flops_layer,
        attn_flops_per_context_token_windowed=n_windowed * attn_flops_layer,
        max_position_embeddings=max_pos,
        kv_latent=bool(kv_lora_rank),
        expert_intermediate_size=expert_inter,
    )


@cache
def _catalog_model(name: str) -> ModelSpec:
    path = _CONFIG_DIR / f"{name}.json"
    return model_from_config(json.loads(path.read_text()), name=name, where=str(path))


def load_model(ref: str | dict[str, Any] | Path, name: str | None = None) -> ModelSpec:
    """Resolve a model reference: a catalog name, a path to a ``config.json``, or an inline mapping."""
    if isinstance(ref, dict):
        return model_from_config(ref, name=name or str(ref.get("_name_or_path", "inline")), where="inline model")
    text = str(ref)
    if text in MODEL_NAMES:
        return _catalog_model(text)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ModelConfigError(f"model config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return model_from_config(cfg, name=name or path.parent.name or path.stem, where=str(path))
    raise ModelConfigError(
        f"unknown model {text!r}: expected a catalog name ({', '.join(MODEL_NAMES)}), a path to a config.json, "
        "or an inline mapping of config fields"
    )
