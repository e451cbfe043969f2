#!/usr/bin/env bash
# Build the Debian package, list its files and run lintian on it. Not part of CI: it needs a
# release build (CI builds the dev profile only).
#
#   scripts/build-deb.sh                                     # for this machine (amd64 here)
#   TARGET=aarch64-unknown-linux-gnu scripts/build-deb.sh    # arm64, via scripts/build-aarch64.sh
# Output: target/debian/posegpt-edge_<version>-1_<arch>.deb
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
command -v lintian >/dev/null || $SUDO apt-get install -y --no-install-recommends lintian
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
started=$(date +%s)
TARGET=${TARGET:-}
if [ -n "$TARGET" ]; then
    [ "$TARGET" = aarch64-unknown-linux-gnu ] || { echo "only aarch64-unknown-linux-gnu is set up for cross builds" >&2; exit 1; }
    scripts/build-aarch64.sh
    deb=$(cargo deb --target "$TARGET" --no-build 2>&1 | tee /dev/stderr | tail -1)
else
    deb=$(cargo deb 2>&1 | tee /dev/stderr | tail -1)
fi
[ -f "$deb" ] || { echo "cargo deb did not report a package file" >&2; exit 1; }
# The Depends line promises glibc 2.35 / GCC 11's libstdc++ (JetPack 6 = Ubuntu 22.04): check
# the binary asks for no newer symbol versions.
bin=target/${TARGET:+$TARGET/}release/posegpt-edge
objdump=objdump
[ -n "$TARGET" ] && objdump=aarch64-linux-gnu-objdump
newest() { "$objdump" -T "$bin" | grep -o "$1[0-9.]*" | sort -V | tail -1; }
glibc=$(newest GLIBC_) glibcxx=$(newest GLIBCXX_)
echo "== $bin needs $glibc, $glibcxx"
[ "$(printf '%s\nGLIBC_2.35\n' "$glibc" | sort -V | tail -1)" = GLIBC_2.35 ] \
    || { echo "$bin needs $glibc, newer than the GLIBC_2.35 the package depends on" >&2; exit 1; }
[ "$(printf '%s\nGLIBCXX_3.4.29\n' "$glibcxx" | sort -V | tail -1)" = GLIBCXX_3.4.29 ] \
    || { echo "$bin needs $glibcxx, newer than libstdc++6 (>= 11) provides" >&2; exit 1; }
echo "== $deb ($(du -h "$deb" | cut -f1), built in $(( $(date +%s) - started )) s)"
dpkg-deb --info "$deb"
dpkg-deb --contents "$deb"
echo "== lintian"
# Errors fail the build; warnings and notes are printed for a reader to weigh.
lintian --fail-on error --info "$deb"
echo "lintian: no errors"
