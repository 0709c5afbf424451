"""ARC-Challenge accuracy of a trained model.

ARC-Challenge is scored the way lm-evaluation-harness scores its `arc_challenge` task (zero-shot):
  context       "Question: {question}\nAnswer:"
  continuations " {choice text}" for each choice
  acc           the choice with the highest summed log-likelihood of its continuation tokens is the gold one
  acc_norm      the same after dividing each log-likelihood by the length of the choice text in characters
                (lm-eval divides by len(choice), the text without the leading space)
  stderr        of a mean of 0/1 scores: sample standard deviation (n - 1) / sqrt(n)
The continuation's tokens are those of encode(context + continuation) past the tokens of encode(context), and a
pair longer than the model's context keeps its last max_len + 1 tokens, both as lm-eval does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hybridctl.core.data import hub
from hybridctl.core.data.tokenizer import Tokenizer
from hybridctl.core.errors import ConfigError, DataError
from hybridctl.core.model.hybrid_lm import HybridLM
from hybridctl.core.training.runs import ensure_new_file
from hybridctl.core.training.steps import autocast_for, resolve_device
from hybridctl.core.lab.trained_model import bench_result_path, load_trained_model, locate_checkpoint, write_json
from hybridctl.core.lab.speed import device_name


Progress = Callable[[int, int], None]  # (done, total)


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
    if record.get("answerKey") in (None, ""):
        raise DataError(f"{where}: no answerKey (the label of the right choice), so it cannot be scored; {fix}")
    key = str(record["answerKey"])
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


def task_name(split: str, data: Path | None) -> str:
    """What the questions are: ARC-Challenge's split from the hub, or the file they came from (whatever it holds)."""
    return Path(data).name if data is not None else f"ARC-Challenge ({split})"


def bench_arc(target: Path, which: str | None = None, split: str = "test", data: Path | None = None,
              limit: int | None = None, batch_size: int = 32, max_len: int | None = None, device: str = "auto",
              force: bool = False, progress: Progress | None = None, out: Path | None = None) -> dict[str, Any]:
    """Score a run's checkpoint on ARC-Challenge (or a file in its schema) and write the result to `out` (default
    RUN/bench/arc.json, which compare reads); returns what was written and its path. Cheap checks (paths, an
    existing result, the data) come before the model is loaded."""
    if batch_size < 1 or (limit is not None and limit < 1) or (max_len is not None and max_len < 1):
        raise ConfigError("--batch-size, --limit and --max-len must be positive integers")
    run, checkpoint = locate_checkpoint(target, which)
    path = Path(out) if out is not None else bench_result_path(run, "arc")
    ensure_new_file(path, force)
    questions = load_arc(split, data)[:limit]
    torch_device = resolve_device(device, "--device")
    trained = load_trained_model(checkpoint, device=torch_device)
    max_len = max_len or trained.cfg.train.seq_len
    scores = score_arc(trained.model, trained.tokenizer, questions, torch_device, trained.cfg.train.dtype,
                       batch_size, max_len, progress)
    result = {
        "task": task_name(split, data), "split": split,
        **{k: scores[k] for k in ("n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance", "num_fewshot")},
        "run": run.name, "checkpoint": checkpoint.name, "checkpoint_step": trained.step,
        "data": str(data) if data else f"{ARC_HUB}:{ARC_CONFIG}", "limit": limit, "max_len": max_len,
        "device": device_name(torch_device),
    }
    write_json(path, result, force)
    return {**result, "path": str(path)}
