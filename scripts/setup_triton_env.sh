#!/usr/bin/env bash
# Create .venv-triton: a real `tritonserver` (shipped inside nvidia-pytriton, Python backend only) plus what the
# Python-backend pipeline model needs (numpy<2, onnxruntime, transformers' CLIPTokenizer, tritonclient).
# Its own environment because nvidia-pytriton and the 2.51 Python backend need numpy<2 and the project uses numpy 2.
# Idempotent: a stamp file records the requirements installed; rerunning with the same ones does nothing.
# Usage: bash scripts/setup_triton_env.sh [VENV_DIR]   (default: .venv-triton at the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-triton}"
PY="${PYTHON:-python3}"
REQS=(
  "nvidia-pytriton>=0.5"
  "numpy<2"
  "onnxruntime>=1.18"
  "transformers>=4.45,<6"
  "tritonclient[http]>=2.40"
  "protobuf>=4"
  "pillow>=10"
)
STAMP="$VENV/.uniforget-triton-stamp"
WANT="$("$PY" -c 'import sys; print(sys.version.split()[0])') ${REQS[*]}"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "$VENV is up to date"
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m venv "$VENV"
# torch is not needed there: transformers' tokenizer runs without it
"$VENV/bin/pip" install -q "${REQS[@]}"
server="$("$VENV/bin/python" -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver")')"
if [[ ! -x "$server" ]]; then
  echo "error: nvidia-pytriton installed but $server is missing" >&2
  exit 1
fi
echo "$WANT" > "$STAMP"
echo "tritonserver: $server"
