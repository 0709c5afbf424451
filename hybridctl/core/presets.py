"""Preset files as plain TOML: finding them (by name or path, following `extends`), merging, `--set` overrides,
layer layouts (`--patterns`), and writing a config back as TOML.

The built-in presets are package data (hybridctl/presets/*.toml), read through importlib.resources, so an
installed wheel has them as a source checkout does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

from hybridctl.core.errors import ConfigError, suggest


def presets_dir() -> Path:
    """The folder of the built-in presets, inside the installed package (a plain folder: wheels install unzipped)."""
    return Path(str(resources.files("hybridctl") / "presets"))


def available_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def find_preset(name_or_path: str, relative_to: Path | None = None, extending: tuple[Path, ...] = ()) -> Path:
    """A preset by name (the built-in NAME.toml, or NAME.toml beside the extending file) or by path; relative paths
    resolve against the extending file."""
    candidates = []
    is_path = name_or_path.endswith(".toml") or "/" in name_or_path
    if is_path:
        p = Path(name_or_path).expanduser()
        if not p.is_absolute() and relative_to is not None:
            candidates.append(relative_to / p)
        candidates.append(p)
    else:  # a name: beside the extending file first (a folder of one's own presets), then the built-ins
        beside = relative_to / f"{name_or_path}.toml" if relative_to is not None else None
        if beside is not None and beside.resolve() not in extending:  # my/tiny.toml may extend the built-in tiny
            candidates.append(beside)
        candidates.append(presets_dir() / f"{name_or_path}.toml")
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


def placement_overrides(overrides: list[str]) -> list[str]:
    """The override that places the attention layers (model.pattern or model.attention_layers), as given: the
    last one, since each replaces the placement before it (apply_overrides); [] when there is none."""
    placing = [text for text in overrides
               if "=" in text and text.split("=", 1)[0].strip() in (f"model.{k}" for k in PLACEMENT_KEYS)]
    return placing[-1:]


# ---------------------------------------------------------------------------------------------------------
# Layer layouts: what `--patterns` names in every command (bench speed, ablate arch), applied to a base preset:
# a pattern ("LLFL": one letter per layer) or attention layer indices ([3, 6])

LAYOUT_LETTERS = "LFD"
LAYOUT_HELP = ("one letter per layer (L Gated DeltaNet, F attention, D sparse attention) like LLFL, or attention "
               "layer indices like [3,6] (the preset's n_layers)")


def split_top_level(text: str) -> list[str]:
    """Split at commas and semicolons outside square brackets: 'LLFL,[3,6];FFLL' -> ['LLFL', '[3,6]', 'FFLL']."""
    items, depth, current = [], 0, ""
    for ch in text:
        if ch in ",;" and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ConfigError(f"--patterns '{text}' has unbalanced brackets; write index lists like [3,6]")
        current += ch
    if depth:
        raise ConfigError(f"--patterns '{text}' has an unclosed '['; write index lists like [3,6]")
    return [item.strip() for item in [*items, current] if item.strip()]


def parse_layout(item: str) -> str:
    """One layer layout in its canonical spelling: letters as given (LLFL), or attention layer indices sorted and
    without spaces ('[6, 3]' -> '[3,6]'), which is how sweep.json records it."""
    if item.startswith("["):
        try:
            value = tomllib.loads(f"v = {item}")["v"]
        except tomllib.TOMLDecodeError:
            value = None
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            raise ConfigError(f"--patterns item '{item}' is not a list of layer indices; write it like [3,6] (0-based)")
        if len(set(value)) != len(value):
            raise ConfigError(f"--patterns item '{item}' repeats a layer index")
        return "[" + ",".join(map(str, sorted(value))) + "]"
    if not re.fullmatch(f"[{LAYOUT_LETTERS}]+", item):
        if item in available_presets() or item.endswith(".toml"):
            raise ConfigError(f"--patterns takes layer layouts, and '{item}' is a preset; name presets with --preset {item}")
        if item.isalpha() and item.isupper():  # a pattern with a typo, e.g. LXL
            bad = sorted(set(item) - set(LAYOUT_LETTERS))[0]
            raise ConfigError(f"--patterns item '{item}' has unknown letter '{bad}'; give {LAYOUT_HELP}")
        raise ConfigError(f"--patterns item '{item}' is not a layer layout; give {LAYOUT_HELP} (presets go to --preset)")
    return item


def check_not_a_layout(name: str) -> None:
    """A layer layout given where a preset is named (--preset LLFL, --preset [3]) is pointed to --patterns, for the
    commands that take it (bench speed, ablate arch)."""
    if name not in available_presets() and (name.startswith("[") or set(name) <= set(LAYOUT_LETTERS)):
        raise ConfigError(f"--preset {name}: that is a layer layout, not a preset; pass it as --patterns {name} "
                          "(applied to one --preset)")


def parse_layouts(text: str, warnings: list[str] | None = None) -> list[str]:
    """`LLFL,FFLL` -> ['LLFL', 'FFLL']; `[3,6];[5]` (or `[3,6],[5]`) -> ['[3,6]', '[5]']. A layout given twice is
    kept once (with a line in `warnings`)."""
    listed = [parse_layout(item) for item in split_top_level(text)]
    layouts = list(dict.fromkeys(listed))
    if not layouts:
        raise ConfigError(f"--patterns is empty; give {LAYOUT_HELP}, comma-separated")
    repeated = [layout for layout in layouts if listed.count(layout) > 1]
    if warnings is not None and repeated:
        warnings.append(f"--patterns lists {', '.join(repeated)} more than once; each runs once")
    return layouts


def layout_overrides(layout: str) -> list[str]:
    """The --set overrides that give a preset this layout (a pattern sets n_layers too)."""
    if layout.startswith("["):
        return [f"model.attention_layers={layout}"]
    return [f'model.pattern="{layout}"', f"model.n_layers={len(layout)}"]


def layout_label(layout: str) -> str:
    """A layout as part of a folder name: LLFL stays, [3,6] becomes attn3-6, [] becomes attn-none."""
    if not layout.startswith("["):
        return layout
    inside = layout[1:-1]
    return f"attn{inside.replace(',', '-')}" if inside else "attn-none"


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"d_model": 32}} -> {"model.d_model": 32}."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def config_diff(old, new, prefix: str = "") -> list[str]:
    """One 'key: old vs new' string per setting that differs; each side a Config, a config dataclass or a dict.
    The description is prose about the settings, not one of them: it is left out."""
    a, b = (flatten(dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c, prefix) for c in (old, new))
    a.pop("description", None)
    b.pop("description", None)
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
