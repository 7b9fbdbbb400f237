#!/usr/bin/env bash
# The GPU sweep behind the evidence preset's defender and editor (RESULTS.md, issue 8): several
# defender configs learn the evidence world side by side on one card, beside the tiny VAE's
# fidelity probe (its fitted weights are cached under $AOT_CACHE for the experiment).
# Usage: experiments/evidence_sweep.sh WORK_DIR [SECONDS]   (logs: WORK_DIR/*.log, WORK_DIR/*.json)
set -u
out=${1:?work folder}; secs=${2:-300}
mkdir -p "$out"
export OMP_NUM_THREADS=2 AOT_CACHE=${AOT_CACHE:-$out/cache}
common=(--out "$out" --seconds "$secs" --eval-every 300 --set source.shuffle_options=false
        --set coevolution.warmup_scenes=16384 --set coevolution.heldout_scenes=256 --set defender.warmup.steps=6000
        --set defender.warmup.lr_warmup_steps=100 --set defender.warmup.lr_schedule=cosine --set defender.warmup.lr=1e-3)
run() { name=$1; shift; python experiments/defender_learnability.py --name "$name" "${common[@]}" "$@" > "$out/$name.log" 2>&1 & }
run relation
run relation-two-objects --set source.objects_max=2 --set source.objects_min=2
run colour --set "source.question_types=[colour]"
run existence --set "source.question_types=[existence]"
run relation-lr2e-3-b128 --set defender.warmup.lr=2e-3 --set defender.warmup.batch_prompts=128 --set defender.warmup.micro_batch=128
python experiments/tiny_vae_fidelity.py --out "$out" --z-dim 4 --steps 3000 --batch 32 --scenes 512 \
    --tau 0.7 0.8 0.85 0.9 > "$out/vae.log" 2>&1 &
wait
grep -h -v Warning "$out"/*.log | grep -v "^ *warnings.warn"
