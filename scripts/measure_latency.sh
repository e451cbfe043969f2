#!/usr/bin/env bash
# End-to-end latency of the pose stream: from frame capture (the message's captured_at_ms) to the
# message received by a second MQTT client (mosquitto_sub, receipt time), over N pose messages,
# with the folder source faster than the model so frames are dropped by the latest-frame slot.
#
#   scripts/measure_latency.sh [N=300] [SOURCE_FPS=100] [BINARY=target/release/posegpt-edge]
# Environment: THREADS (engine threads, default 2), MAX_RATE (pose.max_rate_hz, default 240).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300}
FPS=${2:-100}
BIN=${3:-target/release/posegpt-edge}
[ -x "$BIN" ] || cargo build --release --quiet
PORT=$((20000 + RANDOM % 20000))
DIR=$(mktemp -d)
trap 'kill $DAEMON 2>/dev/null || true; rm -rf "$DIR"' EXIT
cat >"$DIR/config.toml" <<EOF
[device]
id = "latency"
[model]
bundle = "$PWD/models/test-tiny"
threads = ${THREADS:-2}
[source]
kind = "dir"
path = "$PWD/models/samples"
fps = $FPS
[pose]
max_rate_hz = ${MAX_RATE:-240.0}
[mqtt]
embedded_port = $PORT
stats_interval_s = 1.0
EOF
RUST_LOG=warn "$BIN" run --config "$DIR/config.toml" &
DAEMON=$!
for _ in $(seq 150); do   # the embedded broker listens once the model is loaded
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.2
done
# %U: receipt time (Unix seconds with nanoseconds); then the payload.
mosquitto_sub -h 127.0.0.1 -p "$PORT" -t posegpt/latency/pose -C "$N" -F '%U %p' >"$DIR/poses.txt"
mosquitto_sub -h 127.0.0.1 -p "$PORT" -t posegpt/latency/stats -C 1 >"$DIR/stats.json"
python3 - "$DIR/poses.txt" "$DIR/stats.json" "$FPS" <<'EOF'
import json, sys
lat = []
for line in open(sys.argv[1]):
    t, payload = line.split(" ", 1)
    lat.append(float(t) * 1e3 - json.loads(payload)["captured_at_ms"])
lat.sort()
q = lambda p: lat[min(len(lat) - 1, round((len(lat) - 1) * p))]
s = json.load(open(sys.argv[2]))
print(f"{len(lat)} pose messages: capture -> received latency median {q(0.5):.1f} ms, "
      f"p99 {q(0.99):.1f} ms, max {lat[-1]:.1f} ms")
print(f"source at {sys.argv[3]} fps: {s['frames_captured']} frames captured, {s['frames_dropped']} dropped "
      f"by the latest-frame slot, {s['pose_fps']:.1f} poses/s; daemon-side p50 {s['latency_ms_p50']:.1f} ms, "
      f"p99 {s['latency_ms_p99']:.1f} ms")
EOF
