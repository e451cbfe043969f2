#!/usr/bin/env bash
# The vision encoder run by posegpt-edge (tract) against onnxruntime on the same ONNX files,
# threads and input, runs alternating (docs/performance.md). Not part of CI: it installs
# PyTorch and onnxruntime from PyPI and writes 1.6 GB of random-weight towers.
#
#   scripts/bench_vision.sh
# Environment: THREADS (default 2), ROUNDS (3), ITERATIONS per round (3),
#   PAIRS (20: paired runs per tower and run, see below), RUNS (5: runs with fresh processes),
#   TOWERS (vit-b16-224,vit-l14-336), CACHE, VENV.
#
# Two measurements per tower: separate processes in alternating rounds (load time, peak
# memory, run times), then paired runs (scripts/bench_vision_paired.py: both runtimes loaded
# side by side, one run of each in turn), whose per-pair ratio is the time comparison to quote on
# a machine whose speed drifts from minute to minute. A process keeps the speed offset it started
# with, so the paired runs are repeated RUNS times with fresh processes; the figure to quote is
# the median of the runs' medians (their range beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
ITERATIONS=${ITERATIONS:-3}
TOWERS=${TOWERS:-vit-b16-224,vit-l14-336}
CACHE=${CACHE:-$HOME/.cache/posegpt-edge}
VENV=${VENV:-$CACHE/bench-vision-venv}
OUT="$CACHE/vision-towers"

echo "== Python packages (scripts/requirements-bench.txt)"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -r scripts/requirements-bench.txt
echo "== towers with random weights -> $OUT"
# A tower is exported again when the export scripts changed since it was written.
stamp=$(cat scripts/make_vision_towers.py scripts/vision_export.py | sha256sum | cut -c1-16)
for t in ${TOWERS//,/ }; do
    if [ ! -f "$OUT/$t.onnx" ] || [ "$(cat "$OUT/$t.stamp" 2>/dev/null)" != "$stamp" ]; then
        "$VENV/bin/python" scripts/make_vision_towers.py "$OUT" --towers "$t"
        echo "$stamp" >"$OUT/$t.stamp"
    fi
done
echo "== posegpt-edge (release)"
cargo build --release --quiet
OURS=target/release/posegpt-edge

results=$(mktemp)
for t in ${TOWERS//,/ }; do
    for r in $(seq 1 "$ROUNDS"); do
        echo "-- $t round $r/$ROUNDS"
        "$OURS" bench-vision --onnx "$OUT/$t.onnx" -t "$THREADS" --iterations "$ITERATIONS" --json \
            | sed "s/^/$t ours /" >>"$results"
        "$VENV/bin/python" scripts/bench_vision_ort.py "$OUT/$t.onnx" --threads "$THREADS" \
            --iterations "$ITERATIONS" | sed "s/^/$t ort /" >>"$results"
    done
done
"$VENV/bin/python" - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    tower, who, js = line.split(" ", 2)
    rows.setdefault((tower, who), []).append(json.loads(js))
print(f"\n| tower | runner | median ms | peak RSS / weights | load s |")
print("| --- | --- | ---: | ---: | ---: |")
for tower in dict.fromkeys(t for t, _ in rows):
    med = {}
    for who in ("ours", "ort"):
        rs = rows[(tower, who)]
        med[who] = statistics.median(x for r in rs for x in r["runs_ms"])
        peak = max(r["peak_rss_bytes"] for r in rs) / rs[0]["weight_bytes"]
        load = statistics.median(r["load_s"] for r in rs)
        print(f"| {tower} | {rs[0]['runner']} | {med[who]:.1f} | {peak:.2f} | {load:.2f} |")
    print(f"| {tower} | time ratio ours / onnxruntime | {med['ours'] / med['ort']:.3f} | | |")
PY
rm -f "$results"
PAIRS=${PAIRS:-20}
RUNS=${RUNS:-5}
echo
echo "| tower | runs × pairs | ours ms (median) | onnxruntime ms (median) | ratio: median of run medians (range) |"
echo "| --- | ---: | ---: | ---: | ---: |"
for t in ${TOWERS//,/ }; do
    "$VENV/bin/python" scripts/bench_vision_paired.py "$OUT/$t.onnx" --ours "$OURS" \
        --threads "$THREADS" --pairs "$PAIRS" --runs "$RUNS" | "$VENV/bin/python" -c "
import json, sys
d = json.load(sys.stdin)
ours, ort = d['runs_ms']['$OURS'], d['runs_ms']['onnxruntime']
r = d['ratio_per_run']['$OURS']
print(f\"| $t | {d['runs']} × {d['pairs']} | {ours['median']:.1f} | {ort['median']:.1f} | **{r['median_of_medians']:.3f}** ({r['min']:.3f}-{r['max']:.3f}) |\")"
done
