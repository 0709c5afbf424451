"""`hybridctl generate`: continue text with a trained run's model, streamed as it is produced."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from hybridctl.core import streams
from hybridctl.core.errors import ConfigError


def read_prompts(prompt: Optional[str], prompt_file: Optional[Path]) -> list[str]:
    """The prompts: --prompt's text, or each non-blank line of --prompt-file."""
    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give the text to continue with --prompt TEXT, or a file of prompts (one per line) with "
                          "--prompt-file FILE" + (", not both" if prompt is not None else ""))
    if prompt is not None:
        if not prompt:
            raise ConfigError("the prompt is empty; give some text to continue with --prompt TEXT")
        return [prompt]
    try:
        if str(prompt_file) == "-":  # `... | hybridctl generate RUN --prompt-file -`
            lines = sys.stdin.buffer.read().decode("utf-8").splitlines()
        else:
            lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"prompt file {prompt_file} does not exist; pass a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompt file {prompt_file} ({type(e).__name__}); pass a UTF-8 text file with one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {prompt_file} has no prompts; write one prompt per line (blank lines are skipped)")
    return prompts


def generate(
    target: Path = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="A run folder, or a checkpoint folder inside one (best/, checkpoints/step_NNNNNN)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="A file of prompts, one per line, completed as one batch (blank lines skipped); - reads standard input."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", help="Tokens to add to each prompt at most (fewer at end of document)."),
    temperature: float = typer.Option(0.8, "--temperature", help="Softmax temperature; 0 is greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the K most likely tokens only (0: all)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Sample among the most likely tokens that make up this much probability (1: all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed of the sampling (default: a fresh one, shown with --json)."),
    greedy: bool = typer.Option(False, "--greedy", help="Take the most likely token every time (no sampling)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best, latest or step_NNNNNN (default: best if saved, else latest)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights and caches: fp32 or bf16 (auto: bf16 on CUDA, fp32 on CPU)."),
    allow_long_context: bool = typer.Option(False, "--allow-long-context", help="Let a model with full attention read past its trained train.seq_len (quality drops)."),
    eager: bool = typer.Option(False, "--eager", help="Launch each decoding step from Python instead of replaying a CUDA graph (CUDA; faster for attention-only models at long contexts)."),
    as_json: bool = typer.Option(False, "--json", help="Print prompts, completions, token counts and tok/s as JSON instead of streaming text."),
):
    """Continue a prompt with a trained run's model (best/ by default), streaming the text as it comes."""
    from hybridctl.core.lab.generate import Sampling, generate_text, inference_dtype, load_generator
    from hybridctl.core.lab.render import fmt_n
    from hybridctl.core.lab.trained_model import locate_checkpoint
    from hybridctl.core.lab.tables import err_console
    from hybridctl.core.training.steps import resolve_device

    texts = read_prompts(prompt, prompt_file)
    sampling = Sampling(temperature, top_k, top_p, greedy, seed)
    sampling.check()
    unused = sampling.unused_by_greedy()
    if unused:
        err_console.print(f"warning: --greedy takes the most likely token every time; {', '.join(unused)} "
                          f"{'is' if len(unused) == 1 else 'are'} not used", highlight=False, soft_wrap=True)
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    torch_device = resolve_device(device, "--device")
    torch_dtype = inference_dtype(dtype, torch_device)
    locate_checkpoint(target, checkpoint)  # a missing run or checkpoint is reported before the model is read
    trained = load_generator(target, checkpoint, torch_device, torch_dtype)
    on_token = None
    if not as_json:
        on_token = stream_one(texts[0], trained.tokenizer) if len(texts) == 1 else print_in_order(texts, trained.tokenizer)
    result = generate_text(trained, texts, max_new_tokens, sampling, allow_long_context, on_token, cuda_graph=not eager)
    if as_json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    rows = result["results"]
    tokens = sum(r["completion_tokens"] for r in rows)
    tok_s = f", {result['tok_s']:.1f} tok/s" if result["tok_s"] else ""
    err_console.print(f"[dim]{fmt_n(tokens, 'token')} in {result['prefill_seconds'] + result['decode_seconds']:.2f} s{tok_s} "
                      f"({trained.run.name} @ {trained.checkpoint.name}, {result['device']}, {result['dtype']})[/]",
                      highlight=False, soft_wrap=True)
    stopped = [i + 1 for i, r in enumerate(rows) if r["stop"] == "context"]
    if stopped:
        which = "" if len(rows) == 1 else f"prompt{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} "
        err_console.print(f"warning: {which}stopped where the model has read {result['context_limit']} tokens, the "
                          "length it was trained on (train.seq_len); pass --allow-long-context to go on",
                          highlight=False, soft_wrap=True)


def stream_one(text: str, tokenizer):
    """on_token for one prompt: the prompt, then the completion as it comes."""
    from hybridctl.core.lab.generate import TextStream

    stream = TextStream(tokenizer.decode, skip={tokenizer.eos_id})
    prompt_shown = False

    def on_token(row: int, token: int, stop: Optional[str]) -> None:
        nonlocal prompt_shown
        piece = stream.push(token)
        if not prompt_shown:  # the prompt is shown once it is accepted, with the first token
            piece, prompt_shown = text + piece, True
        sys.stdout.write(piece + ("\n" if stop else ""))
        sys.stdout.flush()
        if streams.closed(streams.STDOUT):  # the text is all there is to generate for: no reader, no more tokens
            raise streams.OutputClosed

    return on_token


def print_in_order(texts: list[str], tokenizer):
    """on_token for a batch: each prompt and its completion once it is done and all before it are printed."""
    tokens: list[list[int]] = [[] for _ in texts]
    done = [False] * len(texts)
    printed = 0

    def on_token(row: int, token: int, stop: Optional[str]) -> None:
        nonlocal printed
        if token != tokenizer.eos_id:
            tokens[row].append(token)
        done[row] = stop is not None
        while printed < len(texts) and done[printed]:
            sys.stdout.write(f"--- {printed + 1}/{len(texts)} ---\n{texts[printed]}{tokenizer.decode(tokens[printed])}\n")
            sys.stdout.flush()
            printed += 1
        if streams.closed(streams.STDOUT):
            raise streams.OutputClosed

    return on_token
