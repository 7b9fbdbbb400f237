#!/usr/bin/env bash
# Issue 8's whole GPU experiment on one card: the tiny VAE fitted once, then one process per seed
# sharing the card (each its own store under WORK), then the merged table, curve and JSON in OUT.
# Usage: experiments/evidence_gpu.sh OUT [WORK] [SECONDS] [SEEDS]; extra arguments for
# aot_evidence.py go in EVIDENCE_ARGS (e.g. "--set defender.warmup.steps=800").
# SECONDS (default 0: never) stops the call's processes after that long, for machines lent with a
# per-command limit; a stopped seed's finished steps stay in WORK and a rerun continues there.
# SEEDS (default "0 1 2") runs fewer seeds in one call; --merge of every seed's JSON later makes one table.
# NAME (default aot_evidence) names the JSON files: a second configuration on the same WORK (say
# NAME=aot_evidence_replay with EVIDENCE_ARGS="--set coevolution.curriculum_replay=2") finds the
# first's finished versions (defender 0, the clean-only arm) and keeps its own table apart.
# The one-configuration case of experiments/evidence_variants_gpu.sh, which runs several side by side.
set -u
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # three processes on the card's 16 cores
exec "$(dirname "$0")/evidence_variants_gpu.sh" "${1:?output folder}" "${2:-/tmp/aot-evidence}" "${3:-0}" \
    "${4:-0 1 2}" "${NAME:-aot_evidence}" ""
