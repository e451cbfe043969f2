#!/usr/bin/env bash
# Install what building posegpt-edge needs on Debian/Ubuntu: cmake and clang/libclang for
# llama.cpp and its bindings, mosquitto for the MQTT tests, openssl for the TLS test,
# systemd-analyze (package systemd) for the unit-file test, and the Rust toolchain if missing.
#
#   scripts/setup.sh           what building and running the daemon need
#   scripts/setup.sh --tests   also what only the test suite needs: the model converter's Python
#                              environment in .venv-convert (torch and friends, ~5 GB; tests/convert.rs
#                              runs the converter with it), llama.cpp's converter script, and
#                              Chromium (tests/web.rs opens the live view in it, headless)
set -euo pipefail
TESTS=0
for arg in "$@"; do
    case "$arg" in
        --tests) TESTS=1 ;;
        *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends \
    build-essential cmake clang libclang-dev pkg-config ca-certificates curl \
    mosquitto mosquitto-clients openssl systemd
if ! command -v cargo >/dev/null 2>&1; then
    echo "Rust is not installed: get it from https://rustup.rs (rustup), then run this again." >&2
    exit 1
fi
rustup component add rustfmt clippy 2>/dev/null || true
# Debian starts a system mosquitto on port 1883 when the package is installed. posegpt-edge
# brings its own (embedded) broker on that port when no broker is configured, and the tests
# start mosquitto themselves on free ports, so the system service is switched off.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
    $SUDO systemctl disable --now mosquitto || true
fi

if [ "$TESTS" = 1 ]; then
    $SUDO apt-get install -y --no-install-recommends python3 python3-venv chromium
    # Reinstalled only when the requirements change; pip's cache is not kept (it would double
    # the disk this takes).
    stamp=$(sha256sum scripts/requirements-convert.txt | cut -c1-16)
    if [ "$(cat .venv-convert/.requirements 2>/dev/null)" != "$stamp" ]; then
        rm -rf .venv-convert
        python3 -m venv .venv-convert
        .venv-convert/bin/pip install -q --no-cache-dir -r scripts/requirements-convert.txt
        echo "$stamp" >.venv-convert/.requirements
    fi
    # llama.cpp's convert_hf_to_gguf.py, fetched once into ~/.cache/posegpt-edge, so that the
    # tests themselves download nothing.
    .venv-convert/bin/python -c 'import sys; sys.path.insert(0, "scripts"); import convert_chatpose; print("llama.cpp converter:", convert_chatpose.llama_cpp_converter())'
fi
