#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image: Python 3.12, torch 2.11, transformers 5.17, no
# diffusers; /work/.library/device/KINDS.md), at the versions requirements.txt pins, into .whl/
# (git-ignored through .git/info/exclude). bench/device_check.sh installs them there.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
pin() { grep -E "^$1==" requirements.txt | head -1; }
rm -rf .whl && mkdir -p .whl
# transformers is carried too so the benchmark runs the pinned tokenizer/text-encoder code;
# regex is the one of its requirements that the image may hold in too old a version.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "$(pin diffusers)" "$(pin transformers)" importlib_metadata regex
du -sh .whl; ls .whl
