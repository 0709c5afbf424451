"""Placement sweeps: where k attention (F) layers sit among a base preset's layers, every placement or a seeded
sample of them, and which placements and layer positions give the lowest loss.

A placement is a sorted tuple of attention layer indices (0-based); the other layers are Gated DeltaNet (L). The
sweep is an ordinary arch sweep of layouts ([3,6], ...) on the base preset (sweep_plans.plan_arch_sweep); its plan
records `"placements": {"attention": k, "n_layers": n, ...}` so that `report` knows to analyse it.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

from hybridctl.core.errors import ConfigError, HybridctlError

MAX_ALL = 500  # --placements all beyond this many runs is surely a mistake; a sample says what it costs


def parse_placements(text: str | None) -> int | None:
    """--placements: 'all' (None) or a sample size N >= 1."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        count = int(text.strip())
    except ValueError:
        raise ConfigError(f"--placements: '{text}' is not a number; give a sample size like --placements 12, "
                          "or --placements all") from None
    if count < 1:
        raise ConfigError(f"--placements must be at least 1, got {count}; give a sample size like --placements 12, "
                          "or --placements all")
    return count


def placement_of(layer_types: str | list[str] | None, attention: int | None = None) -> tuple[int, ...] | None:
    """The attention layers of a layout made of L and F only (None for layouts with other layers, or with a
    different number of attention layers than `attention`)."""
    if not layer_types or set(layer_types) - {"L", "F"}:
        return None
    found = tuple(i for i, kind in enumerate(layer_types) if kind == "F")
    return found if attention is None or len(found) == attention else None


def named_placements(n_layers: int, attention: int) -> dict[tuple[int, ...], str]:
    """Built-in presets with n_layers layers of L and F, `attention` of them F: placement -> preset name."""
    from hybridctl.core.config import load_config
    from hybridctl.core.presets import available_presets

    named: dict[tuple[int, ...], str] = {}
    for preset in available_presets():
        try:
            types = load_config(preset).model.layer_types()
        except HybridctlError:  # a preset that needs more (a base file, a missing key) names no placement
            continue
        found = placement_of(types, attention) if len(types) == n_layers else None
        if found is not None:
            named.setdefault(found, preset)
    return named


def choose_placements(n_layers: int, attention: int, count: int | None, seed: int = 0,
                      base: tuple[int, ...] | None = None) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], str]]:
    """Every placement (count None), or a seeded random sample of `count` plus the named presets' placements and the
    base preset's own; returns them sorted, and which of them a preset names."""
    if attention < 1:
        raise ConfigError(f"--attention must be at least 1, got {attention}; give the number of attention layers to "
                          "place, e.g. --attention 2")
    if attention > n_layers:
        raise ConfigError(f"--attention {attention} is more than the {n_layers} layers of the base preset; give "
                          f"1..{n_layers}")
    total = math.comb(n_layers, attention)
    if count is None:
        if total > MAX_ALL:
            raise ConfigError(f"--placements all would train {total:,} placements of {attention} attention layers "
                              f"among {n_layers}; give a sample size like --placements 12")
        return list(itertools.combinations(range(n_layers), attention)), named_placements(n_layers, attention)
    if count > total:
        raise ConfigError(f"--placements {count} is more than the {total} placements of {attention} attention layers "
                          f"among {n_layers}; pass --placements all to train every one")
    rng = random.Random(seed)
    # sample indices into the combinations without listing them all (C(24, 6) is 134,596)
    chosen = {_nth_combination(n_layers, attention, i) for i in rng.sample(range(total), count)}
    named = named_placements(n_layers, attention)
    extra = set(named) | ({base} if base is not None else set())
    return sorted(chosen | extra), named


def _nth_combination(n: int, k: int, index: int) -> tuple[int, ...]:
    """The index-th k-subset of range(n) in lexicographic order (itertools.combinations' order)."""
    result, start = [], 0
    while k:
        for first in range(start, n):
            block = math.comb(n - first - 1, k - 1)
            if index < block:
                result.append(first)
                start, k = first + 1, k - 1
                break
            index -= block
    return tuple(result)


def layout_text(placement: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, placement)) + "]"


