"""Run configuration: plain dataclasses and their validation.

A config is built in three layers: the preset file (and every preset it extends, base first; presets.py), then each
`--set section.key=value` override, then validation against the dataclasses below. Every user mistake raises
ConfigError with one line that names the problem and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised only on Python 3.10
    pass

from hybridctl.core.errors import ConfigError, suggest
from hybridctl.core.presets import PLACEMENT_KEYS, apply_overrides, load_preset_dict, placement_overrides, read_toml, to_toml


DEFAULT_VOCAB = 49152  # the study's tokenizer (SmolLM), used when a preset's tokenizer is not known offline
LAYER_KINDS = {"L": "Gated DeltaNet", "F": "full attention", "D": "DeepSeek sparse attention"}


@dataclass
class GDNConfig:
    num_heads: int = 6
    head_dim: int = 128
    expand_v: float = 2.0
    conv_size: int = 4
    chunk_size: int = 64
    # "auto": fla Triton kernels on CUDA, the PyTorch chunked reference elsewhere; "torch" forces the reference.
    backend: str = "auto"


@dataclass
class AttentionConfig:
    window: int = 0  # 0 = full causal attention; N > 0 = each token sees itself and the N-1 tokens before it
    rope_theta: float = 10000.0


@dataclass
class DSAConfig:
    topk: int = 64  # keys each query attends to
    indexer_heads: int = 4
    indexer_dim: int = 32
    aux_loss_weight: float = 0.01  # weight of the KL loss that teaches the indexer to follow attention


@dataclass
class MoEConfig:
    n_experts: int = 0  # 0 = dense SwiGLU everywhere
    top_k: int = 2
    moe_every: int = 2  # every N-th layer (1-based: layers N-1, 2N-1, ...) gets the MoE MLP
    capacity_factor: float = 1.25
    balance_loss_weight: float = 0.01


@dataclass
class ModelConfig:
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    attention_layers: list[int] = field(default_factory=list)
    pattern: str = ""  # alternative to attention_layers: one letter per layer, L / F / D
    vocab_size: int = 0  # 0 = follow the tokenizer
    d_ff: int = 0  # 0 = SwiGLU width 8/3 * d_model rounded up to a multiple of 256
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = True
    gdn: GDNConfig = field(default_factory=GDNConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def layer_types(self) -> list[str]:
        """One letter per layer: L (Gated DeltaNet), F (full attention), D (sparse attention)."""
        if self.pattern:
            return list(self.pattern)
        attn = set(self.attention_layers)
        return ["F" if i in attn else "L" for i in range(self.n_layers)]

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return 256 * math.ceil(8 * self.d_model / 3 / 256)

    def attention_fraction(self) -> float:
        kinds = self.layer_types()
        return sum(k != "L" for k in kinds) / max(len(kinds), 1)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 48
    seq_len: int = 1024
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 3  # newest N step checkpoints kept (0 = keep all); best/ is kept apart
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    compile: bool = True  # torch.compile the model on CUDA (ignored on CPU): measured 1.45x on the hybrid
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    # Cross-entropy over the vocabulary: "fused" (CUDA) makes the loss and its gradients chunk by chunk with one
    # Triton kernel per chunk; "chunked" does the same in PyTorch; "plain" makes the full logits and leaves the
    # loss to torch.compile; "auto" = fused on CUDA, chunked elsewhere.
    loss: str = "auto"
    # Experiment trackers that mirror metrics.jsonl and summary.json (core/training/tracking.py): "tensorboard"
    # (RUN/tensorboard/), "wandb". wandb_mode: online, offline or disabled; empty = wandb's own (WANDB_MODE).
    log_to: list[str] = field(default_factory=list)
    wandb_mode: str = ""


TRACKERS = ("tensorboard", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class DataConfig:
    dataset: str = "builtin:stdlib"
    config: str = ""  # hub dataset configuration name
    split: str = "train"
    val_split: str = ""  # hub split (or, for local data, a path or glob) for validation; empty = carve val_fraction out of the training text
    text_field: str = "text"
    streaming: bool = False
    val_fraction: float = 0.05
    max_tokens: int = 0  # 0 = no limit
    tokenizer: str = "bytes"
    cache_dir: str = ""  # empty = $HYBRIDCTL_CACHE or ~/.cache/hybridctl


@dataclass
class Config:
    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of what determines the model's shape and data; resume checks it."""
        key = {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data)}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if origin is list:
        (item,) = get_args(typ)
        if not isinstance(value, list):
            example = "[3, 6]" if item is not str else '["tensorboard"]' if where == "train.log_to" else '["a", "b"]'
            raise ConfigError(f"{where} must be a list like {example}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {typ}")  # a bug in this file, not user input


