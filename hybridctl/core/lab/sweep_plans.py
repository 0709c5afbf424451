"""Sweep plans: what an LR or architecture sweep will train (one planned run per value and seed), before anything
runs. sweeps.py writes plans down and runs them.

A plan made with seeds runs every configuration once per seed, in folders named `<configuration>_s<seed>`; one
made without keeps the configuration's own name (and the preset's train.seed), as sweeps did before seeds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridctl.core.config import Config, load_config
from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.render import fmt_lr
from hybridctl.core.presets import layout_label, layout_overrides, parse_override


DEFAULT_LRS = [3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3]
DEFAULT_STEPS = {"lr": 200, "arch": 300}
STUDY_A = [
    "deltanet", "hybrid_8", "hybrid_sparse", "hybrid_25", "hybrid_late", "hybrid_42", "hybrid_alternating",
    "hybrid_58", "hybrid_67", "hybrid_75", "hybrid_83", "hybrid_92", "transformer",
]


STUDY_C = [
    "sandwich", "linear_first", "alternating_fl", "full_first",
    "dsa_sandwich", "dsa_linear_first", "dsa_alternating", "dsa_full_first",
]


ARCH_GROUPS = {"all": STUDY_A, "study_a": STUDY_A, "study_c": STUDY_C}
SEED_SUFFIX = re.compile(r"_s(\d+)$")  # what seeded sweeps append to a configuration's name


def seeded_name(name: str, seed: int | None) -> str:
    return name if seed is None else f"{name}_s{seed}"


def _duplicates(items: list[str], what: str) -> list[str]:
    repeated = sorted({i for i in items if items.count(i) > 1}, key=items.index)
    return [f"{what} lists {', '.join(repeated)} more than once; each runs once"] if repeated else []


def parse_lr_values(text: str, warnings: list[str] | None = None) -> list[float]:
    """Comma-separated learning rates, in order; a repeated rate runs once (and adds a line to `warnings`)."""
    values, seen = [], []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--values: '{item}' is not a number; give learning rates like 3e-4,1e-3,2e-3") from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--values: learning rates must be positive, got {item}")
        seen.append(fmt_lr(value))
        if value not in values:
            values.append(value)
    if not values:
        raise ConfigError("--values is empty; give learning rates like 3e-4,1e-3,2e-3")
    if warnings is not None:
        warnings += _duplicates(seen, "--values")
    return values


def parse_presets(text: str, warnings: list[str] | None = None) -> list[str]:
    """Comma-separated preset names and group names (all, study_a, study_c), expanded in order, without repeats."""
    names: list[str] = []
    listed: list[str] = []
    for item in text.split(","):
        item = item.strip()
        expanded = ARCH_GROUPS.get(item, [item] if item else [])
        listed += expanded
        names += [n for n in expanded if n not in names]
    if not names:
        raise ConfigError(f"--preset is empty; give preset names or a group ({', '.join(ARCH_GROUPS)})")
    if warnings is not None:
        warnings += _duplicates(listed, "--preset")
    return names


def parse_seeds(text: str | None) -> list[int] | None:
    """--seeds N (seeds 0..N-1) or an explicit list 0,3,7; None when not given."""
    if text is None:
        return None
    text = text.strip()
    example = "give a count like --seeds 3 (seeds 0, 1, 2) or a list like --seeds 0,3,7"
    if "," not in text:
        try:
            count = int(text)
        except ValueError:
            raise ConfigError(f"--seeds: '{text}' is not a number; {example}") from None
        if count == 0:  # most likely meant as "seed 0", which is a count of one
            raise ConfigError("--seeds 0 asks for no seed: --seeds N is a count (seeds 0 to N-1); for seed 0 alone "
                              "give --seeds 1, for a list --seeds 0,3,7")
        if count < 1:
            raise ConfigError(f"--seeds needs at least one seed, got {count}; {example}")
        return list(range(count))
    seeds = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if not re.fullmatch(r"\d+", item):
            raise ConfigError(f"--seeds: '{item}' is not a seed (a whole number >= 0); {example}")
        if int(item) in seeds:
            raise ConfigError(f"--seeds lists seed {int(item)} twice; list each seed once")
        seeds.append(int(item))
    if not seeds:
        raise ConfigError(f"--seeds is empty; {example}")
    return seeds


@dataclass
class PlannedRun:
    name: str
    preset: str
    overrides: list[str]
    value: Any  # the swept value: an LR, or the configuration's name
    cfg: Config = field(repr=False, compare=False)
    seed: int | None = None  # None: the sweep has no --seeds, the preset's train.seed applies

    @property
    def tokens(self) -> int:
        t = self.cfg.train
        return t.steps * t.batch_size * t.seq_len

    def to_dict(self) -> dict[str, Any]:
        entry = {"name": self.name, "preset": self.preset, "overrides": self.overrides, "value": self.value}
        if self.seed is not None:  # plans without seeds stay as they were written before seeds, so they resume
            entry["seed"] = self.seed
        return entry


@dataclass
class SweepPlan:
    kind: str  # "lr" or "arch"
    name: str
    steps: int
    runs: list[PlannedRun]
    seeds: list[int] | None = None
    warnings: list[str] = field(default_factory=list)  # said before it runs, kept in sweep.json
    placements: dict[str, Any] | None = None  # a placement sweep (lab/placements.py): attention count, layers, sample

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        plan = {"kind": self.kind, "name": self.name, "steps": self.steps, "seeds": self.seeds,
                "runs": [r.to_dict() for r in self.runs]}
        if self.placements is not None:
            plan["placements"] = self.placements
        return plan


def _override_value(overrides: list[str], key: str):
    found = None
    for text in overrides:
        path, value = parse_override(text)
        if ".".join(path) == key:
            found = value
    return found


def resolve_steps(kind: str, steps: int | None, overrides: list[str]) -> int:
    """--steps wins, then a `--set train.steps=N`, then the sweep kind's default (200 for LR, 300 for arch)."""
    if steps is None:
        steps = _override_value(overrides, "train.steps") or DEFAULT_STEPS[kind]
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps!r}")
    return steps


