import importlib.util
import pytest
import torch

from hybridctl.core.config import load_config
from hybridctl.core.model.hybrid_lm import HybridLM


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


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_linear_cross_entropy_matches_plain(chunk):
    from hybridctl.core.model.hybrid_lm import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(3, 50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 70, (3, 50))
    plain = torch.nn.functional.cross_entropy((h @ w.t()).view(-1, 70), y.view(-1))
    gh, gw = torch.autograd.grad(plain * 2.5, (h, w))
    fused = linear_cross_entropy(h, w, y, chunk_tokens=chunk)
    fh, fw = torch.autograd.grad(fused * 2.5, (h, w))
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)


def test_training_loss_equals_eval_loss():
    """The chunked loss used in training and the plain one used in eval are the same function."""
    cfg = load_config("tiny")
    cfg.model.vocab_size = 257
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    x, y = torch.randint(0, 257, (2, 40)), torch.randint(0, 257, (2, 40))
    train_loss = model(x, y).loss
    with torch.no_grad():
        eval_loss = model(x, y).loss
    torch.testing.assert_close(train_loss.detach(), eval_loss, rtol=1e-5, atol=1e-5)


def test_train_loss_setting_picks_the_loss_and_all_agree():
    from hybridctl.core.model.hybrid_lm import pick_loss

    assert [pick_loss(loss, "cuda") for loss in ("auto", "fused", "chunked", "plain")] == [
        "fused", "fused", "chunked", "plain"]
    assert [pick_loss(loss, "cpu") for loss in ("auto", "chunked", "plain")] == ["chunked", "chunked", "plain"]
    with pytest.warns(RuntimeWarning, match="needs CUDA"):
        assert pick_loss("fused", "cpu") == "chunked"
    cfg = load_config("tiny")
    cfg.model.vocab_size = 257
    torch.manual_seed(0)
    model = HybridLM(cfg.model).double()
    x, y = torch.randint(0, 257, (2, 40)), torch.randint(0, 257, (2, 40))
    results = {}
    impls = ["plain", "chunked"]
    if importlib.util.find_spec("triton"):
        impls.append("fused")  # without a GPU its kernel runs in Triton's interpreter (conftest.py)
    for impl in impls:
        model.loss_impl = impl
        loss = model(x, y).loss
        results[impl] = (loss.detach(), torch.autograd.grad(loss, model.embed.weight)[0])
    torch.testing.assert_close(results["chunked"][0], results["plain"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["chunked"][1], results["plain"][1], rtol=1e-10, atol=1e-12)
    if "fused" in results:  # its kernel computes in fp32
        torch.testing.assert_close(results["fused"][0], results["plain"][0].float(), rtol=1e-6, atol=1e-6)
        scale = results["plain"][1].abs().max().item()
        torch.testing.assert_close(results["fused"][1], results["plain"][1], rtol=0, atol=1e-6 * scale)


def test_blocks_compute_the_plain_pre_norm_residual_stream():
    """Blocks hand each residual add to the norm after it; the hidden states must equal the plain pre-norm
    recurrence x += mixer(norm(x)); x += mlp(norm(x)), then the final norm, on layers of every kind with an MoE."""
    cfg = load_config("tiny", ['model.pattern="LDLF"', "model.n_layers=4", "model.moe.n_experts=4", "model.d_model=64",
                               "model.n_heads=2", "model.gdn.num_heads=2", "model.gdn.head_dim=16", "model.vocab_size=97"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    idx = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        h, _ = model.hidden_states(idx)
        x = model.embed(idx)
        for block in model.blocks:
            x = x + block.mixer(block.mixer_norm(x))
            x = x + block.mlp(block.mlp_norm(x))
        assert torch.equal(h, model.norm(x))
