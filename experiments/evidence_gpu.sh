#!/usr/bin/env bash
# Issue 8's whole GPU experiment on one card: the tiny VAE fitted once, then one process per seed
# sharing the card (each its own store under WORK), then the merged table, curve and JSON in OUT.
# Usage: experiments/evidence_gpu.sh OUT [WORK] [SECONDS_PER_SEED] [SEEDS]; extra arguments for
# aot_evidence.py go in EVIDENCE_ARGS (e.g. "--set defender.warmup.steps=800").
set -u
# SECONDS_PER_SEED stops a seed's process after that long (default 0: never), for machines lent
# with a per-command limit; a stopped seed's finished steps stay in WORK and a rerun continues there.
# SEEDS (default "0 1 2") runs fewer seeds in one call; --merge of every seed's JSON later makes one table.
# NAME (default aot_evidence) names the JSON files: a second configuration on the same WORK (say
# NAME=aot_evidence_replay with EVIDENCE_ARGS="--set coevolution.curriculum_replay=2") finds the
# first's finished versions (defender 0, the clean-only arm) and keeps its own table apart.
out=${1:?output folder}; work=${2:-/tmp/aot-evidence}; limit=${3:-0}; seeds=${4:-"0 1 2"}; name=${NAME:-aot_evidence}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} AOT_CACHE=${AOT_CACHE:-$work/cache}
args=(${EVIDENCE_ARGS:-})
. experiments/gpu_fits.sh
mkdir -p "$AOT_CACHE"
unpack_fits  # FITS=DIR: an earlier call's fits-*.tar.xz (same GPU kind: found; else refitted)
t0=$(date +%s)
# One VAE and editor fit for every seed (their cache keys ignore the seed); the seeds start
# meanwhile, and one that reaches its attacker first waits on the fit's lock, then loads it.
timeout "$limit" python experiments/fit_preset_editor.py evidence > "$work/vae_fit.log" 2>&1 &
for s in $seeds; do
  timeout "$limit" python experiments/aot_evidence.py --seeds $s --name ${name}_s$s --root "$work/s$s" \
      --out "$work/out" "${args[@]}" > "$out/${name}_seed$s.log" 2>&1 &
done
wait
tail -n 1 "$work/vae_fit.log"
echo "seeds done after $(( $(date +%s) - t0 )) s"
ls "$work"/out/${name}_s[0-9]*.json && cp "$work"/out/${name}_s[0-9]*.json "$out"/
python experiments/aot_evidence.py --merge "$work"/out/${name}_s[0-9]*.json --out "$out" --name "$name"
echo "total $(( $(date +%s) - t0 )) s"
