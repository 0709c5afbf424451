import pytest
import torch

from hybridctl.core.config import load_config
from hybridctl.core.model import HybridLM


@pytest.mark.parametrize("preset,params_m", [("transformer", 122.7), ("hybrid_sparse", 146.5), ("deltanet", 151.3)])
def test_study_a_parameter_counts(preset, params_m):
    """768d x 12L with SwiGLU 2048, tied 49152-token embeddings: the sizes the reference H100 model had."""
    cfg = load_config(preset)
    cfg.model.vocab_size = 49152
    with torch.device("meta"):
        model = HybridLM(cfg.model)
    assert round(model.num_params() / 1e6, 1) == params_m
    assert [b.kind for b in model.blocks] == cfg.model.layer_types()


def test_tied_embeddings_and_loss_at_init():
    cfg = load_config("tiny")
    cfg.model.vocab_size = 257
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    assert model.lm_head.weight is model.embed.weight
    x, y = torch.randint(0, 257, (2, 40)), torch.randint(0, 257, (2, 40))
    out = model(x, y, return_logits=True)
    assert out.logits.shape == (2, 40, 257)
    # a fresh model is close to uniform over the (padded) vocabulary
    assert abs(out.loss.item() - torch.log(torch.tensor(320.0)).item()) < 0.5
