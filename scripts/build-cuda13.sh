#!/usr/bin/env bash
# Build the `cuda` feature for an x86-64 machine with an NVIDIA GPU and a CUDA 13 driver
# (580 or newer), without installing a CUDA toolkit: the compiler, headers and runtime
# libraries come from NVIDIA's PyPI wheels, unpacked under target/cuda13/. llama.cpp is
# built as shared libraries (llama-cpp-sys-2's dynamic-link) that load CUDA 13's runtime and
# cuBLAS from the machine at run time, instead of the ~900 MB statically linked binary
# scripts/check-cuda-build.sh makes. This is how the GPU figures in docs/performance.md were
# built (then copied to the GPU machine, which had CUDA 13 libraries but no Rust).
#
#   scripts/build-cuda13.sh [--vision-cuda]
#
# --vision-cuda adds tract's CUDA runtime (`bench-vision --runtime cuda`; needs libnvrtc.so.13).
# Environment: CMAKE_CUDA_ARCHITECTURES (default 90: H100/H200; 89 Ada, 86 Ampere, 87 Orin).
# Output: target/release/posegpt-edge, llama.cpp's libllama.so.0 and libggml*.so.0 in
# target/cuda13/lib/, and the LLM, pose and ChatPose parity test binaries in
# target/cuda13/tests/. To run, put target/cuda13/lib and the directories holding
# libcudart.so.13 and libcublas.so.13 (e.g. a PyTorch cu13 environment's nvidia/cu13/lib) on
# LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
features=cuda,llama-cpp-sys-2/dynamic-link
if [ "${1:-}" = "--vision-cuda" ]; then features=$features,vision-cuda; fi

root=$PWD/target/cuda13
toolkit=$root/toolkit
if [ ! -x "$toolkit/bin/nvcc" ]; then
    python3 -m venv "$root/venv"
    mkdir -p "$root/wheels"
    # 13.0 matches the oldest CUDA 13 driver; cuBLAS keeps its soname (libcublas.so.13).
    "$root/venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$root/wheels" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_12_x86_64 \
        --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" \
        "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cublas==13.*"
    rm -rf "$root/unpacked" "$toolkit"
    for w in "$root"/wheels/*.whl; do python3 -m zipfile -e "$w" "$root/unpacked"; done
    chmod +x "$root"/unpacked/nvidia/cu13/bin/* "$root"/unpacked/nvidia/cu13/nvvm/bin/*
    src=$root/unpacked/nvidia/cu13
    # The layout CMake and nvcc expect: bin/, nvvm/, include/, lib64/ with unversioned names
    # and the driver stub (lib64/stubs/libcuda.so; the real one comes with the driver).
    mkdir -p "$toolkit/lib64/stubs"
    ln -s "$src/bin" "$toolkit/bin"
    ln -s "$src/nvvm" "$toolkit/nvvm"
    ln -s "$src/include" "$toolkit/include"
    for f in "$src"/lib/*; do ln -s "$f" "$toolkit/lib64/"; done
    for l in cudart cublas cublasLt; do ln -s "lib$l.so.13" "$toolkit/lib64/lib$l.so"; done
    # nvcc looks for libraries beside its own bin/ (../lib64), where the wheel has lib/ only.
    ln -s "$toolkit/lib64" "$src/lib64"
    # The driver API library to link against: a toolkit's stub, else the driver's own.
    stub=$(find /usr/lib /usr/local/cuda* -name libcuda.so -path "*stubs*" 2>/dev/null | head -1 || true)
    stub=${stub:-$(ldconfig -p | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')}
    if [ -z "$stub" ]; then
        echo "build-cuda13: no libcuda.so to link against: install the NVIDIA driver (580+)" >&2
        exit 1
    fi
    ln -s "$stub" "$toolkit/lib64/stubs/libcuda.so"
fi
"$toolkit/bin/nvcc" --version | tail -1

export PATH=$toolkit/bin:$PATH CUDACXX=$toolkit/bin/nvcc CUDAToolkit_ROOT=$toolkit
export CUDA_PATH=$toolkit
export CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}
export CMAKE_CUDA_COMPILER=$toolkit/bin/nvcc
# llama-cpp-sys-2 passes CMAKE_* variables to CMake but does not rebuild when they change:
# a different architecture needs `cargo clean -p llama-cpp-sys-2 --release` first.
cargo build --release --features "$features"
cargo test --release --features "$features" --test llm --test pose --test chatpose --no-run \
    --message-format=json |
    python3 -c '
import json, os, shutil, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        shutil.copy(m["executable"], os.path.join(out, m["target"]["name"]))
        print("test binary:", m["target"]["name"])
' "$root/tests"
# The shared libraries by their sonames, from the newest llama-cpp-sys-2 build (the links cargo
# leaves in target/release point to files it does not copy).
out=$(dirname "$(ls -t target/release/build/llama-cpp-sys-2-*/out/lib/libggml-cuda.so.0 | head -1)")
mkdir -p "$root/lib"
cp -L "$out"/lib*.so.0 "$root/lib/"
ls -la target/release/posegpt-edge "$root"/lib
echo "build-cuda13: built in $(( $(date +%s) - started )) s (CUDA architectures: $CMAKE_CUDA_ARCHITECTURES)"
