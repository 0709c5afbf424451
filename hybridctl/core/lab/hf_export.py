"""The correspondence between hybridctl's model and fla's `GatedDeltaNetForCausalLM` (flash-linear-attention 0.6):
its config.json, and every tensor's name and layout in both directions.

Established line by line against fla's modelling code (models/gated_deltanet, layers/gated_deltanet.py,
layers/attn.py, modules/{mlp,rotary,norm,causal_conv1d}):

- Block: both pre-norm, x + mixer(norm(x)) then x + mlp(norm(x)); RMSNorm with weight, eps = model.norm_eps
  (fla passes config.norm_eps to every norm, the Gated DeltaNet's output norm included), final RMSNorm, no
  embedding scale.
- Gated DeltaNet: hybridctl's `in_proj` is fla's q_proj, k_proj, v_proj, g_proj stacked in that order, `ab_proj`
  is a_proj then b_proj, `conv_weight` is the three depthwise convolutions' weights stacked ([C, W], tap W-1 on the
  current token, as fla's Conv1d weight [C, 1, W]); both apply SiLU after the convolution, L2-normalise q and k
  in the kernel, beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias) in fp32, scale K^-0.5, and an RMSNorm
  of each head's output gated by SiLU(g_proj) (fla's FusedRMSNormGated, "swish"), then o_proj.
- Attention: `qkv_proj` is q_proj, k_proj, v_proj stacked (no bias, num_kv_heads = num_heads); rotate-half RoPE
  (fla's RotaryEmbedding, interleaved=False) over the whole head with inv_freq = 1 / theta^(2i/D); softmax scale
  D^-0.5; a window of N keys is flash-attn's window (N-1, 0), as hybridctl's (itself and the N-1 before it).
- MLP: `gate_up` is gate_proj then up_proj; silu(gate) * up, then down_proj.
- Vocabulary: hybridctl pads its embedding rows to a multiple of 64 and slices the logits back to vocab_size;
  the padding rows are never an input and never in the logits, so the export keeps the vocab_size real rows
  only, and fla's logits are hybridctl's.

What fla's model cannot express (sparse attention layers, MoE MLPs, a setting this module does not know) is
refused by `check_exportable` with one line that names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hybridctl.core.config import ModelConfig, build_dataclass, validate, Config
from hybridctl.core.errors import ConfigError

FLA_ARCHITECTURE = "GatedDeltaNetForCausalLM"
FLA_MODEL_TYPE = "gated_deltanet"
EXPORT_FORMAT = 1  # of the "hybridctl" block in config.json

# ModelConfig fields the mapping above accounts for. Any other field (one added to hybridctl later) must keep its
# default value, or the export is refused: a new setting may change what the model computes.
MAPPED_FIELDS = {
    "d_model", "n_layers", "n_heads", "attention_layers", "pattern", "vocab_size", "d_ff", "norm_eps", "init_std",
    "tie_embeddings", "gdn.num_heads", "gdn.head_dim", "gdn.expand_v", "gdn.conv_size", "attention.window",
    "attention.rope_theta", "moe.n_experts",
    # how hybridctl computes the same function (kernel choice, chunking), not what it computes
    "gdn.chunk_size", "gdn.backend",
}
# Settings of parts that an exportable model does not have (no D layer, no MoE layer): any value is fine.
UNUSED_WHEN_ABSENT = ("dsa.", "moe.")

FLA_MAX_HEAD_DIM = 256  # fla's rotary kernel (attention heads) and chunked delta rule (key heads) stop there


def flat_fields(obj, prefix: str = "") -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first part of the model that fla's GatedDeltaNetForCausalLM cannot express."""
    kinds = cfg.layer_types()
    if "D" in kinds:
        layers = [i for i, k in enumerate(kinds) if k == "D"]
        raise ConfigError(
            f"layers {layers} are DeepSeek sparse attention (D in model.pattern '{''.join(kinds)}'), which fla's "
            "GatedDeltaNet model has no layer for; only runs of L and F layers can be exported"
        )
    if cfg.moe.n_experts > 0:
        raise ConfigError(
            f"model.moe.n_experts = {cfg.moe.n_experts}: fla's GatedDeltaNet model has no mixture-of-experts MLP; "
            "only runs with dense SwiGLU MLPs (n_experts = 0) can be exported"
        )
    defaults = flat_fields(ModelConfig())
    for key, value in flat_fields(cfg).items():
        if key in MAPPED_FIELDS or key.startswith(UNUSED_WHEN_ABSENT):
            continue
        if value != defaults.get(key, object()):
            raise ConfigError(f"model.{key} = {value!r} is a setting this exporter does not map to fla's model; "
                              "export a run that leaves it at its default")
    if "F" in kinds and cfg.d_model // cfg.n_heads > FLA_MAX_HEAD_DIM:
        raise ConfigError(f"attention head dim {cfg.d_model // cfg.n_heads} (model.d_model / model.n_heads) is above "
                          f"{FLA_MAX_HEAD_DIM}, the largest fla's rotary kernel takes")
    if "L" in kinds and cfg.gdn.head_dim > FLA_MAX_HEAD_DIM:
        raise ConfigError(f"model.gdn.head_dim {cfg.gdn.head_dim} is above {FLA_MAX_HEAD_DIM}, the largest key head "
                          "fla's chunked Gated DeltaNet kernel takes")


