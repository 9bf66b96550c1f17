#!/usr/bin/env bash
# Set up (system packages, .venv) and run the whole test suite, GUI tests included (under Xvfb).
#
# With no arguments: the headless tests on two pytest-xdist workers (tests/diffusion on one of them,
# so its tiny model is trained once: tests/conftest.py), then the GUI tests (tests/gui) serially, because they
# measure the viewer's responsiveness and must not share the CPU with another test process.
# With arguments: exactly `pytest ARGS` (e.g. `bash scripts/test.sh tests/core -q`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/setup.sh
export QT_QPA_PLATFORM=xcb
XVFB=(xvfb-run -a -s "-screen 0 1600x1200x24")
if [ $# -gt 0 ]; then
    exec "${XVFB[@]}" .venv/bin/python -m pytest -p no:xvfb "$@"
fi
rc=0
"${XVFB[@]}" .venv/bin/python -m pytest -p no:xvfb -n 2 --dist loadgroup --durations=12 --ignore=tests/gui || rc=$?
"${XVFB[@]}" .venv/bin/python -m pytest -p no:xvfb --durations=8 tests/gui || rc=$?
exit $rc
