#!/usr/bin/env bash
# Study C on one CUDA GPU: the eight study-C presets (4 layers x 128d, MoE with 4 experts, top-2, every 2nd layer;
# L/F and L/D patterns) at their 1000 steps, 2 seeds, on the corpus and tokenizer of ../study_a_300 (builtin:python,
# bpe:16384; the study used SmolLM's 49,152-token vocabulary, so the embeddings here are smaller). The 16M-token set
# of study A is reused: 1000 steps x 32 x 512 = 16.4M tokens repeat 2% of it.
#   usage: bash docs/results/study_c/run.sh [SEEDS]   (default 0,1; running it again resumes the sweep)
set -euo pipefail
SEEDS=${1:-0,1}
OUT=${RUNS:-runs}
hybridctl ablate arch --preset study_c --seeds "$SEEDS" --steps 1000 --name study_c --out "$OUT" \
  --set data.dataset=builtin:python --set data.tokenizer=bpe:16384 --set data.max_tokens=16000000 \
  --set train.keep_checkpoints=1
hybridctl compare "$OUT/ablations/study_c" --no-plots --json-out "$OUT/ablations/study_c/compare.json" --markdown "$OUT/ablations/study_c/compare.md" --force
hybridctl report "$OUT/ablations/study_c" --force
