#!/usr/bin/env bash
# Training-step throughput and MFU of the three Study A architectures at the study's shape
# (768d x 12 layers x 12 heads, seq 1024, batch 48 = 49,152 tokens per step, vocab 49152), on a CUDA GPU.
# Results: a Rich table, and runs/bench/speed-<time>.json (or --json FILE).
set -euo pipefail
hybridctl bench speed --preset deltanet,hybrid_sparse,transformer --seq 1024 --batch 48 --steps 20 --warmup 5 "$@"

# Sequence-length scaling at constant tokens per step (batch = 49152 / seq):
#   hybridctl bench speed --preset deltanet,hybrid_sparse,transformer --seq 1024,4096,16384 --tokens-per-step 49152
