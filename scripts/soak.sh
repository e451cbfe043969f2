#!/usr/bin/env bash
# The daemon's soak test at length: MQTT 5 clients ask above capacity while mosquitto (with
# persistence) is stopped with SIGTERM and started again every few seconds; afterwards every
# request the broker acknowledged must have exactly one reply by id, the pose stream must have
# come back after every restart, and the daemon must have stayed up within its memory bound.
# tests/soak.rs is the test (CI runs it for 20 s); docs/reliability.md says how it counts.
#
#   scripts/soak.sh                    # 600 s, 4 clients, a restart every 5 s
#   SOAK_S=3600 SOAK_CLIENTS=16 SOAK_RESTART_S=3 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export POSEGPT_SOAK_S=${SOAK_S:-600}
export POSEGPT_SOAK_CLIENTS=${SOAK_CLIENTS:-4}
export POSEGPT_SOAK_RESTART_S=${SOAK_RESTART_S:-5}
# The daemon's own log at warn: a soak refuses thousands of asks `busy` by design.
export DAEMON_LOG=${DAEMON_LOG:-warn}
echo "soak: ${POSEGPT_SOAK_S} s, ${POSEGPT_SOAK_CLIENTS} clients, broker restart every ${POSEGPT_SOAK_RESTART_S} s"
cargo test --test soak -- --nocapture 2>&1 | grep -E "^(soak |the daemon's last stats|test |thread |  left|  right|lost: )"