# ---------------------------------------------------------------------------------------------------------
# config.json


def hf_config(cfg: ModelConfig, max_positions: int, eos_id: int, source: dict[str, Any]) -> dict[str, Any]:
    """fla's GatedDeltaNetConfig as a config.json dict; `source` (run, checkpoint, step, tokenizer) goes into a
    "hybridctl" block with the full model config, which transformers keeps as an attribute and fla ignores."""
    check_exportable(cfg)
    kinds = cfg.layer_types()
    attention = [i for i, k in enumerate(kinds) if k == "F"]
    g = cfg.gdn
    return {
        "architectures": [FLA_ARCHITECTURE],
        "model_type": FLA_MODEL_TYPE,
        "dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "max_position_embeddings": max_positions,
        "norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Gated DeltaNet layers
        "attn_mode": "chunk",
        "num_heads": g.num_heads,
        "num_v_heads": None,
        "head_dim": g.head_dim,
        "expand_v": g.expand_v,
        "use_gate": True,
        "output_gate_activation": "swish",
        "use_short_conv": True,
        "conv_size": g.conv_size,
        "allow_neg_eigval": False,
        # attention layers (none: null)
        "attn": {
            "layers": attention,
            "num_heads": cfg.n_heads,
            "num_kv_heads": cfg.n_heads,
            "qkv_bias": False,
            "window_size": cfg.attention.window or None,
            "rope_theta": cfg.attention.rope_theta,
        } if attention else None,
        # MLP
        "hidden_act": "swish",
        "intermediate_size": cfg.ffn_dim,
        "hidden_ratio": None,
        # fla's defaults, written out: these choose kernels and the training loss, not the model's outputs
        "fuse_norm": True,
        "fuse_swiglu": True,
        "fuse_cross_entropy": True,
        "fuse_linear_cross_entropy": False,
        "use_l2warp": False,
        "attnres_block_size": None,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "hybridctl": {"format": EXPORT_FORMAT, **source, "model": dataclasses.asdict(cfg)},
    }


def _require_value(config: dict, key: str, expected, why: str) -> None:
    if config.get(key, expected) != expected:
        raise ConfigError(f"config.json has {key} = {config[key]!r}; hybridctl's model {why}")


