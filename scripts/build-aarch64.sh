#!/usr/bin/env bash
# Cross-compile posegpt-edge for aarch64-unknown-linux-gnu (Jetson Orin, JetPack 6) on an x86-64
# Debian machine, with Debian's cross toolchain. Builds the release binary and the release test
# binaries (run them with scripts/test-aarch64.sh).
#
#   scripts/build-aarch64.sh            # -> target/aarch64-unknown-linux-gnu/release/posegpt-edge
# Environment: ARM_ARCH (default armv8.2-a+dotprod+fp16: Orin's Cortex-A78AE; use armv8-a for
# any 64-bit Arm).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
TARGET=aarch64-unknown-linux-gnu
started=$(date +%s)

if ! command -v aarch64-linux-gnu-gcc >/dev/null || [ ! -d /usr/aarch64-linux-gnu/include ]; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends \
        gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross \
        cmake clang libclang-dev pkg-config
fi
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"

# shellcheck source=scripts/aarch64-env.sh
. scripts/aarch64-env.sh

cargo build --release --target "$TARGET"
cargo test --release --target "$TARGET" --no-run
bin="target/$TARGET/release/posegpt-edge"
file "$bin" 2>/dev/null || true
echo "build-aarch64: $bin built in $(( $(date +%s) - started )) s"