def config_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key of a config, tables too: name, ..., model, model.d_model, ..., model.gdn, model.gdn.head_dim."""
    keys = []
    for f in dataclasses.fields(cls or Config):
        dotted = f"{prefix}{f.name}"
        keys.append(dotted)
        typ = get_type_hints(cls or Config)[f.name]
        if dataclasses.is_dataclass(typ):
            keys += config_keys(typ, f"{dotted}.")
    return keys


def suggest_key(dotted: str) -> str:
    """A ' (did you mean ...?)' hint naming a whole dotted key, or '': the one key a bare or misplaced name is the
    last part of (steps -> train.steps, model.lr -> train.lr), else the closest dotted key (train.stpes ->
    train.steps), else the one key whose last part is closest to the name's (d_modl -> model.d_model)."""
    keys = config_keys()
    if dotted in keys:
        return ""
    leaf = dotted.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for key in keys:
        by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    if len(by_leaf.get(leaf, [])) == 1:
        return f" (did you mean '{by_leaf[leaf][0]}'?)"
    hint = suggest(dotted, keys) if "." in dotted else ""
    if hint:
        return hint
    close = [name for name in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75) if len(by_leaf[name]) == 1]
    return f" (did you mean '{by_leaf[close[0]][0]}'?)" if close else ""


