"""Benchmarks on trained and untrained models: ARC-Challenge accuracy and training-step speed.

ARC-Challenge is scored the way lm-evaluation-harness scores its `arc_challenge` task (zero-shot):
  context       "Question: {question}\\nAnswer:"
  continuations " {choice text}" for each choice
  acc           the choice with the highest summed log-likelihood of its continuation tokens is the gold one
  acc_norm      the same after dividing each log-likelihood by the length of the choice text in characters
                (lm-eval divides by len(choice), the text without the leading space)
  stderr        of a mean of 0/1 scores: sample standard deviation (n - 1) / sqrt(n)
The continuation's tokens are those of encode(context + continuation) past the tokens of encode(context), and a
pair longer than the model's context keeps its last max_len + 1 tokens, both as lm-eval does.

Speed counts model FLOPs per token, for a sequence of T tokens (d = d_model, V_pad = embedding rows):
  forward = 2 * N_matmul                    every Linear weight inside the blocks (a multiply-add per
                                            weight per token); MoE layers count top_k / n_experts of theirs
          + 2 * V_pad * d                   the output head (tied to the embedding, still a matmul)
          + per F layer: 4 * d * k(T)       QK^T and AV over k(T) keys per query; causal attention counts only the
                                            keys a query sees, k(T) = (T + 1) / 2, or with a window W < T,
                                            k(T) = (W (W + 1) / 2 + (T - W) W) / T; this is half of the
                                            convention that counts all T keys
          + per D layer: 4 * d * min(topk, k(T)) + 2 * indexer_heads * indexer_dim * k(T)   (an estimate)
          + per L layer, Gated DeltaNet in chunks of C (H heads, key dim K, value dim Vh), per chunk and head:
                6 C^2 K + 4 C^2 Vh + 6 C K Vh   (K K^T, the two WY products, Q K^T, the intra-chunk A V,
                                                 W S, Q S and the state update K^T V)
              + 2 C^3 / 3                        (the unit-triangular solve, C^3 / 3 multiply-adds)
            divided by C tokens, with T padded up to whole chunks
  train   = 3 * forward                     (backward = 2 * forward; no recomputation counted)
MFU = tok/s * FLOPs per token / the GPU's dense bf16 peak. Norms, activations, rotary embedding, gates, the
Gated DeltaNet short convolution (4 multiply-adds per channel) and the loss are elementwise work and not counted.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl.core import checkpoint as ckpt
from hybridctl.core import distributed as dist
from hybridctl.core import hub
from hybridctl.core.config import Config, ModelConfig, load_config
from hybridctl.core.data import Tokenizer, get_tokenizer
from hybridctl.core.errors import ConfigError, DataError, HybridctlError, RunError
from hybridctl.core.model import HybridLM, build_model, pick_loss, uses_moe
from hybridctl.core.runs import RunDir, ensure_new_file, write_json_atomic
from hybridctl.core.trainer import (autocast_for, build_optimizer, compile_model, forward_backward, micro_batch_size,
                                    optimizer_step, resolve_device, wrap_for_training)

Progress = Callable[[int, int], None]  # (done, total)

BENCH_DIR = "bench"


# ---------------------------------------------------------------------------------------------------------
# Loading a trained model


@dataclass
class TrainedModel:
    model: HybridLM
    cfg: Config
    tokenizer: Tokenizer
    run: RunDir
    checkpoint: Path
    step: int


def locate_checkpoint(path: Path, which: str | None = None) -> tuple[RunDir, Path]:
    """A run folder (best/ if it has one, else the latest step, or `which`) or a checkpoint folder inside one."""
    path = Path(path)
    run = RunDir(path)
    if run.exists():
        if which is None:
            which = "best" if ckpt.is_complete(run.best_dir) else "latest"
        return run, run.resolve_checkpoint(which)
    if ckpt.is_complete(path):
        if which is not None:
            raise RunError(f"{path} is a checkpoint folder; pass --checkpoint only with a run folder")
        run = RunDir(path.parent.parent if path.parent.name == "checkpoints" else path.parent)
        if not run.exists():
            raise RunError(f"checkpoint {path} is not inside a run folder (no config.toml above it); pass the run folder made by `hybridctl train`")
        return run, path
    raise RunError(f"{path} is neither a run folder (config.toml) nor a checkpoint (state.json); pass a folder made by `hybridctl train`")


def load_trained_model(path: Path, which: str | None = None, device: torch.device | str = "cpu") -> TrainedModel:
    run, checkpoint = locate_checkpoint(path, which)
    cfg = run.load_config()
    if cfg.model.vocab_size <= 0:
        raise RunError(f"{run.config_path} has no model.vocab_size (the run never started training); train it first")
    tokenizer = get_tokenizer(cfg.data.tokenizer, cfg.data)
    model = build_model(cfg.model)
    state = ckpt.load_checkpoint(checkpoint, model)
    model.to(device).eval()
    return TrainedModel(model, cfg, tokenizer, run, checkpoint, int(state.get("step", 0)))


# ---------------------------------------------------------------------------------------------------------
# ARC-Challenge data

ARC_HUB, ARC_CONFIG, ARC_SPLITS = "allenai/ai2_arc", "ARC-Challenge", ("test", "validation")


@dataclass
class ArcQuestion:
    id: str
    question: str
    choices: list[str]
    gold: int  # index into choices


def parse_arc_record(record: Any, where: str) -> ArcQuestion:
    """One question in the hub's schema: id, question, choices {text: [...], label: [...]}, answerKey."""
    fix = "each line needs id, question, choices {text: [...], label: [...]} and answerKey"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object; {fix}")
    choices = record.get("choices")
    if not isinstance(record.get("question"), str) or not isinstance(choices, dict):
        raise DataError(f"{where}: missing question or choices; {fix}")
    texts, labels = list(choices.get("text") or []), list(choices.get("label") or [])
    if len(texts) < 2 or len(texts) != len(labels):
        raise DataError(f"{where}: choices need at least two texts and one label per text; {fix}")
    key = str(record.get("answerKey", ""))
    labels = [str(label) for label in labels]
    if key not in labels:
        raise DataError(f"{where}: answerKey '{key}' is not one of the labels {labels}; {fix}")
    return ArcQuestion(str(record.get("id", where)), record["question"], [str(t) for t in texts], labels.index(key))


