#!/usr/bin/env bash
# Packs what the lent GPU machine lacks (its image has torch, transformers, accelerate, peft, timm,
# pyarrow; not these, at requirements.txt's versions where pinned) into .whlx/site.tar.xz: cp312
# wheels unzipped into site/ (39 MB compressed, under the 64 MiB a call may carry; the wheels
# themselves are 64 MB). Run here (it downloads from PyPI), then on the card:
#   run(carry=[".whlx"], command="mkdir -p /tmp/s && tar -xJf .whlx/site.tar.xz -C /tmp/s &&
#       export PYTHONPATH=/tmp/s/site:$PWD HF_HUB_OFFLINE=1 && ...")
# `experiments/gpu_site.sh trl` instead fills .whl/ with the wheels experiments/defender_dapo_gpu.sh
# installs for TRL's GRPOTrainer (trl, datasets and the pure-Python deps the image lacks; 2.3 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
if [ "${1:-}" = trl ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
  for pkg in trl==1.16.0 datasets==5.2.0 dill multiprocess xxhash; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
        -d .whl "$pkg" 2>&1 | grep -v "is ignored" || true
  done
  ls -la .whl
  exit 0
fi
grep -qx '/.whlx/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whlx/ >> .git/info/exclude; }
tmp=$(mktemp -d)
for pkg in polars==2.1.0 polars-runtime-32==2.1.0 diffusers==0.42.1 open-clip-torch==3.3.0 segment-anything==1.0 \
           pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings python-dotenv annotated-types typing-inspection \
           typing-extensions importlib-metadata ftfy wcwidth; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d "$tmp/wheels" "$pkg" 2>&1 | grep -v "is ignored" || true
done
mkdir -p "$tmp/site" .whlx
for w in "$tmp"/wheels/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
tar -cJf .whlx/site.tar.xz -C "$tmp" site
rm -rf "$tmp"
ls -la .whlx/site.tar.xz