def _check_seeds(seeds: list[int] | None, overrides: list[str]) -> None:
    if seeds is not None and _override_value(overrides, "train.seed") is not None:
        raise ConfigError("--seeds sets train.seed of every run; drop --set train.seed (or drop --seeds and keep it)")


def _seeded(name: str, preset: str, overrides: list[str], value: Any, seeds: list[int] | None) -> list[PlannedRun]:
    """One planned run per seed (one run, the preset's seed, without seeds); the config is checked here."""
    runs = []
    for seed in seeds if seeds is not None else [None]:
        run_overrides = overrides + ([f"train.seed={seed}"] if seed is not None else [])
        cfg = load_config(preset, run_overrides)  # an unknown preset or a bad layout raises here, before anything runs
        cfg.name = seeded_name(name, seed)
        runs.append(PlannedRun(cfg.name, preset, run_overrides, value, cfg, seed))
    return runs


def presets_steps(configurations: list[tuple[str, str, list[str]]], overrides: list[str]) -> int:
    """The train.steps the presets of an arch sweep share (study A's 300, study C's 1000): every run of a sweep
    trains as long, so presets that differ need --steps."""
    by_preset = {preset: load_config(preset, overrides + extra).train.steps for _, preset, extra in configurations}
    if len(set(by_preset.values())) > 1:
        listed = ", ".join(f"{Path(p).stem} {n}" for p, n in by_preset.items())
        raise ConfigError(f"the presets train for different numbers of steps ({listed}); give --steps N for all of them")
    return next(iter(by_preset.values()))


def plan_lr_sweep(preset: str, values: list[float], steps: int | None = None, overrides: list[str] | None = None,
                  name: str | None = None, seeds: list[int] | None = None) -> SweepPlan:
    overrides = list(overrides or [])
    if _override_value(overrides, "train.lr") is not None:
        raise ConfigError("an LR sweep sets train.lr itself; drop --set train.lr and list the rates with --values")
    _check_seeds(seeds, overrides)
    steps = resolve_steps("lr", steps, overrides)
    stem = Path(preset).stem
    runs = []
    for lr in values:
        run_overrides = overrides + [f"train.steps={steps}", f"train.lr={lr!r}"]
        runs += _seeded(f"{stem}_lr{fmt_lr(lr)}", preset, run_overrides, lr, seeds)
    return SweepPlan("lr", name or f"lr_{stem}", steps, runs, seeds)


def plan_arch_sweep(presets: list[str], steps: int | None = None, overrides: list[str] | None = None,
                    name: str | None = None, label: str = "", layouts: list[str] | None = None,
                    seeds: list[int] | None = None) -> SweepPlan:
    """One configuration per preset (each with its own LR), or per layer layout on one base preset; same data and
    seed unless the presets differ there."""
    overrides = list(overrides or [])
    _check_seeds(seeds, overrides)
    if layouts and len(presets) != 1:
        raise ConfigError(f"--patterns applies layer layouts to one base preset, got {len(presets)} "
                          f"({', '.join(presets[:4])}{', ...' if len(presets) > 4 else ''}); pass a single --preset")
    configurations = ([(f"{Path(presets[0]).stem}_{layout_label(lay)}", presets[0], layout_overrides(lay)) for lay in layouts]
                      if layouts else [(Path(p).stem, p, []) for p in presets])
    names = [c[0] for c in configurations]
    if len(set(names)) != len(names):
        raise ConfigError(f"--preset names two presets with the same file name ({', '.join(names)}); rename one")
    if steps is None and _override_value(overrides, "train.steps") is None:
        steps = presets_steps(configurations, overrides)
    steps = resolve_steps("arch", steps, overrides)
    runs = []
    for config_name, preset, extra in configurations:
        runs += _seeded(config_name, preset, overrides + extra + [f"train.steps={steps}"], config_name, seeds)
    if not name:
        name = f"arch_{label or '-'.join(names)}"
        if layouts:
            name = f"arch_{Path(presets[0]).stem}_{'-'.join(layout_label(lay) for lay in layouts)}"
    return SweepPlan("arch", name, steps, runs, seeds)
