#!/usr/bin/env bash
# Create .venv and install napari-protodiff with everything the demo and tests need.
# Reproducible on the project's machines: every package version comes from
# constraints.txt (torch and torchvision are pinned there to the builds that lie on
# this machine's disk, so nothing large is downloaded). pyproject.toml itself only
# states ranges, so users elsewhere are not forced onto these versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
log=.venv/install.log
if ! { .venv/bin/python -m pip install --upgrade "pip>=24" &&
       .venv/bin/python -m pip install -c constraints.txt -e ".[all,testing]"; } >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -40 >&2
  echo "setup failed; the whole pip log is in $log" >&2
  exit 1
fi
echo "installed: $(.venv/bin/protodiff --version)"
