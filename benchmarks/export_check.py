"""fla's GatedDeltaNetForCausalLM, loaded by transformers from `hybridctl export`'s folder, against hybridctl's
model on the same weights and tokens: deltanet, hybrid_sparse and transformer at a small shape (CUDA + fla).

For each architecture: a run folder with a random model (embedding scaled to std 1, so the logits spread and
greedy choices are clear), then `hybridctl export RUN --out RUN/hf --check --json ...` in its own process (see
hf_check: Triton's fp32 products are made IEEE before the first kernel compiles). Prints the figures as JSON:

    TRITON_CACHE_DIR=/tmp/triton-cache python benchmarks/export_check.py [--json figures.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hybridctl.core.config import load_config  # noqa: E402
from hybridctl.core.model.hybrid_lm import build_model  # noqa: E402
from hybridctl.core.training import checkpoint as ckpt  # noqa: E402
from hybridctl.core.training.runs import RunDir  # noqa: E402

ARCHS = {"deltanet": [], "hybrid_sparse": [3, 6], "transformer": list(range(8))}


def make_run(work: Path, arch: str, d_model: int, n_layers: int, seed: int) -> Path:
    attention = [i for i in ARCHS[arch] if i < n_layers] if arch != "transformer" else list(range(n_layers))
    # the study's Gated DeltaNet heads (128 x 256, as tests/test_gpu.py) so compiled kernels are shared
    cfg = load_config(arch, [f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"model.n_heads={d_model // 64}",
                             f"model.attention_layers={attention}", "model.gdn.num_heads=2", "model.gdn.head_dim=128",
                             'data.tokenizer="bytes"', "train.seq_len=512"])
    cfg.model.vocab_size = 257
    run = RunDir(work / arch)
    run.create(cfg, force=True)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.embed.weight.normal_(0.0, 1.0)
        for name, p in model.named_parameters():  # norms away from 1, so a misplaced norm weight shows
            if p.dim() == 1 and not name.endswith(("A_log", "dt_bias")):
                p.add_(torch.randn_like(p) * 0.2)
    ckpt.save_checkpoint(run.best_dir, model, None, {"step": 0, "config": cfg.to_dict()})
    run.release_lock()
    return run.path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated: deltanet, hybrid_sparse, transformer")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs and exports (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="export-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    figures, failed = {}, False
    for arch in args.archs.split(","):
        run = make_run(work, arch, args.d_model, args.n_layers, args.seed)
        result_path = work / f"{arch}.json"
        proc = subprocess.run([sys.executable, "-m", "hybridctl", "export", str(run), "--out", str(run / "hf"), "--force",
                               "--check", "--json", str(result_path)], env=env, capture_output=True, text=True)
        sys.stderr.write(proc.stdout + proc.stderr)
        failed |= proc.returncode != 0
        figures[arch] = json.loads(result_path.read_text()) if result_path.is_file() else {"error": proc.stderr.strip()[-2000:]}
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
