#!/usr/bin/env bash
# One Prefect worker per GPU on this machine, each seeing only its card: flow runs (a training
# stage, a curriculum, a whole coevolution) then run side by side, one per GPU.
#   PREFECT_API_URL=http://127.0.0.1:4200/api deploy/gpu-workers.sh [N_GPUS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$N" -ge 1 ] || { echo "no GPU found (give the count as the first argument)"; exit 1; }
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server (aot serve prints it)}"
export AOT_REPO=$PWD
PREFECT=${PREFECT:-.venv/bin/prefect}
$PREFECT work-pool inspect aot-local >/dev/null 2>&1 || $PREFECT work-pool create aot-local --type process
pids=()
for i in $(seq 0 $((N - 1))); do
  # --limit 1: a worker takes one flow run at a time, so a card never holds two trainings.
  CUDA_VISIBLE_DEVICES=$i $PREFECT worker start --pool aot-local --name "gpu-$i" --limit 1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
wait
