import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import micro_config
from hybridctl.core.training import checkpoint_files
from hybridctl.core.config import load_config, load_config_file
from hybridctl.core.model.hybrid_lm import HybridLM
from hybridctl.core.model.moe import MoE
from hybridctl.core.training.runs import RunDir
from hybridctl.core.model.sparse_attention import DeepSeekSparseAttention
from hybridctl.core.training.trainer import train
from test_train_resume import StopAfter, losses

STUDY_C = {
    "sandwich": "LFFL", "linear_first": "LLFF", "alternating_fl": "FLFL", "full_first": "FFLL",
    "dsa_sandwich": "LDDL", "dsa_linear_first": "LLDD", "dsa_alternating": "DLDL", "dsa_full_first": "DDLL",
}
# Pattern LDFL with MoE on layers 1 and 3; top-8 of 32 tokens so the sparse path really selects.
SPARSE_MOE = [
    "model.n_layers=4", 'model.pattern="LDFL"', "model.dsa.topk=8", "model.dsa.indexer_heads=2",
    "model.dsa.indexer_dim=8", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.moe_every=2",
]


@pytest.mark.parametrize("name,pattern", STUDY_C.items())
def test_study_c_presets(name, pattern):
    """4 layers x 128d, MoE every second layer, ~14M parameters with the SmolLM tokenizer as in the study."""
    cfg = load_config(name)
    cfg.model.vocab_size = 49152
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    assert "".join(b.kind for b in model.blocks) == pattern
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, True, False, True]
    assert all(b.mlp.n_experts == 4 and b.mlp.top_k == 2 for b in model.blocks[1::2])
    assert 13.5e6 < model.num_params() < 15.5e6
    assert cfg.model.d_model == 128 and cfg.train.steps == 1000


def test_arch_sweep_trains_presets_for_their_own_steps():
    """Without --steps an arch sweep runs the presets' own train.steps (study C's 1000, study A's 300); presets of
    different lengths need --steps, since every run of a sweep trains as long."""
    from hybridctl.core.errors import ConfigError
    from hybridctl.core.lab.sweeps import STUDY_C as GROUP, plan_arch_sweep

    plan = plan_arch_sweep(GROUP, seeds=[0, 1])
    assert plan.steps == 1000 and {r.cfg.train.steps for r in plan.runs} == {1000} and len(plan.runs) == 16
    assert plan_arch_sweep(["hybrid_sparse", "deltanet"]).steps == 300
    assert plan_arch_sweep(["sandwich", "hybrid_sparse"], steps=50).steps == 50
    assert plan_arch_sweep(["sandwich", "hybrid_sparse"], overrides=["train.steps=40"]).steps == 40
    with pytest.raises(ConfigError, match="different numbers of steps .*sandwich 1000, hybrid_sparse 300.*--steps"):
        plan_arch_sweep(["sandwich", "hybrid_sparse"])


@pytest.fixture(scope="module")
def sparse_moe_run(tmp_path_factory):
    cfg = micro_config(SPARSE_MOE)
    run = RunDir(tmp_path_factory.mktemp("runs") / "ldfl")
    run.create(cfg)
    train(cfg, run)
    return run


def test_sparse_moe_model_trains_and_logs_aux_losses(sparse_moe_run):
    cfg = load_config_file(sparse_moe_run.config_path)
    model = HybridLM(cfg.model)
    assert isinstance(model.blocks[1].mixer, DeepSeekSparseAttention) and isinstance(model.blocks[3].mlp, MoE)
    rows = [r for r in sparse_moe_run.read_metrics() if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert math.isfinite(r["loss"]) and r["indexer_kl"] >= 0 and math.isfinite(r["indexer_kl"])
        assert 0 < r["moe_balance"] <= 8  # two MoE layers, each at most n_experts (all on one expert)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_sparse_moe_resume_is_bit_exact(sparse_moe_run, tmp_path):
    cfg = micro_config(SPARSE_MOE)
    run = RunDir(tmp_path / "half")
    run.create(cfg)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, callback=StopAfter(3))
    train(load_config_file(run.config_path), run, resume_from=run.resolve_checkpoint("latest"))
    assert losses(run) == losses(sparse_moe_run)
    aux = lambda r: [(m["indexer_kl"], m["moe_balance"]) for m in r.read_metrics() if "loss" in m]
    assert aux(run) == aux(sparse_moe_run)
    a = load_file(str(sparse_moe_run.step_checkpoints()[-1] / checkpoint_files.MODEL_FILE))
    b = load_file(str(run.step_checkpoints()[-1] / checkpoint_files.MODEL_FILE))
    assert any(k.startswith("blocks.1.mixer.indexer.") for k in a) and any(".mlp.experts.3." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
