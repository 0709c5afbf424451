"""Preset files as plain TOML: finding them (by name or path, following `extends`), merging, `--set` overrides,
and writing a config back as TOML.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from hybridctl.core.errors import ConfigError, suggest


PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def find_preset(name_or_path: str, relative_to: Path | None = None, extending: tuple[Path, ...] = ()) -> Path:
    """A preset by name (presets/NAME.toml, or NAME.toml beside the extending file) or by path; relative paths
    resolve against the extending file."""
    candidates = []
    is_path = name_or_path.endswith(".toml") or "/" in name_or_path
    if is_path:
        p = Path(name_or_path).expanduser()
        if not p.is_absolute() and relative_to is not None:
            candidates.append(relative_to / p)
        candidates.append(p)
    else:  # a name: beside the extending file first (a folder of one's own presets), then presets/
        beside = relative_to / f"{name_or_path}.toml" if relative_to is not None else None
        if beside is not None and beside.resolve() not in extending:  # my/tiny.toml may extend the built-in tiny
            candidates.append(beside)
        candidates.append(PRESETS_DIR / f"{name_or_path}.toml")
    for c in candidates:
        if c.is_file():
            return c.resolve()
    if is_path:
        raise ConfigError(f"preset file '{name_or_path}' does not exist; check the path or pass a preset name (see `hybridctl train --list-presets`)")
    hint = suggest(name_or_path, available_presets())
    raise ConfigError(
        f"unknown preset '{name_or_path}'{hint}; list them with `hybridctl train --list-presets` or pass a path to a .toml file"
    )


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}; fix the syntax at that line") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


def load_preset_dict(name_or_path: str, _seen: tuple[Path, ...] = (), relative_to: Path | None = None) -> dict:
    """The preset's table merged over everything it extends (base first)."""
    path = find_preset(name_or_path, relative_to, extending=_seen)
    if path in _seen:
        chain = " -> ".join(p.stem for p in (*_seen, path))
        raise ConfigError(f"preset cycle: {chain}; remove one of the `extends` lines")
    data = read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` must be a preset name or path string, got {parent!r}")
    base = load_preset_dict(parent, (*_seen, path), relative_to=path.parent)
    return deep_merge(base, data)


PLACEMENT_KEYS = ("attention_layers", "pattern")  # two spellings of one setting: the later one wins


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    if isinstance(out.get("model"), dict) and isinstance(over.get("model"), dict):
        given = [k for k in PLACEMENT_KEYS if k in over["model"]]
        if len(given) == 1:
            out["model"] = {k: v for k, v in out["model"].items() if k not in PLACEMENT_KEYS}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as TOML, else as a bare string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' has no '='; write it as section.key=value, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key; write it as section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain TOML values
    for text in overrides:
        path, value = parse_override(text)
        if path[0] == "model" and len(path) == 2 and path[1] in PLACEMENT_KEYS and isinstance(data.get("model"), dict):
            for other in PLACEMENT_KEYS:
                data["model"].pop(other, None)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            node[path[-1]] = deep_merge(node[path[-1]], value)  # `--set 'model.gdn={head_dim=16}'` sets one key
        else:
            node[path[-1]] = value
    return data


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_model": 32}} -> {"model.d_model": 32}."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def config_diff(old, new, prefix: str = "") -> list[str]:
    """One 'key: old vs new' string per setting that differs; each side a Config, a config dataclass or a dict."""
    a, b = (flatten(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c, prefix) for c in (old, new))
    missing = object()
    return [f"{k}: {_toml_value(a[k]) if k in a else '(unset)'} vs {_toml_value(b[k]) if k in b else '(unset)'}"
            for k in sorted(a.keys() | b.keys()) if a.get(k, missing) != b.get(k, missing)]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict, prefix: str = "") -> str:
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    lines = []
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    lines += scalars
    for k, v in data.items():
        if isinstance(v, dict):
            sub = to_toml(v, f"{prefix}.{k}" if prefix else k)
            lines += ["", sub] if lines else [sub]
    return "\n".join(lines)
