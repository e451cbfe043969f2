#!/usr/bin/env bash
# Build the Debian package (amd64 here; arm64 once the cross build exists), list its files and
# run lintian on it. Not part of CI: it needs a release build (CI builds the dev profile only).
#
#   scripts/build-deb.sh
# Output: target/debian/posegpt-edge_<version>-1_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
command -v lintian >/dev/null || $SUDO apt-get install -y --no-install-recommends lintian
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
started=$(date +%s)
deb=$(cargo deb 2>&1 | tee /dev/stderr | tail -1)
[ -f "$deb" ] || { echo "cargo deb did not report a package file" >&2; exit 1; }
echo "== $deb ($(du -h "$deb" | cut -f1), built in $(( $(date +%s) - started )) s)"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
echo "== lintian"
# Errors fail the build; warnings and notes are printed for a reader to weigh.
lintian --fail-on error --info "$deb"
echo "lintian: no errors"
