#!/usr/bin/env bash
# Study A at the study's length on one CUDA GPU: 300 steps at the study shape (768d x 12 layers, seq 1024, batch 48),
# several seeds, on the largest corpus available offline (the Python sources of the installed packages), one
# tokenizer for every run. Sweeps resume, so running this again continues where a stopped run left off.
#   usage: [PRESETS=a,b,c] bash docs/results/study_a_300/run.sh [SEEDS]   (SEEDS: a count or a list, default 0,1,2)
# More presets or seeds later grow the same sweep: only the new runs train.
set -euo pipefail
SEEDS=${1:-0,1,2}
OUT=${RUNS:-runs}
S=(--set data.dataset=builtin:python --set data.tokenizer=bpe:16384 --set data.max_tokens=16000000
   --set train.eval_every=50 --set train.eval_batches=4 --set train.save_every=100 --set train.keep_checkpoints=1)
PRESETS=${PRESETS:-deltanet,hybrid_8,hybrid_sparse,hybrid_sparse_5_11,hybrid_25,hybrid_late,hybrid_alternating,transformer}
hybridctl ablate arch --preset "$PRESETS" --seeds "$SEEDS" --steps 300 --name study_a_300 --out "$OUT" "${S[@]}"
# compare and report are made from every finished run: a grown sweep replaces the ones of its earlier parts
hybridctl compare "$OUT/ablations/study_a_300" --no-plots --json-out "$OUT/ablations/study_a_300/compare.json" --markdown "$OUT/ablations/study_a_300/compare.md" --force
hybridctl report "$OUT/ablations/study_a_300" --force
