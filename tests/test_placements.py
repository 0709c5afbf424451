"""Placement sweeps (`ablate arch --attention K --placements all|N`) and their report: which placements and which
layer positions give the lowest loss."""

import itertools
import json
import math
import re

import pytest

from conftest import MICRO, run_cli
from hybridctl.core.config import load_config
from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.placements import _nth_combination, choose_placements, plan_placement_sweep

# MICRO's shape on tiny's own 4 layers (placements set the attention layers)
SHAPE = [a for s in MICRO if not s.startswith(("model.pattern", "model.n_layers", "train.steps")) for a in ("--set", s)]


def test_nth_combination_follows_itertools_order():
    for n, k in ((5, 2), (6, 3), (4, 4)):
        assert [_nth_combination(n, k, i) for i in range(math.comb(n, k))] == list(itertools.combinations(range(n), k))


def test_sample_is_reproducible_and_includes_named_presets_and_the_base():
    first, named = choose_placements(12, 2, 5, seed=7, base=(3, 6))
    again, _ = choose_placements(12, 2, 5, seed=7, base=(3, 6))
    other, _ = choose_placements(12, 2, 5, seed=8, base=(3, 6))
    assert first == again and first != other
    assert named[(3, 6)] == "hybrid_sparse" and named[(5, 11)] == "hybrid_sparse_5_11"
    assert {(3, 6), (5, 11)} <= set(first) and 5 <= len(first) <= 7


def test_plan_of_every_placement_on_the_base_preset():
    plan = plan_placement_sweep("hybrid_sparse", 2, None)
    assert len(plan.runs) == 66 and plan.name == "placements_hybrid_sparse_2of12_all"
    layouts = {"".join(r.cfg.model.layer_types()) for r in plan.runs}
    assert "LLLFLLFLLLLL" in layouts and len(layouts) == 66
    assert plan.to_dict()["placements"]["attention"] == 2
    assert load_config("hybrid_sparse").train.lr == plan.runs[0].cfg.train.lr  # the base preset's settings stay


def test_placement_sweep_and_its_report(tmp_path):
    out = tmp_path / "runs"
    args = ["ablate", "arch", "--preset", "tiny", "--attention", "2", "--placements", "3", "--seed", "0",
            "--steps", "2", "--out", str(out), *SHAPE]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    path = out / "ablations" / "placements_tiny_2of4_3s0"
    state = json.loads((path / "sweep.json").read_text())
    assert state["placements"]["attention"] == 2 and state["placements"]["n_layers"] == 4
    expected, _ = choose_placements(4, 2, 3, seed=0)
    names = [f"tiny_attn{a}-{b}" for a, b in expected]
    assert sorted(state["status"]) == sorted(names) and all(v == "complete" for v in state["status"].values())
    losses = {n: json.loads((path / n / "summary.json").read_text())["best_val_loss"] for n in names}

    report = run_cli("report", str(path))
    assert report.returncode == 0, report.stderr
    assert "best_val_loss by placement of 2 attention layers among 4" in report.stdout
    best = min(losses, key=losses.get)
    a, b = re.findall(r"\d+", best)
    assert f"{losses[best]:.4f}*" in report.stdout  # the grid marks the best placement
    assert re.search(rf"^{a}\s.*{losses[best]:.4f}\*", report.stdout, re.M)
    # layer positions: the mean loss of the placements that include each layer
    for layer in range(4):
        with_layer = [v for (p, v) in zip(expected, [losses[n] for n in names]) if layer in p]
        if with_layer:
            mean = sum(with_layer) / len(with_layer)
            assert re.search(rf"^\s*{layer}\s+{len(with_layer)}\s+{mean:.4f}\s", report.stdout, re.M), layer
    md = (path / "report.md").read_text()
    assert "## Which layer positions help most" in md and f"{losses[best]:.4f}*" in md


@pytest.mark.parametrize("args, message", [
    (["--attention", "13"], "--attention 13 is more than the 12 layers"),
    (["--attention", "0"], "--attention must be at least 1"),
    (["--attention", "2", "--placements", "0"], "--placements must be at least 1"),
    (["--placements", "4"], "say how many with --attention"),
    (["--attention", "2", "--patterns", "LLFL"], "drop --patterns"),
    (["--attention", "2", "--placements", "70"], "more than the 66 placements .* pass --placements all"),
])
def test_bad_placement_options_end_in_one_line(tmp_path, args, message):
    result = run_cli("ablate", "arch", "--preset", "hybrid_sparse", *args, "--out", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert re.fullmatch(rf"error: .*{message}.*\n", result.stderr), result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_base_with_sparse_attention_is_refused(tmp_path):
    """A placement keeps L and F only, so the D layers of dsa_sandwich (LDDL) would vanish: refused, not run."""
    result = run_cli("ablate", "arch", "--preset", "dsa_sandwich", "--attention", "1", "--placements", "2",
                     "--out", str(tmp_path / "runs"))
    assert result.returncode != 0
    assert re.fullmatch(r"error: .*dsa_sandwich also has D layers \(LDDL\).*--patterns instead\n", result.stderr), result.stderr
    assert not (tmp_path / "runs").exists()


def test_count_larger_than_layers_in_the_library():
    with pytest.raises(ConfigError, match="more than the 4 layers"):
        choose_placements(4, 5, None)
