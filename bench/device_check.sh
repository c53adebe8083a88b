#!/usr/bin/env bash
# The one command to run on the lent GPU machine (its image has torch but not diffusers or DALI).
#
# Here, once:   bash bench/device_wheels.sh          # diffusers & co. into .whl/ (git-ignored)
#               bash ../shared/device/carry-dali.sh  # DALI into .dali1 ... .dali5 (git-ignored)
# Then five device calls back to back (the machine stays warm ~30 s between calls):
#   carry [".dali1"]          command: mkdir -p /tmp/dp && cp .dali1/* /tmp/dp/
#   ... the same for .dali2 .dali3 .dali4 ...
#   carry [".dali5", ".whl"]  command: bash bench/device_check.sh        timeout_s: 590
# Without DALI (one call, the DALI cases recorded as skipped):
#   carry [".whl"]            command: bash bench/device_check.sh --steps ceilings,generate
#
# Arguments go to bench/device_check.py (--budget, --steps, --variants, ...). Results land in
# $OUT/device_check.json and $OUT/device_check.log; then, back here:
#   .venv/bin/python bench/performance_report.py <files_at>/device_check.json
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p /tmp/site
if [ -d .dali5 ] && [ -f .dali5/install-dali.sh ]; then
  mkdir -p /tmp/dp && cp .dali5/part* /tmp/dp/ 2>/dev/null
  bash .dali5/install-dali.sh || echo "DALI install failed: its cases will be skipped" >&2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
fi
# The device image has no editable install of medicsynth: the checkout itself goes on the path.
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
exec python3 bench/device_check.py "$@"
