#!/usr/bin/env bash
# Build .venv-optimum: a separate environment for optimum-onnx's ORTStableDiffusionPipeline.
#
# Why separate: optimum-onnx pins transformers<4.58 (-> huggingface-hub<1.0) while the project's
# diffusers>=0.40 needs huggingface-hub>=1.23, so the two cannot share one environment.
# The project only uses this environment to prove that optimum loads and runs our exported
# ONNX pipeline folder (tests/exporter/test_onnx_pipeline.py skips when it is absent).
#
# Usage: bash scripts/setup_optimum_env.sh [VENV_DIR]   (default: .venv-optimum at the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-optimum}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# CPU torch first: an unpinned torch pulled in by optimum would be a multi-GB CUDA build
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "optimum-onnx[onnxruntime]" "diffusers<0.40" "transformers<4.58" \
    -c <(echo "torch==2.13.0")
"$VENV/bin/python" -c "import optimum.onnxruntime, diffusers, transformers; \
print('optimum env ready: diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
