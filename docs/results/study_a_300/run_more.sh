#!/usr/bin/env bash
# The rest of the study-A plan on one CUDA GPU, on the data and tokenizer of run.sh (builtin:python, bpe:16384).
# Each part is its own sweep; running a part again resumes it.
#   usage: bash docs/results/study_a_300/run_more.sh lr|tuned|late|long|placements
#   lr          LR at 300 steps: hybrid_sparse, deltanet, transformer over 5e-4..3e-3, one seed (12 runs)
#   tuned       the same three at the best LR of `lr` (../study_a_lr300), three seeds (9 runs), compared together
#   long        700 steps: the two best hybrids of run.sh, deltanet and transformer, 2 seeds (8 runs). 700 steps
#               take 34.4M tokens: a 40M-token set of the same corpus (the BPE depends on the corpus alone, so
#               the tokenizer is the same; the validation split is cut from the larger set)
#   late        hybrid_late, the best at the study's LRs: LR at 300 steps (3 runs), then 3 seeds at the best (1e-3)
#   placements  2 attention layers placed at random on hybrid_sparse's 12: 12 placements, the presets with
#               two attention layers ([3,6], [5,11]) among them, one seed (12 runs)
set -euo pipefail
PART=${1:?give a part: lr, tuned, late, long or placements}
OUT=${RUNS:-runs}
S=(--set data.dataset=builtin:python --set data.tokenizer=bpe:16384 --set data.max_tokens=16000000
   --set train.eval_every=50 --set train.eval_batches=4 --set train.save_every=100 --set train.keep_checkpoints=1)
case "$PART" in
  lr)
    for p in hybrid_sparse deltanet transformer; do
      hybridctl ablate lr --preset $p --values 5e-4,1e-3,2e-3,3e-3 --steps 300 --name lr300_$p --out "$OUT" "${S[@]}"
    done
    sweeps=(lr300_hybrid_sparse lr300_deltanet lr300_transformer) ;;
  tuned)
    for preset_lr in hybrid_sparse:1e-3 deltanet:2e-3 transformer:1e-3; do
      preset=${preset_lr%%:*}
      hybridctl ablate lr --preset $preset --values ${preset_lr#*:} --seeds 0,1,2 --steps 300 --name tuned300_$preset \
        --out "$OUT" "${S[@]}"
    done
    sweeps=(tuned300_hybrid_sparse tuned300_deltanet tuned300_transformer)
    hybridctl compare "${sweeps[@]/#/$OUT/ablations/}" --no-plots --json-out "$OUT/ablations/tuned300.json" \
      --markdown "$OUT/ablations/tuned300.md" --force ;;
  long)
    # seed 0 of every architecture first (--seeds 1), so that a part stopped by a time limit has each of them;
    # the second command (--seeds 2: seeds 0 and 1) grows the sweep by seed 1 and trains only the new runs.
    # Once the sweep holds seed 1, the first command would shrink it (ablate refuses that): resume with the second
    counts="1 2"
    grep -q '"hybrid_late_s1"' "$OUT/ablations/study_a_700/sweep.json" 2>/dev/null && counts=2
    for seeds in $counts; do
      hybridctl ablate arch --preset hybrid_late,hybrid_sparse_5_11,deltanet,transformer --seeds $seeds --steps 700 \
        --name study_a_700 --out "$OUT" "${S[@]}" --set data.max_tokens=40000000
    done
    sweeps=(study_a_700) ;;
  late)
    # hybrid_late, the leader at the study's LRs: its LR at 300 steps (one seed), then three seeds at the best of
    # those, 1e-3, beside the tuned three of `tuned`
    hybridctl ablate lr --preset hybrid_late --values 5e-4,1e-3,2e-3 --steps 300 --name lr300_hybrid_late \
      --out "$OUT" "${S[@]}"
    hybridctl ablate lr --preset hybrid_late --values 1e-3 --seeds 0,1,2 --steps 300 --name tuned300_hybrid_late \
      --out "$OUT" "${S[@]}"
    sweeps=(lr300_hybrid_late tuned300_hybrid_late) ;;
  placements)
    hybridctl ablate arch --preset hybrid_sparse --attention 2 --placements 12 --seed 0 --steps 300 \
      --name placements300 --out "$OUT" "${S[@]}"
    sweeps=(placements300) ;;
  *) echo "unknown part '$PART': give lr, tuned, late, long or placements" >&2; exit 2 ;;
esac
for sweep in "${sweeps[@]}"; do
  hybridctl compare "$OUT/ablations/$sweep" --no-plots --json-out "$OUT/ablations/$sweep/compare.json" --markdown "$OUT/ablations/$sweep/compare.md" --force
  hybridctl report "$OUT/ablations/$sweep" --force
done
