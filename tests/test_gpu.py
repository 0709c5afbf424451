"""GPU checks: fla's Triton kernels and this project's against its PyTorch code. Run on a CUDA machine with
`pytest -m gpu -s` (the errors are printed); skipped elsewhere. Shapes share head dims with the study presets
so compiled kernels are reused."""

import pytest
import torch

from hybridctl.core.model.gdn_dispatch import fla_status
from hybridctl.core.model.gated_delta import GatedDeltaNet, gated_delta_rule

pytestmark = pytest.mark.gpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def op_inputs(B, T, H, K, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, H, V)
    a, b = mk(B, T, H), mk(B, T, H)
    A_log = torch.empty(H, device="cuda").uniform_(0, 16).log().requires_grad_()
    dt_bias = (torch.rand(H, device="cuda") * 0.1).requires_grad_()
    return [q, k, v, a, b, A_log, dt_bias]


# One shape for every test, with the study presets' heads (6 of 128, V=256): fla autotunes per head shape, for
# minutes, so these tests reuse what a study-shape run has tuned (with TRITON_CACHE_DIR kept).
B, T, H, K, V = 2, 256, 6, 128, 256


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2)])
def test_fla_op_matches_reference(dtype, tol):
    assert fla_status(K)[0], fla_status(K)[1]
    inputs = op_inputs(B, T, H, K, V, dtype)
    names = "q k v a b A_log dt_bias".split()
    out_fla = gated_delta_rule(*inputs, backend="fla")
    ref_inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out_ref = gated_delta_rule(*ref_inputs, backend="torch")
    w = torch.randn_like(out_ref.float())
    grads_fla = torch.autograd.grad((out_fla.float() * w).sum(), inputs)
    grads_ref = torch.autograd.grad((out_ref.float() * w).sum(), ref_inputs)
    errors = {"o": rel_err(out_fla, out_ref)}
    errors.update({f"d{n}": rel_err(a, b) for n, a, b in zip(names, grads_fla, grads_ref)})
    print(f"\nfla vs reference, {dtype}, T={T}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e < tol for e in errors.values()), errors


def test_padded_decay_beta_projection_matches_the_plain_one():
    """On CUDA the 12-column decay and beta projection runs through a weight padded to 16 rows: under bf16
    autocast, its output and the gradients of its input and weight match the plain linear layer's."""
    layer = GatedDeltaNet(768, H, K, V / K).cuda()
    x = torch.randn(B, T, 768, device="cuda", requires_grad=True)
    dy = torch.randn(B, T, 2 * H, device="cuda")
    results = []
    for fn in (layer.decay_beta_logits, layer.ab_proj):
        x.grad = layer.ab_proj.weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        (y.float() * dy).sum().backward()
        results.append((y.float(), x.grad.clone(), layer.ab_proj.weight.grad.clone()))
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = results
    errors = {"y": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref), "dw": rel_err(dw, dw_ref)}
    print("\npadded decay/beta projection vs plain: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert y.shape == y_ref.shape and all(e < 1e-2 for e in errors.values()), errors


def layer_errors(layer: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Relative errors of a layer's output and parameter gradients against the reference layer, bf16 autocast."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, y_ref = layer(x), ref(x)
    w = torch.randn_like(y_ref.float())
    (y.float() * w).sum().backward()
    (y_ref.float() * w).sum().backward()
    errors = {"y": rel_err(y, y_ref)}
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        errors[name] = rel_err(p.grad, q.grad)
    return errors


@pytest.mark.parametrize("backend", ["fused", "fused, fla's autotuned wrappers", "fla"])
def test_layer_matches_reference_layer(backend, monkeypatch):
    """On Hopper the fused op launches three of fla's backward kernels at its own configs; the second case runs
    it with fla's wrappers instead, so both launch paths are checked."""
    from hybridctl.core.kernels import gdn_fused
    from hybridctl.core.model.gdn_dispatch import layer_path

    if backend.startswith("fused, "):
        monkeypatch.setattr(gdn_fused, "launch_config", lambda kernel, k, v, config="auto": None)
        backend = "fused"
    torch.manual_seed(0)
    layer = GatedDeltaNet(512, num_heads=H, head_dim=K, expand_v=V / K, backend=backend).cuda()
    ref = GatedDeltaNet(512, num_heads=H, head_dim=K, expand_v=V / K, backend="torch").cuda()
    ref.load_state_dict(layer.state_dict())
    assert layer_path(True, K, V, layer.conv_size, backend) == backend
    errors = layer_errors(layer, ref, torch.randn(B, T, 512, device="cuda"))
    print(f"\n{backend} layer vs reference layer (bf16 autocast): "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e < 3e-2 for e in errors.values()), errors


def test_fused_layer_compiles_to_one_graph():
    """The fused op is one graph node: fullgraph compilation succeeds and matches the reference, with T not a
    multiple of the chunk length."""
    torch.manual_seed(1)
    layer = GatedDeltaNet(512, num_heads=H, head_dim=K, expand_v=V / K, backend="fused").cuda()
    ref = GatedDeltaNet(512, num_heads=H, head_dim=K, expand_v=V / K, backend="torch").cuda()
    ref.load_state_dict(layer.state_dict())
    errors = layer_errors(torch.compile(layer, fullgraph=True), ref, torch.randn(B, T - 36, 512, device="cuda"))
    print("\ncompiled fused layer vs reference layer: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e < 3e-2 for e in errors.values()), errors


def test_attention_and_mlp_kernels_match_cpu_reference():
    """Attention (rotary kernel) then SwiGLU (activation kernels) on CUDA, compiled as one graph in bf16 autocast,
    against the same modules on the CPU in fp32 (the PyTorch code): output and every parameter gradient."""
    import copy

    from hybridctl.core.model.attention import CausalSelfAttention
    from hybridctl.core.model.layers import SwiGLU

    torch.manual_seed(2)
    cpu = torch.nn.Sequential(CausalSelfAttention(256, 4), SwiGLU(256, 512))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 300, 256)
    w = torch.randn(2, 300, 256)
    y_ref = cpu(x)
    (y_ref * w).sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = torch.compile(gpu, fullgraph=True)(x.cuda())
    (y.float() * w.cuda()).sum().backward()
    errors = {"y": rel_err(y.cpu(), y_ref.detach())}
    for (name, p), q in zip(gpu.named_parameters(), cpu.parameters()):
        errors[name] = rel_err(p.grad.cpu(), q.grad)
    print("\nattention + SwiGLU kernels vs CPU reference: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(e < 3e-2 for e in errors.values()), errors


@pytest.mark.parametrize("impl", ["chunked", "fused", "fused, compiled"])
def test_linear_cross_entropy_bf16(impl):
    """The chunked losses against the plain one in bf16 autocast (fp32 softmax): loss and both gradients, over
    several chunks; the fused op also inside torch.compile, as the trainer runs it."""
    from hybridctl.core.kernels.fused_loss import fused_linear_cross_entropy
    from hybridctl.core.model.hybrid_lm import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(4096, 768, device="cuda", requires_grad=True)
    w = (torch.randn(49152, 768, device="cuda") * 0.02).requires_grad_()
    y = torch.randint(0, 49152, (4096,), device="cuda")
    loss_fn = linear_cross_entropy if impl == "chunked" else fused_linear_cross_entropy
    if impl.endswith("compiled"):
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = torch.nn.functional.cross_entropy((h @ w.t()).float(), y)
        gh, gw = torch.autograd.grad(plain, (h, w))
        chunked = loss_fn(h, w, y, 1024)
        ch, cw = torch.autograd.grad(chunked, (h, w))
    assert abs(chunked.item() - plain.item()) < 1e-3 * plain.item()
    errors = rel_err(ch, gh), rel_err(cw, gw)
    print(f"\n{impl} loss vs plain: dh {errors[0]:.2e}, dw {errors[1]:.2e}")
    assert max(errors) < 2e-2


# The micro model of the CPU tests at this file's head sizes, for whole-model checks on CUDA.
CUDA_MICRO = [f"model.gdn.head_dim={K}", f"model.gdn.num_heads={H}", "model.d_model=256", "model.n_heads=4"]


def test_training_steps_on_cuda(tmp_path):
    from conftest import micro_config
    from hybridctl.core.training.runs import RunDir
    from hybridctl.core.training.trainer import train

    cfg = micro_config(CUDA_MICRO + [f"train.seq_len={T}", f"train.batch_size={B}"])
    run = RunDir(tmp_path / "cuda")
    run.create(cfg)
    summary = train(cfg, run)
    assert summary["final_val_loss"] < 6.0 and "cpu" not in summary["device"]


def test_compiled_training_model_matches_eager():
    """The model as the trainer compiles it (with its inductor options) against the same model run eagerly, both
    on CUDA in bf16 autocast: loss and every parameter's gradient."""
    from conftest import micro_config
    from hybridctl.core.model.hybrid_lm import build_model, pick_loss
    from hybridctl.core.training.steps import wrap_for_training

    cfg = micro_config(CUDA_MICRO + ['model.pattern="LFL"', "model.n_layers=3"])
    cfg.model.vocab_size = 512
    torch.manual_seed(0)
    model = build_model(cfg.model).cuda()
    model.loss_impl = pick_loss("auto", "cuda")
    tokens = torch.randint(0, 512, (B, T + 1), device="cuda")
    results = []
    for compiled in (False, True):
        step_model, _ = wrap_for_training(model, torch.device("cuda"), compiled=compiled, ddp=False)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    errors = {n: rel_err(grads[n], eager_grads[n]) for n in grads}
    worst = sorted(errors, key=errors.get, reverse=True)[:3]
    print(f"\ncompiled vs eager: loss {rel_err(loss, eager_loss):.2e}; largest gradient errors "
          + ", ".join(f"{n} {errors[n]:.2e}" for n in worst))
    assert rel_err(loss, eager_loss) < 1e-2
    assert errors[worst[0]] < 3e-2



def test_cuda_model_matches_cpu_model():
    """A whole model on CUDA (the fused layer, the residual add + norm kernels) in bf16 autocast, compiled as the
    trainer compiles it, against the same weights on the CPU in fp32 (the PyTorch code): loss and every
    parameter's gradient. The decay's parameters (A_log, dt_bias) sum the gate's gradient over every token and
    time step after three layers of bf16, so they get twice the others' tolerance."""
    import copy

    from conftest import micro_config
    from hybridctl.core.model.hybrid_lm import build_model, pick_loss
    from hybridctl.core.training.steps import wrap_for_training

    cfg = micro_config(CUDA_MICRO + ['model.pattern="LFL"', "model.n_layers=3"])
    cfg.model.vocab_size = 512
    torch.manual_seed(0)
    cpu = build_model(cfg.model)
    cpu.loss_impl = pick_loss("auto", "cpu")
    gpu = copy.deepcopy(cpu).cuda()
    gpu.loss_impl = pick_loss("auto", "cuda")
    tokens = torch.randint(0, 512, (B, T + 1))
    ref = cpu(tokens[:, :-1], tokens[:, 1:]).loss
    ref.backward()
    step_model, _ = wrap_for_training(gpu, torch.device("cuda"), compiled=True, ddp=False)
    tokens = tokens.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step_model(tokens[:, :-1], tokens[:, 1:]).loss
    loss.backward()
    errors = {n: rel_err(p.grad.cpu(), q.grad) for (n, p), q in zip(gpu.named_parameters(), cpu.parameters())}
    worst = sorted(errors, key=errors.get, reverse=True)[:3]
    print(f"\nCUDA model vs CPU model: loss {rel_err(loss.cpu(), ref.detach()):.2e}; largest gradient errors "
          + ", ".join(f"{n} {errors[n]:.2e}" for n in worst))
    assert rel_err(loss.cpu(), ref.detach()) < 1e-2
    assert all(e < (6e-2 if n.endswith(("A_log", "dt_bias")) else 3e-2) for n, e in errors.items()), errors


def test_moe_router_reads_fp32_norm_on_cuda():
    """Under bf16 autocast the norm before an MoE layer hands it fp32 (as F.rms_norm does), so routing decisions
    are taken on unrounded values; the other norms hand their matmuls bf16."""
    from conftest import micro_config
    from hybridctl.core.model.hybrid_lm import build_model

    cfg = micro_config(CUDA_MICRO + ['model.pattern="LFL"', "model.n_layers=3", "model.moe.n_experts=4"])
    cfg.model.vocab_size = 512
    model = build_model(cfg.model).cuda()
    seen = {}
    for i, block in enumerate(model.blocks):
        block.mlp.register_forward_pre_hook(lambda module, args, i=i: seen.__setitem__(i, args[0].dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randint(0, 512, (B, T), device="cuda"))
    assert seen == {0: torch.bfloat16, 1: torch.float32, 2: torch.bfloat16}
