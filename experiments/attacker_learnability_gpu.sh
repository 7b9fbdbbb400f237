#!/usr/bin/env bash
# One attacker phase alone (experiments/attacker_learnability.py) on one GPU, the evidence preset:
# the tiny editor fit starts in its own process while the data and defender 0 are built, then the
# tries run; the JSON lands in OUT. Arguments after OUT go to attacker_learnability.py, e.g.
#   experiments/attacker_learnability_gpu.sh OUT --set attacker.curriculum.max_items=96 --score-noise 1.0 \
#       --try "attacker.rl.steps=32,attacker.rl.groups_per_step=4" --try "attacker.cold_start.steps=200"
# Every step is a version in $WORK/store and the fits are cached in $WORK/cache: on a machine that
# is still warm, run this script again (same WORK) to pick up where a call's limit cut it. Calling
# attacker_learnability.py directly without AOT_CACHE=$WORK/cache refits the editor (~4 min).
set -u
out=${1:?output folder}; shift
work=${WORK:-/tmp/aot-attacker-learnability}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} AOT_CACHE=${AOT_CACHE:-$work/cache}
python experiments/fit_preset_editor.py evidence > "$work/fit.log" 2>&1 &
python experiments/attacker_learnability.py --preset evidence --root "$work/store" --out "$out" "$@"
wait
tail -n 1 "$work/fit.log"
