#!/usr/bin/env bash
# experiments/defender_dapo.py on the lent GPU in one command: installs trl and datasets from the
# carried wheel folder when they are missing, then runs each argument set in turn, each with its own
# JSON folder and log under OUT (a command cut off by the time limit keeps what finished). With no
# argument sets, issue 4's comparison as RESULTS.md reports it (about 8 minutes, within one 600 s
# call): our full-preset GPU setup against TRL GRPOTrainer at batch 16, and the 7B with LoRA.
# Batch 64 as its own call (about 5 minutes):
#   experiments/defender_dapo_gpu.sh OUT "--impls ours-static-grouped-compiled,trl --batches 64"
# Where the update's time goes, eager vs compiled layers:
#   experiments/defender_dapo_gpu.sh OUT "--impls ours-static-grouped,ours-static-grouped-compiled --batches 16 --profile"
# Carry the wheels with the run tool: carry [".whl"] (trl, datasets and their pure-Python deps;
# `bash experiments/gpu_site.sh trl` downloads them here).
set -u
out=${1:?output folder}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python -c "import trl, datasets" 2>/dev/null; then
  python -m pip install -q --no-deps .whl/trl*.whl .whl/datasets*.whl .whl/dill*.whl .whl/multiprocess*.whl \
    .whl/xxhash*.whl > "$out/pip.log" 2>&1 || { echo "wheel install failed: $out/pip.log"; exit 1; }
fi
if [ $# -eq 0 ]; then
  set -- "--impls ours-static-grouped-compiled,trl --batches 16 --lora-7b"
fi
i=0
for args in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # each set is split into its arguments on purpose
  python experiments/defender_dapo.py $args --out "$out/run$i" > "$out/run$i.log" 2>&1
  echo "run $i ($args): exit $?"
  grep -A20 "^impl " "$out/run$i.log" | head -20
done
