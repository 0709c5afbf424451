#!/usr/bin/env bash
# The CPU figures quoted in README.md and docs/, regenerated from the code as it stands; each printed with the
# claim it backs.
#
#   benchmarks/readme_figures.sh [FOLDER]     # runs go to FOLDER (default: a temporary folder, removed after)
#
# Times are wall-clock on this machine, so run it on an otherwise idle one (the docs quote two CPU cores); losses
# and accuracies do not depend on the machine (CPU runs are deterministic). About 20 minutes on two idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ge 1 ]; then
  out=$1
  mkdir -p "$out"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
python=${PYTHON:-python}
hybridctl() { "$python" -m hybridctl "$@"; }
export HYBRIDCTL_CACHE=${HYBRIDCTL_CACHE:-$out/cache}

# summary.json of a run: steps, wall time, throughput, losses, and MQAR accuracy at each eval when there is one
report() {
  "$python" - "$out/$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
run, claim = Path(sys.argv[1]), sys.argv[2]
s = json.loads((run / "summary.json").read_text())
line = (f"{claim}: {s['steps']} steps in {s['wall_time_s'] / 60:.1f} min wall ({s['tok_s']:.0f} tok/s), "
        f"final val loss {s['final_val_loss']:.4f}")
recall = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_mqar_acc" in l]
if recall:
    line += "; val_mqar_acc " + ", ".join(f"{e['val_mqar_acc']:.3f} at step {e['step']}" for e in recall)
print(line)
EOF
}

echo "machine: $(nproc) CPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg); $("$python" -c 'import torch; print("torch", torch.__version__, "with", torch.get_num_threads(), "threads")')"

# README: "hybridctl train --preset tiny   # ~1 minute on 2 idle CPU cores, offline"
hybridctl data prepare --preset tiny > /dev/null  # tokenising once is not part of a run's time
hybridctl train --preset tiny --out "$out" --name tiny --force > "$out/tiny.log" 2>&1
report tiny "train --preset tiny"

# docs/study-c.md: "hybridctl train --preset tiny --set model.pattern=LLDL --set model.moe.n_experts=4  # ~1 min"
hybridctl train --preset tiny --set model.pattern=LLDL --set model.moe.n_experts=4 --out "$out" --name tiny_lldl_moe \
  --force > "$out/tiny_lldl_moe.log" 2>&1
report tiny_lldl_moe "train --preset tiny, pattern LLDL, 4 experts"

# docs/data.md, MQAR: the command as written (tiny's LR, 3e-3), and with LR 1e-3, which learns the recall
MQAR=(--preset tiny --set 'data.dataset="synthetic:mqar:pairs=4,vocab=256"' --set train.eval_every=250)
hybridctl train "${MQAR[@]}" --set train.steps=1000 --out "$out" --name mqar --force > "$out/mqar.log" 2>&1
report mqar "MQAR pairs=4 vocab=256 (chance 1/128), lr 3e-3"
hybridctl train "${MQAR[@]}" --set train.lr=1e-3 --set train.steps=1500 --out "$out" --name mqar_lr1e-3 --force > "$out/mqar_lr1e-3.log" 2>&1
report mqar_lr1e-3 "MQAR pairs=4 vocab=256 (chance 1/128), lr 1e-3, 1500 steps"

# docs/study-c.md: "A D layer is therefore slower than an F layer here: one layer at study C's settings, forward
# and backward on a batch of 8 x 512 tokens in fp32 on 2 CPU cores, took X s against Y s (best of 5)"
"$python" - <<'EOF'
import time
import torch
from hybridctl.core.config import load_config
from hybridctl.core.model.hybrid_lm import make_mixer

cfg = load_config("base_study_c").model  # 128d, 4 heads; D keeps the top 64 of up to 512 keys
torch.manual_seed(0)
x = torch.randn(8, 512, cfg.d_model, requires_grad=True)
best = {}
for kind in ("F", "D"):
    layer = make_mixer(kind, cfg).train()
    layer(x).sum().backward()  # warm-up
    times = []
    for _ in range(5):
        start = time.perf_counter()
        layer(x).sum().backward()
        times.append(time.perf_counter() - start)
    best[kind] = min(times)
print(f"one layer at study C's settings, batch 8 x 512 tokens, fp32, forward and backward (best of 5): "
      f"D {best['D']:.3f} s, F {best['F']:.3f} s")
EOF
