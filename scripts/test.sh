#!/usr/bin/env bash
# Set up (system packages, .venv) and run the whole test suite, GUI tests included (under Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/setup.sh
export QT_QPA_PLATFORM=xcb
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest -p no:xvfb "$@"
