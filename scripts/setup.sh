#!/usr/bin/env bash
# Install what building posegpt-edge needs on Debian/Ubuntu: cmake and clang/libclang for
# llama.cpp and its bindings, mosquitto for the MQTT tests, openssl for the TLS test,
# systemd-analyze (package systemd) for the unit-file test, and the Rust toolchain if missing.
set -euo pipefail
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
