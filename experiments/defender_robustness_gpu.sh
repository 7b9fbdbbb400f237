#!/usr/bin/env bash
# experiments/defender_robustness.py on one card, one process per seed (each its own store under
# WORK), then every seed's table. Usage: experiments/defender_robustness_gpu.sh OUT [WORK]
# [SECONDS_PER_SEED] [SEEDS]; arguments for defender_robustness.py go in ROBUSTNESS_ARGS (e.g.
# "--sft-steps 400 --steps 60 --lrs 3e-4"; split on spaces, no quoting: an empty value is written
# "--steps="). A seed stopped by SECONDS_PER_SEED keeps its finished
# rows in OUT and its finished models in WORK: a rerun continues there.
set -u
out=${1:?output folder}; work=${2:-/tmp/aot-defender-robustness}; limit=${3:-0}; seeds=${4:-"0 1 2"}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
args=(${ROBUSTNESS_ARGS:-})
t0=$(date +%s)
for s in $seeds; do
  timeout "$limit" python experiments/defender_robustness.py --seed "$s" --root "$work/s$s" --out "$out" \
      --name "defender_robustness_s$s" "${args[@]}" > "$out/seed$s.log" 2>&1 &
done
wait
echo "seeds done after $(( $(date +%s) - t0 )) s"
for s in $seeds; do echo "== seed $s"; grep -v -i "warn\|deprecat\|Loading\|Writing" "$out/seed$s.log" | tail -n 12; done
