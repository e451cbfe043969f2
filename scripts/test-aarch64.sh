#!/usr/bin/env bash
# Run the aarch64 build under qemu user-mode emulation (Debian's qemu-user-static with the cross
# sysroot): the parity tests on models/test-tiny and the converted tiny ChatPose bundle, the
# library's unit tests, and `check` + `pose` on the bundle. ggml and tract take their NEON code
# paths here, which x86 never runs. Run scripts/build-aarch64.sh first.
#
#   scripts/test-aarch64.sh
# Tests that start the binary as a child process (cli, daemon, service) are not run: without
# binfmt_misc (not available in containers) an x86 host cannot exec an aarch64 child. Tests
# that cannot run on aarch64 are listed as SKIPPED; tests with a part that needs x86-64's
# AVX-512 or AVX2 say "part of it SKIPPED".
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
TARGET=aarch64-unknown-linux-gnu
command -v qemu-aarch64-static >/dev/null || $SUDO apt-get install -y --no-install-recommends qemu-user-static
QEMU=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
started=$(date +%s)

# The test executables of the last cross build (cargo reports them; nothing is rebuilt when the
# environment is the same as scripts/build-aarch64.sh's).
# shellcheck source=scripts/aarch64-env.sh
. scripts/aarch64-env.sh
mapfile -t TESTS < <(cargo test --release --target "$TARGET" --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, sys
keep = {"posegpt_edge", "llm", "pose", "chatpose", "bundle", "smpl", "quantize"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        if t["name"].replace("-", "_") in keep and t["kind"] != ["bin"]:
            print(t["name"] + " " + m["executable"])
')
[ "${#TESTS[@]}" -ge 7 ] || { echo "aarch64 test executables missing: run scripts/build-aarch64.sh" >&2; exit 1; }
failed=0
for entry in "${TESTS[@]}"; do
    name=${entry%% *}
    bin=${entry#* }
    t0=$(date +%s)
    if "${QEMU[@]}" "$bin" --test-threads 2 -q; then
        echo "aarch64 $name: passed in $(( $(date +%s) - t0 )) s"
        # Tests that cannot run on this architecture are ignored with a reason: name them.
        "${QEMU[@]}" "$bin" --list --ignored 2>/dev/null | sed -n 's/: test$//p' \
            | while read -r t; do echo "aarch64 $name: SKIPPED (ignored here) $t"; done
    else
        echo "aarch64 $name: FAILED" >&2
        failed=1
    fi
done

BIN=target/$TARGET/release/posegpt-edge
echo "== check and pose on models/test-tiny (aarch64)"
"${QEMU[@]}" "$BIN" check --bundle models/test-tiny
"${QEMU[@]}" "$BIN" pose --bundle models/test-tiny --exact --image models/samples/person-squat.png >/tmp/pose-aarch64.json
target/release/posegpt-edge pose --bundle models/test-tiny --exact --image models/samples/person-squat.png >/tmp/pose-x86.json 2>/dev/null \
    || cargo run --release --quiet -- pose --bundle models/test-tiny --exact --image models/samples/person-squat.png >/tmp/pose-x86.json
python3 - <<'PY'
import json
a, b = (json.load(open(p)) for p in ("/tmp/pose-aarch64.json", "/tmp/pose-x86.json"))
def floats(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool): yield float(v)
    elif isinstance(v, list):
        for x in v: yield from floats(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            if k != "timings": yield from floats(x)
fa, fb = list(floats(a)), list(floats(b))
assert len(fa) == len(fb), (len(fa), len(fb))
worst = max(abs(x - y) for x, y in zip(fa, fb))
print(f"pose on aarch64 vs x86-64: {len(fa)} numbers, max difference {worst:.2e}")
assert worst < 2e-2, "the aarch64 pose differs from the x86-64 pose"
PY
echo "test-aarch64: done in $(( $(date +%s) - started )) s"
exit $failed
