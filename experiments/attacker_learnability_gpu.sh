#!/usr/bin/env bash
# One attacker phase alone (experiments/attacker_learnability.py) on one GPU, the evidence preset:
# the tiny editor fit starts in its own process while the data and defender 0 are built, then the
# tries run; the JSON lands in OUT. Arguments after OUT go to attacker_learnability.py, e.g.
#   experiments/attacker_learnability_gpu.sh OUT --set attacker.curriculum.max_items=96 --score-noise 1.0 \
#       --try "attacker.rl.steps=32,attacker.rl.groups_per_step=4" --try "attacker.cold_start.steps=200"
# FITS=DIR unpacks fitted editors an earlier call returned (PACK_FITS=1 returns them as
# OUT/fits-*.tar.xz): ~3.5 min less on a fresh machine. Every step is a version in $WORK/store and the fits are cached in $WORK/cache: on a machine that
# is still warm, run this script again (same WORK) to pick up where a call's limit cut it. Calling
# attacker_learnability.py directly without AOT_CACHE=$WORK/cache refits the editor (~4 min).
set -u
out=${1:?output folder}; shift
work=${WORK:-/tmp/aot-attacker-learnability}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} AOT_CACHE=${AOT_CACHE:-$work/cache}
mkdir -p "$AOT_CACHE"
. "$(dirname "$0")/gpu_fits.sh"
unpack_fits  # FITS=DIR: an earlier call's fits-*.tar.xz (experiments/gpu_fits.sh)
python experiments/fit_preset_editor.py evidence > "$work/fit.log" 2>&1 &
python experiments/attacker_learnability.py --preset evidence --root "$work/store" --out "$out" "$@"
wait
tail -n 1 "$work/fit.log"
[ -n "${PACK_FITS:-}" ] && pack_fits "$out"  # PACK_FITS=1: the fits come back for the next machine
