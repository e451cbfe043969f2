#!/usr/bin/env bash
# Compile-and-link check of the `cuda` feature on an x86-64 Debian 12 machine without a GPU:
# installs Debian's CUDA 11.8 toolkit (non-free; about 1.6 GB) with its g++-11 host compiler,
# builds the release binary with llama.cpp's CUDA backend for Orin's GPU (sm_87), then runs
# `check` and `pose` on models/test-tiny with it. Without a GPU, llama.cpp finds no CUDA device
# and every layer stays on the CPU, so this shows the feature builds, links and falls back; it
# says nothing about speed or GPU results (docs/jetson.md). Not part of CI (CUDA kernels take
# a long while to compile).
#
#   scripts/check-cuda-build.sh
# Environment: CMAKE_CUDA_ARCHITECTURES (default 87).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
started=$(date +%s)

if ! command -v nvcc >/dev/null; then
    . /etc/os-release
    if [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
        echo "check-cuda-build: needs nvcc on PATH, or Debian 12 (bookworm) to install it" >&2
        exit 1
    fi
    # The toolkit is in Debian's non-free component.
    $SUDO tee /etc/apt/sources.list.d/posegpt-edge-nonfree.sources >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        nvidia-cuda-toolkit nvidia-cuda-toolkit-gcc cmake clang libclang-dev pkg-config
fi
nvcc --version | tail -1

export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-87}
# llama-cpp-sys-2 links cudart, cuBLAS and cuBLASLt statically and looks for them under
# $CUDA_LIBRARY_PATH/lib64 (NVIDIA's layout); Debian keeps them in the multiarch directory.
if [ ! -e /usr/local/cuda/lib64 ] && [ -z "${CUDA_LIBRARY_PATH:-}" ]; then
    mkdir -p target/cuda-root
    ln -sfn "/usr/lib/$(gcc -print-multiarch)" target/cuda-root/lib64
    export CUDA_LIBRARY_PATH="$PWD/target/cuda-root" CUDA_PATH="$PWD/target/cuda-root"
fi
cargo build --release --features cuda
bin=target/release/posegpt-edge
built=$(( $(date +%s) - started ))
echo "check-cuda-build: built in $built s (CUDA architectures: $CMAKE_CUDA_ARCHITECTURES)"
# The binary carries the CUDA backend: llama.cpp's CUDA runtime symbols are linked in.
if ! nm -C "$bin" | grep "ggml_backend_cuda_init" >/dev/null; then
    echo "check-cuda-build: $bin has no CUDA backend" >&2
    exit 1
fi
"$bin" check --bundle models/test-tiny >/dev/null
"$bin" pose --bundle models/test-tiny --image models/samples/person-wave.png >/dev/null
echo "check-cuda-build: check and pose ran (on the CPU where no CUDA device was found)"
# The LLM and pose parity tests, built with the same features.
cargo test --release --features cuda --test llm --test pose
