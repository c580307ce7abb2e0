#!/usr/bin/env bash
# The test suite: offline, on the CPU, tiny models and the generated toy world.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# PYTHON: the interpreter to test with (default: the one on PATH); CI passes its fresh venv's
# interpreter without activating the venv, so no test may rely on an activated PATH.
"${PYTHON:-python}" -m pytest -q "$@"