def plan_placement_sweep(base: str, attention: int, count: int | None, seed: int = 0, steps: int | None = None,
                         overrides: list[str] | None = None, name: str | None = None, seeds: list[int] | None = None):
    """An arch sweep of placements of `attention` F layers on one base preset (its n_layers after --set)."""
    from hybridctl.core.config import load_config
    from hybridctl.core.lab.sweep_plans import plan_arch_sweep

    overrides = list(overrides or [])
    base_types = load_config(base, overrides).model.layer_types()
    others = sorted(set(base_types) - {"L", "F"})
    if others:  # a placement keeps only L and F: the base's other layers would silently become Gated DeltaNet
        raise ConfigError(f"placement sweeps place F layers among Gated DeltaNet (L) layers, and {Path(base).stem} "
                          f"also has {'/'.join(others)} layers ({''.join(base_types)}); sweep its layouts with "
                          "--patterns instead")
    n_layers = len(base_types)
    own = placement_of(base_types, attention)
    placements, named = choose_placements(n_layers, attention, count, seed, own)
    stem = Path(base).stem
    how = "all" if count is None else f"{count}s{seed}"
    plan = plan_arch_sweep([base], steps, overrides, name or f"placements_{stem}_{attention}of{n_layers}_{how}",
                           layouts=[layout_text(p) for p in placements], seeds=seeds)
    plan.placements = {"attention": attention, "n_layers": n_layers, "base": stem,
                       "sample": "all" if count is None else count, "seed": None if count is None else seed,
                       "named": {layout_text(p): preset for p, preset in named.items() if p in placements}}
    return plan


# ---------------------------------------------------------------------------------------------------------
# Analysis: loss by placement, and by layer position


def placement_values(groups, attention: int) -> list[tuple[tuple[int, ...], Any]]:
    """(placement, ranked GroupRow) for every ranked configuration with `attention` F layers, best first."""
    found = []
    for row in groups:
        if row.rank is None or row.stats is None:
            continue
        placement = placement_of(row.group.first("layer_types"), attention)
        if placement is not None:
            found.append((placement, row))
    return sorted(found, key=lambda p: p[1].rank)


def heat_grid(values: list[tuple[tuple[int, ...], Any]], n_layers: int) -> tuple[list[str], list[list[str]]]:
    """Two attention layers: first layer (rows) x second layer (columns), the mean metric in each cell."""
    by_pair = {p: row.stats.mean for p, row in values}
    best = values[0][0] if values else None
    headers = ["1st \\ 2nd"] + [str(j) for j in range(1, n_layers)]
    rows = []
    for i in range(n_layers - 1):
        cells = [str(i)]
        for j in range(1, n_layers):
            value = by_pair.get((i, j))
            cells.append("" if j <= i else "·" if value is None else f"{value:.4f}" + ("*" if (i, j) == best else ""))
        rows.append(cells)
    return headers, rows


def ranked_placements(values, metric: str, named: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    best = values[0][1].stats.mean if values else None
    rows = []
    for placement, row in values:
        s = row.stats
        rows.append([str(row.rank), ",".join(map(str, placement)), named.get(layout_text(placement), ""),
                     f"{s.mean:.4f}", str(s.n), "best" if row.rank == 1 else f"{s.mean - best:+.4f}"])
    return ["#", "attention layers", "preset", metric, "n", "Δ best"], rows


def layer_position_means(values, n_layers: int) -> list[tuple[int, int, float | None]]:
    """For each layer index: how many placements put attention there, and their mean metric (None if none)."""
    out = []
    for layer in range(n_layers):
        means = [row.stats.mean for p, row in values if layer in p]
        out.append((layer, len(means), sum(means) / len(means) if means else None))
    return out


def layer_position_table(values, n_layers: int, higher: bool) -> tuple[list[str], list[list[str]], str]:
    stats = layer_position_means(values, n_layers)
    overall = sum(row.stats.mean for _, row in values) / len(values)
    known = sorted((s for s in stats if s[2] is not None), key=lambda s: -s[2] if higher else s[2])
    rank = {s[0]: i + 1 for i, s in enumerate(known)}
    rows = [[str(layer), str(n), "-" if mean is None else f"{mean:.4f}",
             "-" if mean is None else f"{mean - overall:+.4f}", str(rank.get(layer, "-"))] for layer, n, mean in stats]
    best = known[0] if known else None
    verdict = (f"Attention at layer {best[0]} helps most on average: placements that include it have mean "
               f"{best[2]:.4f} against {overall:.4f} over all placements.") if best else ""
    return ["layer", "placements", "mean", "vs all", "rank"], rows, verdict
