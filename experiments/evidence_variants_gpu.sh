#!/usr/bin/env bash
# One or more configurations of the evidence experiment on one card and one store, side by side:
# what they share (the data, defender 0, the clean-only arm, the fixed attacks, the cold start) is
# trained once, by the first configuration's process of each seed; every other configuration's
# process of that seed starts when the first has its cold start (its log's "attacker sft" line:
# experiments/evidence.py runs the shared steps before the attacker), so no two processes train the
# same version. Rerun the same command to continue after the limit: each step is found in WORK.
# Usage: experiments/evidence_variants_gpu.sh OUT WORK SECONDS "SEEDS" NAME "ARGS" [NAME "ARGS" ...]
# e.g.   EVIDENCE_ARGS="--set coevolution.iterations=1" experiments/evidence_variants_gpu.sh OUT W 560 \
#            "0 1 2" boxes "" shapes "--set attacker.keep_target_shapes=true"
# SECONDS bounds the whole call (every process stops by then; 0: no bound). Arguments for every
# configuration go in EVIDENCE_ARGS. Each configuration's seeds' JSONs and, once every seed has finished,
# its merged table (OUT/NAME.json, .png, .table) land in OUT.
set -u
out=${1:?output folder}; work=${2:?work folder}; limit=${3:?seconds}; seeds=${4:?seeds}; shift 4
[ $# -ge 2 ] && [ $(($# % 2)) -eq 0 ] || { echo "give NAME ARGS pairs, the first trains what they share" >&2; exit 2; }
mkdir -p "$out" "$work/out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} AOT_CACHE=${AOT_CACHE:-$work/cache}
. experiments/gpu_fits.sh
mkdir -p "$AOT_CACHE"
unpack_fits
t0=$(date +%s)
left() { [ "$limit" -gt 0 ] && echo $((limit - ($(date +%s) - t0))) || echo 0; }
run() {  # SEED NAME ARGS: one configuration of one seed, until the call's bound
  timeout "$(left)" python experiments/aot_evidence.py --seeds "$1" --name "$2_s$1" --root "$work/s$1" \
      --out "$work/out" ${EVIDENCE_ARGS:-} $3 > "$out/$2_seed$1.log" 2>&1
}
timeout "$(left)" python experiments/fit_preset_editor.py evidence > "$work/vae_fit.log" 2>&1 &
first=$1; first_args=$2; shift 2
for s in $seeds; do
  run "$s" "$first" "$first_args" &
  pid=$!
  rest=("$@")
  [ ${#rest[@]} -gt 0 ] || continue  # one configuration: nothing waits on its cold start
  ( cold() { grep -q "attacker sft" "$out/${first}_seed$s.log" 2>/dev/null; }
    until cold; do
      # the first ended without a cold start (crashed, or stopped by the bound): nothing to share
      kill -0 "$pid" 2>/dev/null || cold || { echo "seed $s: $first stopped before its cold start" >&2; exit 0; }
      sleep 3; [ "$(left)" -gt 5 ] || [ "$limit" -eq 0 ] || exit 0
    done
    for ((i = 0; i < ${#rest[@]}; i += 2)); do run "$s" "${rest[i]}" "${rest[i + 1]}" & done
    wait ) &
done
wait
echo "processes done after $(( $(date +%s) - t0 )) s"
for name in "$first" $(for ((i = 0; i < $#; i += 2)); do echo "${@:i+1:1}"; done); do
  files=$(for s in $seeds; do f="$work/out/${name}_s$s.json"; [ -e "$f" ] && echo "$f"; done)
  [ -n "$files" ] && cp $files "$out"/  # each finished seed's own JSON, beside the call's logs
  if [ "$(echo "$files" | grep -c .)" -eq "$(echo $seeds | wc -w)" ]; then
    python experiments/aot_evidence.py --merge $files --out "$out" --name "$name" 2>&1 | tee "$out/$name.table"
  else
    echo "$name: $(echo "$files" | grep -c .) of $(echo $seeds | wc -w) seeds finished (rerun to continue)"
  fi
done