def read_arc_file(path: Path) -> list[ArcQuestion]:
    """Questions from a local JSONL or parquet file in the hub's schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ARC data file {path} does not exist; pass --data with a JSONL or parquet file in the ai2_arc schema")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"cannot read {path} as parquet ({type(e).__name__}); pass a parquet or JSONL file") from None
        return [parse_arc_record(r, f"{path} row {i + 1}") for i, r in enumerate(records)]
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {number} is not valid JSON; write one JSON object per line") from None
        questions.append(parse_arc_record(record, f"{path} line {number}"))
    if not questions:
        raise DataError(f"{path} holds no questions; write one JSON object per line in the ai2_arc schema")
    return questions


def load_arc(split: str = "test", data_file: Path | None = None) -> list[ArcQuestion]:
    """ARC-Challenge from a local file, or from the hub through `datasets` (cached by it after the first time)."""
    if split not in ARC_SPLITS:
        raise ConfigError(f"unknown ARC split '{split}'; use one of: {', '.join(ARC_SPLITS)}")
    if data_file is not None:
        return read_arc_file(data_file)
    # probe first, so offline mode is on before `datasets` reads it when the hub cannot be asked
    offline = hub.offline_reason()
    label, fix = f"{ARC_HUB} ({ARC_CONFIG}, {split})", "pass --data FILE with a local JSONL or parquet copy"
    try:
        import datasets

        rows = datasets.load_dataset(ARC_HUB, ARC_CONFIG, split=split)
    except Exception as e:
        if offline and isinstance(e, OSError):  # ConnectionError, LocalEntryNotFoundError: not in the cache
            raise DataError(f"cannot load {label} from the Hugging Face hub: {offline} and it is not in the local cache; "
                            f"download it once where the hub is reachable, or {fix}") from None
        raise DataError(f"cannot load {label} from the Hugging Face hub: {hub.one_line(e, 160)}; {fix}") from None
    return [parse_arc_record(r, f"{ARC_HUB} {split} row {i + 1}") for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------------
# Log-likelihood scoring


def arc_context(q: ArcQuestion) -> str:
    return f"Question: {q.question}\nAnswer:"


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens; the continuation is what encoding both adds after the context's tokens,
    so a merge across the boundary is scored as part of the continuation (lm-eval's rule)."""
    whole = list(tokenizer.encode(context + continuation))
    context_ids = list(tokenizer.encode(context))
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def continuation_logliks(model: HybridLM, requests: list[tuple[list[int], list[int]]], device: torch.device,
                         dtype: str = "auto", batch_size: int = 32, max_len: int | None = None,
                         progress: Progress | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context, many (context, continuation) pairs per
    forward pass. Rows are padded on the right, which a causal model never sees from earlier positions."""
    rows, cont_lens = [], []
    for i, (context, continuation) in enumerate(requests):
        whole = list(context) + list(continuation)
        if max_len:
            whole = whole[-(max_len + 1):]
        if not continuation or len(continuation) > len(whole) - 1:
            raise DataError(f"request {i}: the continuation has {len(continuation)} tokens, which does not fit a context of {max_len}; raise --max-len")
        rows.append(whole)
        cont_lens.append(len(continuation))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first: a too-large batch fails at once
    result = [0.0] * len(rows)
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(rows[i]) for i in batch) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        row_of, pos_of, targets = [], [], []
        for b, i in enumerate(batch):
            n, k = len(rows[i]) - 1, cont_lens[i]
            x[b, :n] = torch.tensor(rows[i][:-1])
            row_of += [b] * k
            pos_of += range(n - k, n)
            targets += rows[i][-k:]
        with autocast_for(device, dtype):
            h, _ = model.hidden_states(x.to(device))
            # the head only at continuation positions: [tokens, vocab] instead of [batch, width, vocab]
            logits = model.lm_head(h[torch.tensor(row_of, device=device), torch.tensor(pos_of, device=device)])
        logp = F.log_softmax(logits[:, : model.vocab_size].float(), dim=-1)
        token_ll = logp.gather(1, torch.tensor(targets, device=device)[:, None]).squeeze(1)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
            0, torch.tensor(row_of, device=device), token_ll.double())
        for b, i in enumerate(batch):
            result[i] = float(sums[b])
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    return result


def mean_stderr(values: list[float]) -> float | None:
    """Standard error of a mean: sample standard deviation (n - 1) / sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, like np.argmax


def score_arc(model: HybridLM, tokenizer: Tokenizer, questions: list[ArcQuestion], device: torch.device,
              dtype: str = "auto", batch_size: int = 32, max_len: int | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """acc and acc_norm with their standard errors, plus each question's log-likelihoods and picks."""
    if not questions:
        raise DataError("no ARC questions to score; check --limit and the data file")
    requests, owners = [], []
    for qi, q in enumerate(questions):
        context = arc_context(q)
        for text in q.choices:
            requests.append(encode_pair(tokenizer, context, f" {text}"))
            owners.append(qi)
    logliks = continuation_logliks(model, requests, device, dtype, batch_size, max_len, progress)
    per_question: list[list[float]] = [[] for _ in questions]
    for qi, ll in zip(owners, logliks):
        per_question[qi].append(ll)
    details, acc, acc_norm = [], [], []
    for q, lls in zip(questions, per_question):
        normed = [ll / max(len(text), 1) for ll, text in zip(lls, q.choices)]
        pred, pred_norm = argmax(lls), argmax(normed)
        acc.append(float(pred == q.gold))
        acc_norm.append(float(pred_norm == q.gold))
        details.append({"id": q.id, "logliks": lls, "pred": pred, "pred_norm": pred_norm, "gold": q.gold})
    n = len(questions)
    return {
        "task": "arc_challenge",
        "n": n,
        "acc": sum(acc) / n,
        "acc_stderr": mean_stderr(acc),
        "acc_norm": sum(acc_norm) / n,
        "acc_norm_stderr": mean_stderr(acc_norm),
        "chance": sum(1 / len(q.choices) for q in questions) / n,
        "num_fewshot": 0,
        "questions": details,
    }


def bench_arc(target: Path, which: str | None = None, split: str = "test", data: Path | None = None,
              limit: int | None = None, batch_size: int = 32, max_len: int | None = None, device: str = "auto",
              force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Score a run's checkpoint on ARC-Challenge and write RUN/bench/arc.json; returns what was written and its
    path. Cheap checks (paths, an existing result, the data) come before the model is loaded."""
    if batch_size < 1 or (limit is not None and limit < 1) or (max_len is not None and max_len < 1):
        raise ConfigError("--batch-size, --limit and --max-len must be positive integers")
    run, checkpoint = locate_checkpoint(target, which)
    ensure_new_file(bench_result_path(run, "arc"), force)
    questions = load_arc(split, data)[:limit]
    torch_device = resolve_device(device)
    trained = load_trained_model(checkpoint, device=torch_device)
    max_len = max_len or trained.cfg.train.seq_len
    scores = score_arc(trained.model, trained.tokenizer, questions, torch_device, trained.cfg.train.dtype,
                       batch_size, max_len, progress)
    result = {
        "task": scores["task"], "split": split,
        **{k: scores[k] for k in ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance", "num_fewshot")},
        "run": run.name, "checkpoint": checkpoint.name, "checkpoint_step": trained.step,
        "data": str(data) if data else f"{ARC_HUB}:{ARC_CONFIG}", "limit": limit, "max_len": max_len,
        "device": device_name(torch_device),
    }
    path = write_bench_result(run, "arc", result, force)
    return {**result, "path": str(path)}


def bench_result_path(run: RunDir, task: str) -> Path:
    return run.path / BENCH_DIR / f"{task}.json"


def write_json(path: Path, data: dict[str, Any], force: bool = False) -> Path:
    ensure_new_file(path, force)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(path), data)
    return Path(path)


def write_bench_result(run: RunDir, task: str, result: dict[str, Any], force: bool = False) -> Path:
    return write_json(bench_result_path(run, task), result, force)


def read_bench_result(run: RunDir, task: str) -> dict[str, Any] | None:
    path = bench_result_path(run, task)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------------------
# FLOPs (the formula is in the module docstring)

# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name (first match wins).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_bf16_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def keys_per_query(seq_len: int, window: int = 0) -> float:
    """Mean number of keys a causal query attends to (itself included)."""
    T = seq_len
    if window and window < T:
        return (window * (window + 1) / 2 + (T - window) * window) / T
    return (T + 1) / 2


def gdn_flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs of one Gated DeltaNet layer's chunked recurrence per token: (matmuls, triangular solve)."""
    g = cfg.gdn
    C, K, V, H = g.chunk_size, g.head_dim, int(g.head_dim * g.expand_v), g.num_heads
    chunks_per_token = math.ceil(seq_len / C) / seq_len
    matmuls = H * (6 * C * C * K + 4 * C * C * V + 6 * C * K * V) * chunks_per_token
    solve = H * (2 * C**3 / 3) * chunks_per_token
    return matmuls, solve


def matmul_params(model: HybridLM) -> float:
    """Weights of every Linear in the blocks; MoE layers count only the share each token uses."""
    total = 0.0
    for layer, block in enumerate(model.blocks):
        for part in (block.mixer, block.mlp):
            n = sum(m.weight.numel() for m in part.modules() if isinstance(m, nn.Linear))
            if part is block.mlp and uses_moe(layer, model.cfg):
                n *= model.cfg.moe.top_k / model.cfg.moe.n_experts
            total += n
    return total


def flops_per_token(model: HybridLM, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by part, their sum `forward`, and `train` = 3 * forward."""
    cfg = model.cfg
    d, keys = cfg.d_model, keys_per_query(seq_len, cfg.attention.window)
    kinds = cfg.layer_types()
    gdn, solve = gdn_flops_per_token(cfg, seq_len)
    parts = {
        "dense": 2 * matmul_params(model),
        "head": 2 * model.lm_head.weight.numel(),
        "attention": kinds.count("F") * 4 * d * keys,
        "sparse_attention": kinds.count("D") * (4 * d * min(cfg.dsa.topk, keys) + 2 * cfg.dsa.indexer_heads * cfg.dsa.indexer_dim * keys),
        "gdn": kinds.count("L") * gdn,
        "gdn_solve": kinds.count("L") * solve,
    }
    forward = sum(parts.values())
    return {**parts, "forward": forward, "train": 3 * forward}


# ---------------------------------------------------------------------------------------------------------
# Speed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process so far (all architectures measured before included)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


DEFAULT_VOCAB = 49152  # the study's tokenizer (SmolLM), used when a preset's tokenizer is not known offline


def speed_configs(presets: list[str], patterns: list[str], overrides: list[str], vocab: int | None = None) -> list[Config]:
    """One config per architecture: each preset, or one preset with each layer pattern (L / F / D letters).

    The vocabulary is `vocab` if given, else the config's model.vocab_size, else the byte tokenizer's size for
    `bytes`, else DEFAULT_VOCAB, so no tokenizer or data is loaded."""
    if vocab is not None and vocab < 2:
        raise ConfigError(f"--vocab must be at least 2, got {vocab}")
    if patterns and len(presets) > 1:
        raise ConfigError(f"--patterns applies to one preset, got {len(presets)} ({', '.join(presets)}); pass a single --preset")
    configs = []
    for preset in presets:
        for pattern in patterns or [None]:
            extra = [f'model.pattern="{pattern}"', f"model.n_layers={len(pattern)}"] if pattern else []
            cfg = load_config(preset, list(overrides) + extra)
            if pattern:
                cfg.name = pattern
            if vocab is not None:
                cfg.model.vocab_size = vocab
            elif cfg.model.vocab_size == 0:
                cfg.model.vocab_size = get_tokenizer("bytes").vocab_size if cfg.data.tokenizer == "bytes" else DEFAULT_VOCAB
            configs.append(cfg)
    return configs


def measure_speed(cfg: Config, seq_len: int, batch_size: int, device: torch.device, steps: int = 10,
                  warmup: int = 3, forward_only: bool = False) -> dict[str, Any]:
    """Time `steps` training steps (or forward passes) of the config's model on random tokens after `warmup`
    untimed ones; a shape that does not fit in GPU memory gives a row with error "out of memory"."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seq_len, cfg.train.batch_size = seq_len, batch_size
    row: dict[str, Any] = {"name": cfg.name, "layer_types": "".join(cfg.model.layer_types()), "seq_len": seq_len,
                           "batch_size": batch_size, "tokens_per_step": seq_len * batch_size,
                           "mode": "forward" if forward_only else "train", "steps": steps, "warmup": warmup}
    try:
        row.update(_timed_steps(cfg, device, steps, warmup, forward_only), error=None)
    except torch.OutOfMemoryError:
        if dist.active():  # no row: the other processes may be waiting in a collective, so all of them stop
            raise dist.abandon_group(ConfigError(
                f"out of memory in process {dist.rank()} at seq {seq_len}, batch {batch_size} over {dist.world_size()} "
                "processes; lower --batch or --seq")) from None
        row.update(tok_s=None, mfu=None, error="out of memory")
    gc.collect()  # the model and optimizer are gone with _timed_steps' frame; give their memory back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def benchmark_step(cfg: Config, device: torch.device, forward_only: bool = False, ddp: bool | None = None
                   ) -> tuple[HybridLM, Callable[[], None]]:
    """The config's model on random tokens and one step of it: the trainer's training step (forward and loss under
    its autocast per micro-batch, backward, gradient clipping, AdamW step skipped on the device if the loss or
    gradients are not finite: no host sync, as in the trainer, which reads those flags at log steps), or an
    inference forward pass. Under several processes each takes its share of the global batch, as in training,
    and trains under DDP (`ddp` forces the wrapper, e.g. for a one-process group). Used by `bench speed` and
    benchmarks/profile_step.py."""
    t = cfg.train
    world = dist.world_size()
    micro = micro_batch_size(cfg, world)
    torch.manual_seed(t.seed)  # the same weights in every process
    model = build_model(cfg.model).to(device)
    model.loss_impl = pick_loss(t.loss, device.type)
    generator = torch.Generator(device).manual_seed(t.seed + dist.rank())  # each process its own tokens
    tokens = torch.randint(0, cfg.model.vocab_size, (t.batch_size // world, t.seq_len + 1), device=device,
                           generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = autocast_for(device, t.dtype)
    compiled = t.compile and device.type == "cuda"
    if forward_only:
        model.eval()
        step_model = compile_model(model) if compiled else model

        def step():
            with torch.inference_mode(), autocast:
                step_model(x)
    else:
        step_model, no_sync = wrap_for_training(model, device, compiled, dist.active() if ddp is None else ddp)
        optimizer = build_optimizer(model, cfg, device)
        model.train()

        def step():
            loss = forward_backward(step_model, x, y, micro, t.grad_accum, autocast, no_sync=no_sync)
            optimizer_step(model, optimizer, loss, t.grad_clip)

    return model, step


def _timed_steps(cfg: Config, device: torch.device, steps: int, warmup: int, forward_only: bool) -> dict[str, Any]:
    """Times the steps of every process together: each starts after all have warmed up, and the slowest one's
    time counts. tok/s is for the global batch; MFU is per GPU, and peak memory the largest of any process."""
    t = cfg.train
    world = dist.world_size()
    model, step = benchmark_step(cfg, device, forward_only)
    flops = flops_per_token(model, t.seq_len)
    flops_per_step_token = flops["forward" if forward_only else "train"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rss = peak_rss_bytes() if device.type == "cpu" else None
    seconds = dist.max_over_ranks(seconds)
    peak_memory, rss = (None if v is None else int(dist.max_over_ranks(v)) for v in (peak_memory, rss))
    tok_s = steps * t.batch_size * t.seq_len / seconds
    achieved = tok_s * flops_per_step_token
    peak = peak_bf16_tflops(device_name(device)) if device.type == "cuda" else None
    return {
        "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
        "flops_per_token": flops_per_step_token, "flops_breakdown": flops,
        "seconds": seconds, "step_ms": 1000 * seconds / steps, "tok_s": tok_s, "tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12 * world) if peak else None,
        "peak_memory_bytes": peak_memory, "rss_bytes": rss,
    }


def speed_shapes(cfg: Config, seqs: list[int], batches: list[int], tokens_per_step: int | None) -> list[tuple[int, int]]:
    """(seq_len, batch_size) pairs to measure: each seq with each batch, or with batch = tokens_per_step // seq."""
    if tokens_per_step is not None and batches:
        raise ConfigError("pass either --batch or --tokens-per-step, not both")
    shapes = []
    for seq in seqs or [cfg.train.seq_len]:
        if tokens_per_step is not None:
            if tokens_per_step < seq:
                raise ConfigError(f"--tokens-per-step {tokens_per_step} is less than one sequence of {seq}; raise it or drop that --seq")
            shapes.append((seq, tokens_per_step // seq))
        else:
            shapes += [(seq, batch) for batch in batches or [cfg.train.batch_size]]
    return shapes


def check_speed_counts(steps: int, warmup: int, seqs: list[int], batches: list[int], tokens_per_step: int | None) -> None:
    if steps < 1 or warmup < 0 or any(v < 1 for v in [*seqs, *batches, tokens_per_step or 1]):
        raise ConfigError("--steps, --seq, --batch and --tokens-per-step must be >= 1 and --warmup >= 0")


def speed_plan(configs: list[Config], seqs: list[int], batches: list[int], tokens_per_step: int | None,
               world: int = 1) -> list[tuple[Config, int, int]]:
    """(config, seq_len, batch_size) for every architecture at every shape, each batch checked to split evenly
    over `world` processes and their train.grad_accum micro-batches."""
    plan = []
    for cfg in configs:
        for seq, batch in speed_shapes(cfg, seqs, batches, tokens_per_step):
            parts = world * cfg.train.grad_accum
            if batch % parts:
                raise ConfigError(
                    f"batch {batch} ({cfg.name}, seq {seq}) does not split over {world} processes x train.grad_accum "
                    f"({cfg.train.grad_accum}); pass --batch with a multiple of {parts}")
            plan.append((cfg, seq, batch))
    return plan


def bench_speed(configs: list[Config], seqs: list[int], batches: list[int], tokens_per_step: int | None = None,
                steps: int = 10, warmup: int = 3, forward_only: bool = False, path: Path | None = None,
                force: bool = False, on_start: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Measure every architecture at every shape on the first config's train.device; write the report to `path`
    (checked before measuring) and return it with its path. Under torchrun every process measures its share of
    each batch together with the others, and process 0 writes the report."""
    try:  # every process finds the same problem here; process 0 alone prints it
        check_speed_counts(steps, warmup, seqs, batches, tokens_per_step)
        plan = speed_plan(configs, seqs, batches, tokens_per_step, dist.world_size())
        if path is not None:
            ensure_new_file(path, force)
        device = resolve_device(configs[0].train.device)
    except HybridctlError as error:
        raise dist.shared(error) from None
    rows = []
    for cfg, seq, batch in plan:
        if on_start is not None:
            on_start(cfg.name, seq, batch)
        rows.append(measure_speed(cfg, seq, batch, device, steps, warmup, forward_only))
        report = speed_report(rows, device, forward_only, complete=len(rows) == len(plan))
        if path is not None and dist.is_main():  # after every shape: a run stopped part-way keeps what it measured
            write_json(path, report, force=True)
    return {**report, "path": str(path) if path else None}


def speed_report(rows: list[dict[str, Any]], device: torch.device, forward_only: bool,
                 complete: bool = True) -> dict[str, Any]:
    """complete: every planned shape is in rows (false in the file of a run stopped part-way)."""
    name = device_name(device)
    return {
        "task": "speed",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": complete,
        "device": name,
        "processes": dist.world_size(),  # one per GPU on CUDA; tok/s is for all of them, MFU per GPU
        "peak_bf16_tflops": peak_bf16_tflops(name) if device.type == "cuda" else None,
        "mode": "forward" if forward_only else "train",
        "torch": torch.__version__,
        "flops": "train = 3 * forward; forward = 2 * matmul params + 2 * V_pad * d + causal attention "
                 "4 * d * (T + 1) / 2 per F layer + Gated DeltaNet chunk matmuls and solve per L layer "
                 "(hybridctl/core/evaluation.py)",
        "results": rows,
    }


def default_speed_path(out: Path) -> Path:
    base = Path(out) / BENCH_DIR / f"speed-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base.with_suffix(".json"), 1
    while path.exists():  # two runs in one second never share a file
        n += 1
        path = base.with_name(f"{base.name}-{n}.json")
    return path