def model_config_from_hf(config: dict[str, Any]) -> ModelConfig:
    """config.json -> the hybridctl ModelConfig of the same model. fla's fields decide; the "hybridctl" block
    (when present) supplies what fla's config does not hold: how hybridctl computes it (gdn.chunk_size,
    gdn.backend), model.n_heads where no layer is attention, and the spelling of the layer choice."""
    if config.get("model_type") != FLA_MODEL_TYPE:
        raise ConfigError(f"config.json has model_type {config.get('model_type')!r}, not '{FLA_MODEL_TYPE}'; "
                          "give a folder written by `hybridctl export`")
    for key, expected, why in (
        ("use_gate", True, "always has the output gate"), ("use_short_conv", True, "always has the short convolutions"),
        ("allow_neg_eigval", False, "keeps beta in (0, 1)"), ("num_v_heads", None, "has as many value heads as key heads"),
        ("hidden_act", "swish", "uses SwiGLU MLPs"), ("attnres_block_size", None, "has plain residual connections"),
    ):
        _require_value(config, key, expected, why)
    if config.get("output_gate_activation", "swish") not in ("swish", "silu"):
        raise ConfigError(f"config.json has output_gate_activation = {config['output_gate_activation']!r}; hybridctl's gate is SiLU")
    saved = (config.get("hybridctl") or {}).get("model") or {}
    cfg = build_dataclass(ModelConfig, saved, "model") if saved else ModelConfig()
    n_layers = config["num_hidden_layers"]
    attn = config.get("attn") or {}
    if isinstance(attn, list):
        raise ConfigError("config.json gives several attention specifications; hybridctl's attention layers share one")
    attention = sorted(attn.get("layers", []))
    letters = "".join("F" if i in attention else "L" for i in range(n_layers))
    cfg.d_model, cfg.n_layers = config["hidden_size"], n_layers
    if attention:
        if attn.get("num_kv_heads", attn["num_heads"]) != attn["num_heads"] or attn.get("qkv_bias", False):
            raise ConfigError("config.json's attention has grouped key/value heads or a qkv bias, which hybridctl's attention has not")
        cfg.n_heads = attn["num_heads"]
        cfg.attention.window = attn.get("window_size") or 0
        cfg.attention.rope_theta = float(attn.get("rope_theta", 10000.0))
    elif cfg.d_model % cfg.n_heads or (cfg.d_model // cfg.n_heads) % 2:
        cfg.n_heads = 1  # no attention layer uses it; any valid value builds the same model
    if cfg.pattern:
        cfg.pattern = letters
    if sorted(cfg.attention_layers) != attention:
        cfg.attention_layers = [] if cfg.pattern else attention
    cfg.vocab_size = config["vocab_size"]
    intermediate = config.get("intermediate_size")
    if intermediate is None:  # fla's own default width
        intermediate = 256 * -(-int(cfg.d_model * (config.get("hidden_ratio") or 4) * 2 / 3) // 256)
    cfg.d_ff = intermediate
    if dataclasses.replace(cfg, d_ff=0).ffn_dim == intermediate and saved.get("d_ff", 0) == 0:
        cfg.d_ff = 0  # hybridctl's automatic width, as the run spelled it
    cfg.norm_eps = config.get("norm_eps", 1e-6)
    cfg.init_std = config.get("initializer_range", cfg.init_std)
    cfg.tie_embeddings = bool(config.get("tie_word_embeddings", False))
    g = cfg.gdn
    g.num_heads, g.head_dim = config["num_heads"], config["head_dim"]
    g.expand_v, g.conv_size = float(config["expand_v"]), config["conv_size"]
    validate(Config(model=cfg))
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Tensors


def layer_plan(layer: int, kind: str, cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """hybridctl tensor name -> [(fla tensor name, rows)], the rows of the hybridctl tensor that each fla tensor
    takes, in order along dim 0."""
    src, dst = f"blocks.{layer}", f"model.layers.{layer}"
    d, ff = cfg.d_model, cfg.ffn_dim
    plan = {
        f"{src}.mixer_norm.weight": [(f"{dst}.attn_norm.weight", d)],
        f"{src}.mlp_norm.weight": [(f"{dst}.mlp_norm.weight", d)],
        f"{src}.mlp.gate_up.weight": [(f"{dst}.mlp.gate_proj.weight", ff), (f"{dst}.mlp.up_proj.weight", ff)],
        f"{src}.mlp.down.weight": [(f"{dst}.mlp.down_proj.weight", d)],
        f"{src}.mixer.o_proj.weight": [(f"{dst}.attn.o_proj.weight", d)],
    }
    if kind == "F":
        plan[f"{src}.mixer.qkv_proj.weight"] = [(f"{dst}.attn.{p}_proj.weight", d) for p in "qkv"]
        return plan
    g = cfg.gdn
    h, key, value = g.num_heads, g.num_heads * g.head_dim, g.num_heads * int(g.head_dim * g.expand_v)
    plan.update({
        f"{src}.mixer.in_proj.weight": [(f"{dst}.attn.q_proj.weight", key), (f"{dst}.attn.k_proj.weight", key),
                                        (f"{dst}.attn.v_proj.weight", value), (f"{dst}.attn.g_proj.weight", value)],
        f"{src}.mixer.ab_proj.weight": [(f"{dst}.attn.a_proj.weight", h), (f"{dst}.attn.b_proj.weight", h)],
        f"{src}.mixer.conv_weight": [(f"{dst}.attn.q_conv1d.weight", key), (f"{dst}.attn.k_conv1d.weight", key),
                                     (f"{dst}.attn.v_conv1d.weight", value)],
        f"{src}.mixer.A_log": [(f"{dst}.attn.A_log", h)],
        f"{src}.mixer.dt_bias": [(f"{dst}.attn.dt_bias", h)],
        f"{src}.mixer.o_norm.weight": [(f"{dst}.attn.o_norm.weight", int(g.head_dim * g.expand_v))],
    })
    return plan


def tensor_plan(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    v = cfg.vocab_size
    plan = {"embed.weight": [("model.embeddings.weight", v)], "norm.weight": [("model.norm.weight", cfg.d_model)]}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [("lm_head.weight", v)]
    for i, kind in enumerate(cfg.layer_types()):
        plan.update(layer_plan(i, kind, cfg))
    return plan


def is_conv(name: str) -> bool:
    return name.endswith("conv1d.weight")  # fla's Conv1d weight is [C, 1, W]; hybridctl's [C, W]


def to_hf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """hybridctl tensors (a tied head stored once, as checkpoints hold them) -> fla's, each a fresh contiguous
    tensor. Every hybridctl tensor is used exactly once; an unknown one is refused."""
    check_exportable(cfg)
    plan = tensor_plan(cfg)
    tied_head = cfg.tie_embeddings and "lm_head.weight" in state
    unknown = [n for n in state if n not in plan and not (tied_head and n == "lm_head.weight")]
    if unknown:
        raise ConfigError(f"the model has tensor '{unknown[0]}', which this exporter does not map to fla's model")
    missing = [n for n in plan if n not in state]
    if missing:
        raise ConfigError(f"the checkpoint lacks tensor '{missing[0]}' that the model's config implies")
    out = {}
    for name, pieces in plan.items():
        tensor = state[name]
        rows = [r for _, r in pieces]
        if name in ("embed.weight", "lm_head.weight"):
            tensor = tensor[: cfg.vocab_size]  # the padding rows: see the module docstring
        if tensor.shape[0] != sum(rows):
            raise ConfigError(f"tensor '{name}' has {tensor.shape[0]} rows, but the config implies {sum(rows)}")
        for (target, _), part in zip(pieces, tensor.split(rows)):
            part = part.detach().clone().contiguous()
            out[target] = part.unsqueeze(1) if is_conv(target) else part
    return out


def from_hf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fla's tensors -> hybridctl's (embedding and head with vocab_size rows, before any padding)."""
    plan = tensor_plan(cfg)
    wanted = {target for pieces in plan.values() for target, _ in pieces}
    if cfg.tie_embeddings:
        wanted.add("lm_head.weight")  # a tied head saved by transformers itself: the embedding again
    extra = [n for n in tensors if n not in wanted]
    if extra:
        raise ConfigError(f"model.safetensors has tensor '{extra[0]}', which config.json's model does not have")
    out = {}
    for name, pieces in plan.items():
        missing = [t for t, _ in pieces if t not in tensors]
        if missing:
            raise ConfigError(f"model.safetensors lacks tensor '{missing[0]}' that config.json's model needs")
        parts = [tensors[t].squeeze(1) if is_conv(t) else tensors[t] for t, _ in pieces]
        out[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out
