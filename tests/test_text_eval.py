"""`hybridctl eval`: scores on a text against a hand computation over the same windows, the stored result, compare's
column, and one-line refusals that write nothing."""

import json
import math

import pytest
import torch

from conftest import micro_config
from hybridctl.cli import main
from hybridctl.core.lab.text_eval import default_name
from hybridctl.core.model.hybrid_lm import build_model
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training.runs import RunDir

SEQ_LEN = 16
# Paragraphs as the .txt reader cuts them: at an empty line and at a whitespace-only one.
PARAGRAPHS = ["The quick brown fox jumps over the lazy dog.\nA second line of the same paragraph.",
              "Pack my box with five dozen liquor jugs; then sphinx of black quartz, judge my vow.",
              "Héllo wörld: bytes beyond ASCII count as two tokens each."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A run folder whose best/ holds a randomly initialised micro model (wide init: predictions far from tied)."""
    cfg = micro_config([f"train.seq_len={SEQ_LEN}", "model.vocab_size=257", "model.init_std=0.3"])
    root = tmp_path_factory.mktemp("text-eval")
    run = RunDir(root / "runs" / "micro")
    run.create(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    ckpt.save_checkpoint(run.best_dir, model, None, {"step": 4})
    run.release_lock()
    text = root / "sample.txt"
    text.write_text(f"{PARAGRAPHS[0]}\n\n{PARAGRAPHS[1]}\n   \n{PARAGRAPHS[2]}\n")
    return run, model, text


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def byte_tokens(paragraphs):
    """Byte tokens with the end-of-document id (256) after each paragraph."""
    return [t for p in paragraphs for t in [*p.encode("utf-8"), 256]]


def hand_scores(model, tokens, seq_len):
    """Windows of seq_len + 1 tokens starting every seq_len tokens, one plain forward pass per window."""
    windows = (len(tokens) - 1) // seq_len
    loss_sum, correct = 0.0, 0
    for k in range(windows):
        chunk = torch.tensor(tokens[k * seq_len: k * seq_len + seq_len + 1])
        with torch.no_grad():
            out = model(chunk[None, :-1], chunk[None, 1:], return_logits=True)
        loss_sum += out.ce_loss.double().item() * seq_len
        correct += int((out.logits[0].argmax(-1) == chunk[1:]).sum())
    scored = windows * seq_len
    return {"loss": loss_sum / scored, "acc": correct / scored, "ppl": math.exp(loss_sum / scored),
            "tokens": len(tokens), "windows": windows, "scored_tokens": scored, "tail_tokens": len(tokens) - 1 - scored}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_matches_a_hand_computation_over_the_same_windows(scored_run, capsys, batch_size):
    run, model, text = scored_run
    name = f"sample-b{batch_size}"
    code, out, err = cli(capsys, "eval", run.path, "--data", text, "--name", name, "--batch-size", batch_size, "--json")
    assert code == 0, err
    result = json.loads(out)
    expected = hand_scores(model, byte_tokens(PARAGRAPHS), SEQ_LEN)
    assert expected["tail_tokens"] > 0 and expected["windows"] > 3 * batch_size // 2  # a tail, and several batches
    for key in ("loss", "acc", "ppl"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6), key
    for key in ("tokens", "windows", "scored_tokens", "tail_tokens"):
        assert result[key] == expected[key], key
    assert 0 < result["acc"] < 1
    assert (result["documents"], result["seq_len"], result["checkpoint"], result["checkpoint_step"]) == (3, SEQ_LEN, "best", 4)
    saved = json.loads((run.path / "eval" / f"{name}.json").read_text())
    assert saved == {k: v for k, v in result.items() if k != "path"}


def test_max_tokens_scores_the_first_tokens_only(scored_run, capsys):
    run, model, text = scored_run
    code, out, err = cli(capsys, "eval", run.path, "--data", text, "--name", "first", "--max-tokens", 60, "--json")
    assert code == 0, err
    result = json.loads(out)
    tokens = byte_tokens(PARAGRAPHS)[:60]
    assert 256 not in tokens  # cut inside the first paragraph
    expected = hand_scores(model, tokens, SEQ_LEN)
    assert (result["tokens"], result["windows"], result["documents"]) == (60, 3, 1)
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_result_is_kept_without_force_and_shown_by_compare(scored_run, capsys, tmp_path):
    run, _, text = scored_run
    code, out, err = cli(capsys, "eval", run.path, "--data", text, "--name", "kept", "--json")
    assert code == 0, err
    first = json.loads(out)
    path = run.path / "eval" / "kept.json"
    before = path.read_text()
    code, _, err = cli(capsys, "eval", run.path, "--data", text, "--name", "kept")
    assert code == 1 and "already exists; pass --force" in err and len(err.strip().splitlines()) == 1
    assert path.read_text() == before
    code, out, err = cli(capsys, "eval", run.path, "--data", text, "--name", "kept", "--force")
    assert code == 0 and "saved" in out and "perplexity" in out
    table = tmp_path / "compare.md"  # the table compare prints, unwrapped
    code, out, err = cli(capsys, "compare", run.path, "--no-plots", "--markdown", table)
    assert code == 0, err
    header, _, row = table.read_text().strip().splitlines()[-3:]
    cells = dict(zip(header.strip("|").split(" | "), row.strip("|").split(" | ")))
    assert cells["kept ppl"].strip() == f"{first['ppl']:.2f}"


@pytest.mark.parametrize("data, message", [
    ("{root}/data/wikitext-2/test.txt", "error: --data '{data}': no such file or folder; give a path to .txt, .jsonl or "
                                        ".parquet files or a glob like 'data/*.txt'"),
    ("{root}/data/*.txt", "error: --data '{data}' matches no .txt, .jsonl or .parquet files; check the path or glob"),
    ("builtin:nope", "error: --data 'builtin:nope' is not a built-in corpus; choose one of: builtin:stdlib, builtin:python"),
])
def test_missing_text_is_reported_before_an_existing_result(scored_run, tmp_path, capsys, data, message):
    """The text --data names is checked before the result file it would go to: a missing text is the problem to
    hear about, not the result of an earlier eval of another text under the same name."""
    run, _, _ = scored_run
    data = data.format(root=tmp_path)
    done = run.path / "eval" / "wikitext-2-test.json"
    done.parent.mkdir(exist_ok=True)
    done.write_text("{}")
    try:
        code, out, err = cli(capsys, "eval", run.path, "--data", data, "--name", "wikitext-2-test")
        assert code == 1 and out == ""
        assert err.strip() == message.format(data=data)
        assert done.read_text() == "{}"
    finally:
        done.unlink()


def test_a_device_that_is_no_device_is_one_line(scored_run, capsys):
    run, _, text = scored_run
    code, out, err = cli(capsys, "eval", run.path, "--data", text, "--device", "gpu")
    assert code != 0 and out == "" and err.strip() == "error: --device must be auto, cpu, cuda or cuda:N, got 'gpu'"


def test_default_name_follows_the_data_spec(tmp_path):
    assert default_name("data/wikitext-2/test.txt") == "wikitext-2-test"
    assert default_name("data/*.jsonl") == "data"
    assert default_name("notes.txt") == "notes"
    assert default_name("Salesforce/wikitext", "wikitext-2-raw-v1", "test") == "Salesforce-wikitext-wikitext-2-raw-v1-test"
    assert default_name("builtin:stdlib") == "builtin-stdlib"


@pytest.mark.parametrize("case, needle", [
    ("short_text", "fewer than one window of train.seq_len + 1 = 17"),
    ("missing_file", "--data '{missing}': no such file or folder"),
    ("no_checkpoint", "has no checkpoint yet"),
    ("not_a_run", "neither a run folder"),
    ("bad_name", "must be a plain file name"),
    ("synthetic_data", "is a generated task, not text"),
])
def test_bad_input_is_one_line_and_writes_nothing(scored_run, tmp_path, capsys, case, needle):
    run, _, text = scored_run
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    missing = tmp_path / "nope.txt"
    bare = RunDir(tmp_path / "bare")
    bare.create(micro_config(["model.vocab_size=257"]))
    bare.release_lock()
    target, data, extra = {
        "short_text": (run.path, short, []),
        "missing_file": (run.path, missing, []),
        "no_checkpoint": (bare.path, text, []),
        "not_a_run": (tmp_path, text, []),
        "bad_name": (run.path, text, ["--name", "../x"]),
        "synthetic_data": (run.path, "synthetic:mqar", []),
    }[case]
    before = sorted(p.name for p in (run.path / "eval").glob("*")) if (run.path / "eval").exists() else []
    code, out, err = cli(capsys, "eval", target, "--data", data, *extra)
    assert code == 1 and out == ""
    assert needle.format(missing=missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    after = sorted(p.name for p in (run.path / "eval").glob("*")) if (run.path / "eval").exists() else []
    assert after == before
    assert not (bare.path / "eval").exists() and not (tmp_path / "eval").exists()


@pytest.mark.gpu
def test_eval_on_cuda_agrees_with_cpu(tmp_path, capsys):
    """The CUDA path (fla kernels, bf16 autocast, as training evaluates) against the PyTorch code in fp32."""
    cfg = micro_config(["train.seq_len=128", "model.vocab_size=257", "model.d_model=256", "model.n_heads=4",
                        "model.gdn.num_heads=2", "model.gdn.head_dim=128", "model.gdn.chunk_size=64"])
    run = RunDir(tmp_path / "runs" / "cuda")
    run.create(cfg)
    torch.manual_seed(0)
    ckpt.save_checkpoint(run.best_dir, build_model(cfg.model), None, {"step": 1})
    run.release_lock()
    text = tmp_path / "long.txt"
    text.write_text("\n\n".join(PARAGRAPHS * 20) + "\n")
    results = {}
    for device in ("cpu", "cuda"):
        code, out, err = cli(capsys, "eval", run.path, "--data", text, "--device", device, "--name", device, "--json")
        assert code == 0, err
        results[device] = json.loads(out)
    cpu, gpu = results["cpu"], results["cuda"]
    assert (gpu["windows"], gpu["scored_tokens"], gpu["tokens"]) == (cpu["windows"], cpu["scored_tokens"], cpu["tokens"])
    assert gpu["device"] != "cpu"
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-2)
    assert gpu["acc"] == pytest.approx(cpu["acc"], abs=0.02)
