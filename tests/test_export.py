"""`hybridctl export`: the run's tensors in fla's names and layouts and back, bit for bit; config.json back to the
run's ModelConfig; the tokenizer files encode as the run did; refusals leave nothing behind. The GPU test loads the
folder with transformers + fla and compares logits with hybridctl's (benchmarks/export_check.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, micro_config
from hybridctl.cli import main
from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.export import load_export, read_export_config
from hybridctl.core.lab.hf_export import check_exportable, from_hf_tensors, hf_config, model_config_from_hf, to_hf_tensors
from hybridctl.core.model.hybrid_lm import build_model, padded_vocab
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training.runs import RunDir

HYBRID = ['model.pattern="LLFL"', "model.n_layers=4"]


def saved_run(root: Path, overrides: list[str], name: str = "run", vocab: int = 257, seed: int = 0) -> Path:
    """A run folder with its config (vocabulary filled in, as the trainer writes it) and a best/ checkpoint of a
    model whose every parameter is random (norm weights and gates too, so a misplaced tensor changes the logits)."""
    cfg = micro_config(overrides)
    cfg.model.vocab_size = vocab
    run = RunDir(root / name)
    run.create(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt.save_checkpoint(run.best_dir, model, None, {"step": 3, "config": cfg.to_dict()})
    run.release_lock()
    return run.path


def run_model(path: Path):
    cfg = RunDir(path).load_config()
    model = build_model(cfg.model)
    ckpt.load_checkpoint(RunDir(path).best_dir, model)
    return model.eval(), cfg


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# Tensors and config


@pytest.mark.parametrize("overrides,vocab", [
    (HYBRID, 320),                                    # no padding rows: the whole state dict
    (HYBRID + ["model.tie_embeddings=false"], 257),   # untied head, 63 padding rows
    (['model.pattern="FF"', "model.attention.window=8"], 300),
])
def test_every_tensor_goes_to_exactly_one_place_and_back(overrides, vocab):
    """Each parameter element gets a distinct value; the export holds each real element exactly once (padding rows
    of the vocabulary left out), and reading it back gives every tensor bit for bit."""
    cfg = micro_config(overrides).model
    cfg.vocab_size = vocab
    model = build_model(cfg)
    state = ckpt.model_tensors(model)
    with torch.no_grad():
        start = 0
        for t in state.values():
            t.copy_(torch.arange(start, start + t.numel(), dtype=torch.float32).view_as(t))
            start += t.numel()
    exported = to_hf_tensors(state, cfg)
    padding = (padded_vocab(vocab) - vocab) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    values = torch.cat([t.flatten() for t in exported.values()])
    assert values.numel() == start - padding
    assert values.unique().numel() == values.numel()  # no element twice
    real = torch.cat([t[:vocab].flatten() if n in ("embed.weight", "lm_head.weight") else t.flatten() for n, t in state.items()])
    assert torch.equal(values.sort().values, real.sort().values)  # and every real element once
    assert all(t.is_contiguous() for t in exported.values())
    back = from_hf_tensors(exported, cfg)
    assert back.keys() == state.keys()
    for name, t in state.items():
        expected = t[:vocab] if name in ("embed.weight", "lm_head.weight") else t
        assert torch.equal(back[name], expected), name


def test_fla_names_and_layouts():
    cfg = micro_config(HYBRID).model
    cfg.vocab_size = 257
    exported = to_hf_tensors(ckpt.model_tensors(build_model(cfg)), cfg)
    g, d = cfg.gdn, cfg.d_model
    key, value = g.num_heads * g.head_dim, g.num_heads * int(g.head_dim * g.expand_v)
    assert exported["model.embeddings.weight"].shape == (257, d) and "lm_head.weight" not in exported  # tied
    assert exported["model.layers.0.attn.q_conv1d.weight"].shape == (key, 1, g.conv_size)
    assert exported["model.layers.0.attn.v_conv1d.weight"].shape == (value, 1, g.conv_size)
    assert exported["model.layers.0.attn.g_proj.weight"].shape == (value, d)
    assert exported["model.layers.0.attn.a_proj.weight"].shape == (g.num_heads, d)
    assert exported["model.layers.0.attn.o_norm.weight"].shape == (int(g.head_dim * g.expand_v),)
    assert exported["model.layers.2.attn.k_proj.weight"].shape == (d, d)
    assert exported["model.layers.2.mlp.up_proj.weight"].shape == (cfg.ffn_dim, d)
    assert "model.layers.2.attn.A_log" not in exported and "model.layers.3.attn.A_log" in exported


@pytest.mark.parametrize("overrides", [
    HYBRID,
    ['model.pattern=""', "model.attention_layers=[1]"],
    ['model.pattern="LL"', "model.n_heads=3", "model.d_model=48"],  # n_heads only in the hybridctl block
    ['model.pattern="FF"', "model.attention.window=8", "model.attention.rope_theta=500000.0", "model.norm_eps=1e-5",
     "model.d_ff=96", "model.tie_embeddings=false", "model.gdn.conv_size=3", "model.gdn.chunk_size=32"],
])
def test_config_json_gives_back_the_runs_model_config(overrides):
    cfg = micro_config(overrides).model
    cfg.vocab_size = 257
    config = json.loads(json.dumps(hf_config(cfg, 32, 256, {"run": "r"})))
    assert config["model_type"] == "gated_deltanet" and config["architectures"] == ["GatedDeltaNetForCausalLM"]
    assert config["intermediate_size"] == cfg.ffn_dim and config["vocab_size"] == 257
    assert model_config_from_hf(config) == cfg
    attention = [i for i, k in enumerate(cfg.layer_types()) if k == "F"]
    assert (config["attn"] or {}).get("layers", []) == attention
    # fla's own fields alone (no hybridctl block) describe a model of the same function
    plain = model_config_from_hf({k: v for k, v in config.items() if k != "hybridctl"})
    assert plain.layer_types() == cfg.layer_types() and plain.ffn_dim == cfg.ffn_dim
    assert dict(ckpt.model_tensors(build_model(plain))).keys() == dict(ckpt.model_tensors(build_model(cfg))).keys()


@pytest.mark.parametrize("change,words", [
    ({"use_gate": False}, "output gate"),
    ({"num_v_heads": 4}, "value heads"),
    ({"output_gate_activation": "sigmoid"}, "SiLU"),
    ({"model_type": "llama"}, "model_type"),
])
def test_config_json_that_hybridctl_cannot_compute_is_refused(change, words):
    cfg = micro_config(HYBRID).model
    cfg.vocab_size = 257
    with pytest.raises(ConfigError, match=words):
        model_config_from_hf({**hf_config(cfg, 32, 256, {}), **change})


@pytest.mark.parametrize("overrides,words", [
    (['model.pattern="LD"'], "sparse attention"),
    (["model.moe.n_experts=4"], "mixture-of-experts"),
    (["model.d_model=64", "model.n_heads=1"], None),  # head dim 64: fine
    (["model.gdn.head_dim=256", "model.gdn.expand_v=2.0"], None),  # fla's default heads: 256 x 512
    (["model.gdn.head_dim=320", "model.gdn.expand_v=1.0"], "model.gdn.head_dim 320"),
    (["model.d_model=640", "model.n_heads=2"], "attention head dim 320"),
])
def test_what_fla_cannot_express_is_refused(overrides, words):
    cfg = micro_config(overrides).model
    if words is None:
        check_exportable(cfg)
        return
    with pytest.raises(ConfigError, match=words):
        check_exportable(cfg)


def test_an_unknown_setting_away_from_its_default_is_refused(monkeypatch):
    """A ModelConfig field added later (here: a stand-in) may change what the model computes."""
    import dataclasses

    from hybridctl.core import config as config_module

    fields = [("qk_norm", bool, dataclasses.field(default=False))]
    patched = dataclasses.make_dataclass("ModelConfig", fields, bases=(config_module.ModelConfig,))
    base = micro_config(HYBRID).model
    cfg = patched(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    monkeypatch.setattr("hybridctl.core.lab.hf_export.ModelConfig", patched)
    check_exportable(cfg)  # at its default: exported
    cfg.qk_norm = True
    with pytest.raises(ConfigError, match="qk_norm"):
        check_exportable(cfg)


def fla_forward(tensors: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    """fla's GatedDeltaNetForCausalLM forward written out in plain PyTorch from its modelling code, reading the
    exported tensors by fla's names and layouts (a Conv1d weight [C, 1, W] with W-1 left padding, q_proj for the
    queries, a_proj for the decay, ...). The recurrence is hybridctl's step-by-step oracle."""
    from hybridctl.core.model.gated_delta import recurrent_gated_delta_rule

    F = torch.nn.functional
    eps, d = config["norm_eps"], config["hidden_size"]
    norm = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, eps)  # noqa: E731
    attn_layers = (config["attn"] or {}).get("layers", [])
    x = tensors["model.embeddings.weight"][ids]
    B, T = ids.shape
    for i in range(config["num_hidden_layers"]):
        p = lambda name: tensors[f"model.layers.{i}.{name}"]  # noqa: E731
        h = norm(x, p("attn_norm.weight"))
        if i in attn_layers:
            heads = config["attn"]["num_heads"]
            q, k, v = (F.linear(h, p(f"attn.{n}_proj.weight")).view(B, T, heads, d // heads).transpose(1, 2) for n in "qkv")
            half = d // heads // 2
            inv_freq = 1.0 / config["attn"]["rope_theta"] ** (torch.arange(0, 2 * half, 2).float() / (2 * half))
            angle = torch.outer(torch.arange(T).float(), inv_freq)
            cos, sin = angle.cos(), angle.sin()
            rope = lambda t: torch.cat([t[..., :half] * cos - t[..., half:] * sin, t[..., half:] * cos + t[..., :half] * sin], -1)  # noqa: E731
            i_, j_ = torch.arange(T)[:, None], torch.arange(T)[None]
            window = config["attn"]["window_size"]
            mask = (j_ <= i_) & ((j_ > i_ - window) if window else True)
            o = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=mask).transpose(1, 2).reshape(B, T, d)
        else:
            H, K = config["num_heads"], config["head_dim"]
            V = int(K * config["expand_v"])
            def conv(name, t):
                w = p(f"attn.{name}_conv1d.weight")  # [C, 1, W]
                return F.silu(F.conv1d(t.transpose(1, 2), w, padding=w.shape[-1] - 1, groups=w.shape[0])[..., :T].transpose(1, 2))
            q, k, v = (conv(n, F.linear(h, p(f"attn.{n}_proj.weight"))) for n in "qkv")
            q, k = (F.normalize(t.view(B, T, H, K), dim=-1, eps=1e-6) for t in (q, k))
            g = -p("attn.A_log").exp() * F.softplus(F.linear(h, p("attn.a_proj.weight")) + p("attn.dt_bias"))
            beta = F.linear(h, p("attn.b_proj.weight")).sigmoid()
            o, _ = recurrent_gated_delta_rule(q, k, v.view(B, T, H, V), g, beta)
            gate = F.linear(h, p("attn.g_proj.weight")).view(B, T, H, V)
            o = (norm(o, p("attn.o_norm.weight")) * F.silu(gate)).reshape(B, T, H * V)
        x = x + F.linear(o, p("attn.o_proj.weight"))
        h = norm(x, p("mlp_norm.weight"))
        x = x + F.linear(F.silu(F.linear(h, p("mlp.gate_proj.weight"))) * F.linear(h, p("mlp.up_proj.weight")),
                         p("mlp.down_proj.weight"))
    head = tensors["model.embeddings.weight"] if config["tie_word_embeddings"] else tensors["lm_head.weight"]
    return F.linear(norm(x, tensors["model.norm.weight"]), head)


@pytest.mark.parametrize("overrides", [
    HYBRID,
    ['model.pattern="FLF"', "model.n_layers=3", "model.attention.window=5", "model.tie_embeddings=false",
     "model.attention.rope_theta=300.0", "model.norm_eps=1e-4"],
])
def test_exported_tensors_mean_in_fla_what_they_meant_in_hybridctl(overrides):
    """fla's forward, as written in fla_forward, on the exported tensors gives hybridctl's logits (fp32 rounding;
    a swapped pair of tensors errs by orders of magnitude more)."""
    cfg = micro_config(overrides).model
    cfg.vocab_size = 257
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    tensors = to_hf_tensors(ckpt.model_tensors(model), cfg)
    config = hf_config(cfg, 32, 256, {})
    ids = torch.randint(0, 257, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert (fla_forward(tensors, config, ids) - expected).abs().max() < 1e-4 * expected.abs().max()
        layer = "model.layers.0.attn" if "L" == cfg.layer_types()[0] else "model.layers.1.attn"
        swapped = {**tensors, f"{layer}.a_proj.weight": tensors[f"{layer}.b_proj.weight"],
                   f"{layer}.b_proj.weight": tensors[f"{layer}.a_proj.weight"]}
        assert (fla_forward(swapped, config, ids) - expected).abs().max() > 1e-2 * expected.abs().max()


# ---------------------------------------------------------------------------------------------------------
# The command


def test_export_writes_a_folder_that_reads_back_to_the_same_logits(tmp_path, capsys):
    run = saved_run(tmp_path, HYBRID)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layers LLFL" in printed and "63 padding rows left out" in printed
    assert "load: on a CUDA machine with fla (and flash-attn for attention layers)" in printed  # fla needs a GPU
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses a safetensors file without it
    config = read_export_config(out)
    assert config["hybridctl"]["step"] == 3 and config["hybridctl"]["checkpoint"] == "best"
    assert config["eos_token_id"] == 256 and config["max_position_embeddings"] == 32
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 256

    original, cfg = run_model(run)
    imported, _ = load_export(out)
    assert imported.cfg == cfg.model
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(imported(ids).logits, original(ids).logits)
    theirs, ours = ckpt.model_tensors(original), ckpt.model_tensors(imported)
    for name, t in theirs.items():
        rows = slice(0, 257) if name == "embed.weight" else slice(None)
        assert torch.equal(ours[name][rows], t[rows]), name


def test_export_of_a_trained_run(finished_micro_run, tmp_path):
    """The run the trainer wrote (checkpoints and best/), exported from a checkpoint folder inside it."""
    out = tmp_path / "hf"
    step = finished_micro_run / "checkpoints" / "step_000003"
    assert main(["export", str(step), "--out", str(out)]) == 0
    assert read_export_config(out)["hybridctl"]["step"] == 3
    model = build_model(RunDir(finished_micro_run).load_config().model)
    ckpt.load_checkpoint(step, model)
    imported, _ = load_export(out)
    ids = torch.randint(0, 257, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(imported.eval()(ids).logits, model.eval()(ids).logits)


def test_force_replaces_an_earlier_export_only(tmp_path, capsys):
    run = saved_run(tmp_path, HYBRID)
    other = saved_run(tmp_path, HYBRID, name="other", seed=1)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    before = snapshot(out)
    assert main(["export", str(other), "--out", str(out)]) == 1
    assert "pass --force" in capsys.readouterr().err and snapshot(out) == before
    assert main(["export", str(other), "--out", str(out), "--force"]) == 0
    assert read_export_config(out)["hybridctl"]["run"] == "other" and snapshot(out) != before
    # a folder with anything else in it is never replaced, --force or not
    (out / "notes.txt").write_text("mine")
    kept = snapshot(tmp_path)
    assert main(["export", str(run), "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an export folder" in err and snapshot(tmp_path) == kept
    assert main(["export", str(run), "--out", str(run), "--force"]) == 1  # the run itself
    assert snapshot(tmp_path) == kept


@pytest.mark.parametrize("overrides,args,words", [
    (['model.pattern="LD"'], [], "sparse attention"),
    (["model.moe.n_experts=4"], [], "mixture-of-experts"),
    (HYBRID, ["--format", "gguf"], "--format 'gguf' is unknown"),
    (HYBRID, ["--checkpoint", "step_000009"], "no checkpoint 'step_000009'"),
    (HYBRID, ["--check"], "CUDA"),
    (HYBRID, ["--json", "x.json"], "--json writes the figures of --check"),
])
def test_bad_input_is_one_line_and_writes_nothing(overrides, args, words, tmp_path, capsys):
    if "--check" in args and torch.cuda.is_available():
        pytest.skip("on a CUDA machine --check runs")
    run = saved_run(tmp_path, overrides)
    before = snapshot(tmp_path)
    code = main(["export", str(run), "--out", str(tmp_path / "hf"), *args])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert snapshot(tmp_path) == before and not (tmp_path / "hf").exists()


def test_a_run_without_a_checkpoint_and_other_targets(tmp_path, capsys):
    cfg = micro_config(HYBRID)
    run = RunDir(tmp_path / "fresh")
    run.create(cfg)
    run.release_lock()
    cases = [
        (["export", str(run.path), "--out", str(tmp_path / "hf")], "has no checkpoint yet"),
        (["export", str(tmp_path), "--out", str(tmp_path / "hf")], "neither a run folder"),
        (["export", str(run.path)], "give --out DIR"),
        (["export", str(run.path), "--check"], "CUDA" if not torch.cuda.is_available() else "not an export folder"),
    ]
    before = snapshot(tmp_path)
    for argv, words in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0 and err.count("\n") == 1 and words in err, (argv, err)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# Tokenizer files

TEXT = "héllo wörld\n  def f(x):\treturn x  # 🙂"


def exported_tokenizer(tmp_path: Path, overrides: list[str]):
    from tokenizers import Tokenizer

    from hybridctl.core.lab.hf_tokenizer import tokenizer_files

    files, eos_id = tokenizer_files(micro_config(overrides))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return Tokenizer.from_file(str(tmp_path / "tokenizer.json")), eos_id


def test_bytes_tokenizer_file_encodes_as_the_run_did(tmp_path):
    from hybridctl.core.data.tokenizer import ByteTokenizer

    tokenizer, eos_id = exported_tokenizer(tmp_path, [])
    assert eos_id == 256 and tokenizer.token_to_id("<|endoftext|>") == 256 and tokenizer.get_vocab_size() == 257
    assert tokenizer.encode(TEXT).ids == ByteTokenizer().encode(TEXT)
    assert tokenizer.decode(ByteTokenizer().encode(TEXT)) == TEXT
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(TEXT)["input_ids"] == ByteTokenizer().encode(TEXT)  # no BOS or EOS added
    assert hf.eos_token_id == 256 and hf.bos_token_id is None and hf.decode(hf(TEXT)["input_ids"]) == TEXT


def test_subword_tokenizer_file_drops_the_template(tmp_path):
    """A tokenizer.json with a BOS template: hybridctl encodes without it, and so does the export."""
    from tokenizers import processors

    from hybridctl.core.data.subword import load_tokenizer, train_bpe

    trained = train_bpe(["def f(x): return x\n" * 50, TEXT * 20], 300)
    trained.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    source = tmp_path / "source" / "tokenizer.json"
    source.parent.mkdir()
    trained.save(str(source))
    out = tmp_path / "out"
    out.mkdir()
    tokenizer, eos_id = exported_tokenizer(out, [f"data.tokenizer={json.dumps(str(source))}"])
    run_tokenizer = load_tokenizer(str(source))
    assert eos_id == run_tokenizer.eos_id
    assert tokenizer.encode(TEXT).ids == run_tokenizer.encode(TEXT)
    assert trained.encode(TEXT).ids[0] == 0 and tokenizer.encode(TEXT).ids[0] != 0  # the template, gone


def test_synthetic_tokenizer_file(tmp_path):
    tokenizer, eos_id = exported_tokenizer(tmp_path, ['data.dataset="synthetic:mqar:pairs=4,vocab=64"'])
    assert eos_id == 0 and tokenizer.encode("3 17 63").ids == [3, 17, 63]
    assert tokenizer.decode([3, 17, 63]) == "3 17 63"


# ---------------------------------------------------------------------------------------------------------
# GPU: fla's model from the folder against hybridctl's


@pytest.mark.gpu
def test_fla_model_from_the_export_matches_hybridctl(tmp_path):
    """deltanet, hybrid_sparse and transformer at 256d x 8 layers through benchmarks/export_check.py, which runs
    `hybridctl export --check` on each (one process each, so Triton's fp32 products are IEEE from the start)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("TRITON_CACHE_DIR", "/tmp/triton-cache")
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "export_check.py"), "--work", str(tmp_path / "w"),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    figures = json.loads(out.read_text())
    assert set(figures) == {"deltanet", "hybrid_sparse", "transformer"}
    for arch, result in figures.items():
        assert "problems" in result, (arch, result)
        print(f"{arch}: fla fp32 max {result['fla_fp32']['max_abs']:.2e} mean {result['fla_fp32']['mean_abs']:.2e}; "
              f"fla bf16 max {result['fla_bf16']['max_abs']:.2e} mean {result['fla_bf16']['mean_abs']:.2e}; "
              f"hybridctl bf16 mean {result['hybridctl_bf16']['mean_abs']:.2e}; logit std {result['logit_std']:.3g}; "
              f"greedy same: {result['greedy']['fla_vs_hybridctl']['same']}, cached: {result['greedy']['cached_vs_hybridctl']['same']}")
        assert result["problems"] == [], (arch, result["problems"])
    assert proc.returncode == 0
    shutil.rmtree(tmp_path / "w", ignore_errors=True)
