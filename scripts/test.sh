#!/usr/bin/env bash
# The test suite: offline, on the CPU, tiny models and the generated toy world.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