def build_dataclass(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown key '{dotted}'{suggest_key(dotted)}; valid keys here: {', '.join(sorted(names))}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = build_dataclass(typ, value, dotted)
        else:
            kwargs[key] = _coerce(value, typ, dotted)
    return cls(**kwargs)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    m, t, d = cfg.model, cfg.train, cfg.data
    _require(m.n_layers >= 1, f"model.n_layers must be >= 1, got {m.n_layers}")
    _require(m.d_model >= 1 and m.n_heads >= 1, "model.d_model and model.n_heads must be positive")
    _require(m.d_model % m.n_heads == 0, f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.d_model / model.n_heads must be even (RoPE rotates pairs)")
    if m.pattern:
        bad = sorted(set(m.pattern) - set(LAYER_KINDS))
        _require(not bad, f"model.pattern has unknown letter '{bad[0] if bad else ''}'; use L (Gated DeltaNet), F (attention), D (sparse attention)")
        _require(
            len(m.pattern) == m.n_layers,
            f"model.pattern '{m.pattern}' has {len(m.pattern)} letters but model.n_layers is {m.n_layers}; give one letter per layer",
        )
        from_pattern = [i for i, c in enumerate(m.pattern) if c == "F"]
        _require(
            not m.attention_layers or sorted(m.attention_layers) == from_pattern,
            f"model.attention_layers {m.attention_layers} disagrees with model.pattern '{m.pattern}'; set only one of them",
        )
    for i in m.attention_layers:
        _require(
            0 <= i < m.n_layers,
            f"model.attention_layers has index {i}, out of range for {m.n_layers} layers; use 0..{m.n_layers - 1}",
        )
    _require(len(set(m.attention_layers)) == len(m.attention_layers), f"model.attention_layers {m.attention_layers} repeats a layer")
    g = m.gdn
    _require(g.num_heads >= 1 and g.head_dim >= 1, "model.gdn.num_heads and model.gdn.head_dim must be positive")
    _require(float(g.head_dim * g.expand_v).is_integer(), f"model.gdn.head_dim * expand_v must be a whole number, got {g.head_dim * g.expand_v}")
    _require(g.backend in ("auto", "fused", "fla", "torch"), f"model.gdn.backend must be auto, fused, fla or torch, got '{g.backend}'")
    _require(g.chunk_size >= 1 and g.conv_size >= 1, "model.gdn.chunk_size and model.gdn.conv_size must be positive")
    _require(m.attention.window >= 0, f"model.attention.window must be >= 0 (0 = full causal), got {m.attention.window}")
    _require(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 = follow the tokenizer), got {m.vocab_size}")
    _require(m.dsa.topk >= 1, f"model.dsa.topk must be >= 1, got {m.dsa.topk}")
    dsa = m.dsa
    _require(dsa.indexer_heads >= 1, f"model.dsa.indexer_heads must be >= 1, got {dsa.indexer_heads}")
    _require(dsa.indexer_dim >= 2 and dsa.indexer_dim % 2 == 0, f"model.dsa.indexer_dim must be even and >= 2 (RoPE rotates pairs), got {dsa.indexer_dim}")
    _require(dsa.aux_loss_weight >= 0, f"model.dsa.aux_loss_weight must be >= 0, got {dsa.aux_loss_weight}")
    moe = m.moe
    _require(moe.n_experts >= 0, f"model.moe.n_experts must be >= 0, got {moe.n_experts}")
    if moe.n_experts:
        _require(1 <= moe.top_k <= moe.n_experts, f"model.moe.top_k must be in 1..{moe.n_experts}, got {moe.top_k}")
        _require(moe.moe_every >= 1, f"model.moe.moe_every must be >= 1, got {moe.moe_every}")
        _require(moe.capacity_factor > 0, f"model.moe.capacity_factor must be > 0, got {moe.capacity_factor}")
        _require(moe.balance_loss_weight >= 0, f"model.moe.balance_loss_weight must be >= 0, got {moe.balance_loss_weight}")
    for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "log_every", "save_every"):
        value = getattr(t, key)
        _require(value >= 1, f"train.{key} must be >= 1, got {value}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(t.keep_checkpoints >= 0, f"train.keep_checkpoints must be >= 0, got {t.keep_checkpoints}")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _require(t.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto, fp32 or bf16, got '{t.dtype}'")
    _require(t.loss in ("auto", "fused", "chunked", "plain"),
             f"train.loss must be auto, fused, chunked or plain, got '{t.loss}'")
    _require(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        f"train.device must be auto, cpu, cuda or cuda:N, got '{t.device}'",
    )
    for tracker in t.log_to:
        _require(tracker in TRACKERS, f"train.log_to names unknown tracker '{tracker}'{suggest(tracker, TRACKERS)}; "
                                      f"choose from {', '.join(TRACKERS)}, e.g. log_to = [\"tensorboard\"]")
    _require(len(set(t.log_to)) == len(t.log_to), f"train.log_to {t.log_to} names a tracker twice")
    _require(t.wandb_mode in ("", *WANDB_MODES),
             f"train.wandb_mode must be {', '.join(WANDB_MODES)} or empty (wandb's default), got '{t.wandb_mode}'")
    _require(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _require(d.max_tokens >= 0, f"data.max_tokens must be >= 0 (0 = no limit), got {d.max_tokens}")
    return cfg


def config_from_dict(data: dict) -> Config:
    return validate(build_dataclass(Config, data, ""))


def load_config(preset: str, overrides: list[str] | None = None, notes: list[str] | None = None) -> Config:
    """The preset with the overrides applied, validated. When an override places the attention layers differently
    from the preset, the description says the new layers and `notes` (if given) gets a warning line."""
    preset_data = load_preset_dict(preset)
    data = apply_overrides(preset_data, overrides or [])
    data.setdefault("name", Path(preset).stem)
    cfg = config_from_dict(data)
    placed = placement_overrides(overrides or [])
    preset_model = preset_data.get("model") if isinstance(preset_data.get("model"), dict) else {}
    if placed and any(k in preset_model for k in PLACEMENT_KEYS):
        before = preset_layer_types(preset_model)
        after = "".join(cfg.model.layer_types())
        if before is not None and before != after:
            where = ", ".join(f"--set {text}" for text in placed)
            if "description" not in {text.split("=", 1)[0].strip() for text in overrides or []}:
                cfg.description = f"{Path(preset).stem} with layers {after} (set by {where})"
            if notes is not None:
                notes.append(f"{where} replaces the layers preset {Path(preset).stem} sets ({before}) with {after}")
    return cfg


def preset_layer_types(model: dict) -> str | None:
    """The layer letters a preset's [model] table gives, or None if the table is not valid on its own."""
    try:
        built = build_dataclass(ModelConfig, model, "model")
    except ConfigError:
        return None
    return "".join(built.layer_types())


def load_config_file(path: Path) -> Config:
    """A resolved config.toml from a run folder (no `extends`)."""
    return config_from_dict(read_toml(path))


def config_to_toml(cfg: Config) -> str:
    return to_toml(cfg.to_dict()) + "\n"
