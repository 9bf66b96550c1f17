#!/usr/bin/env bash
# Set up .venv and run the end-to-end demo on the bundled sample slide.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/protodiff demo --overwrite "$@"
