#!/usr/bin/env bash
# A mid-size random-weight bundle for benchmarks, between the committed tiny ones and the real
# 13B release: a LLaMA of about 270M parameters (hidden 1024, 16 layers, 32 000 + 3 tokens) and a
# CLIP ViT-B/16-224 tower (196 image tokens), in the released ChatPose layout, converted by
# scripts/convert_chatpose.py and quantised to Q4_K_M as a device would run it.
#
#   scripts/setup.sh --tests            # the converter's environment (.venv-convert)
#   cargo build --release
#   scripts/make_mid_bundle.sh [OUT]    # default /tmp/posegpt-mid; the bundle is OUT/chatpose-mid
#   target/release/posegpt-edge bench --bundle /tmp/posegpt-mid/chatpose-mid
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/posegpt-mid}
PY=${POSEGPT_CONVERT_PYTHON:-.venv-convert/bin/python}
BIN=target/release/posegpt-edge
[ -x "$PY" ] || { echo "no $PY: run scripts/setup.sh --tests first" >&2; exit 1; }
[ -x "$BIN" ] || { echo "no $BIN: run cargo build --release first" >&2; exit 1; }

echo "[1/3] random checkpoint (ChatPose layout) in $OUT/checkpoint" >&2
"$PY" scripts/make_tiny_chatpose.py --preset mid --out "$OUT/checkpoint" \
    --fixtures "$OUT/checkpoint/expected"
echo "[2/3] converting to $OUT/chatpose-mid" >&2
"$PY" scripts/convert_chatpose.py "$OUT/checkpoint/chatpose-mid" --clip "$OUT/checkpoint/clip" \
    "$OUT/chatpose-mid" --outtype f16 --overwrite
echo "[3/3] quantising the LLM to Q4_K_M" >&2
"$BIN" quantize "$OUT/chatpose-mid/llm.gguf" "$OUT/llm-q4_k_m.gguf" --type q4_k_m
mv "$OUT/llm-q4_k_m.gguf" "$OUT/chatpose-mid/llm.gguf"
"$BIN" check --bundle "$OUT/chatpose-mid" >&2
echo "bundle: $OUT/chatpose-mid" >&2
