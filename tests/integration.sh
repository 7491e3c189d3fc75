#!/usr/bin/env bash
# The seed's timeout-bounded recipe, done right: stream a small CSV with 2 workers at 5 msg/s each
# for 5 s under `timeout`, read /stats/telemetry while it runs, and fail unless about
# 2 x 5 x elapsed messages arrived and the drain completed with nothing lost.
#
#   tests/integration.sh                       (uses telemetry-streamer from PATH)
#   STREAMER="python -m streamer" tests/integration.sh
set -euo pipefail

STREAMER=${STREAMER:-telemetry-streamer}
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

printf 'gpu_id,utilization,temperature,memory_used,hostname,active\n' > "$work/metrics.csv"
for i in 0 1 2 3 4 5 6 7; do
  printf '%d,%d.5,%d,%d,node-%d,%s\n' "$i" $((i * 12)) $((40 + i)) $((1024 * i)) $((i % 2)) "$([ $((i % 2)) = 0 ] && echo true || echo false)" >> "$work/metrics.csv"
done

# --preserve-status: the streamer's own exit code (0 after a complete drain), not timeout's 124
timeout --preserve-status 5s $STREAMER --csv="$work/metrics.csv" --workers=2 --rate=5.0 \
  --broker-port=0 --http-port=0 > "$work/log" 2>&1 &
runner=$!

http=""
for _ in $(seq 100); do
  http=$(sed -n 's/.*HTTP \(http:[^ ]*\) .*/\1/p' "$work/log" | head -n 1)
  [ -n "$http" ] && break
  sleep 0.05
done
[ -n "$http" ] || { echo "FAIL: the streamer never logged its HTTP address"; cat "$work/log"; exit 1; }

# two readings 2 s apart while it runs: the topic's rate is 2 workers x 5 msg/s
read -r first second < <("$PYTHON" - "$http" <<'PY'
import json, sys, time, urllib.request
url = sys.argv[1] + "/stats/telemetry"
def messages():
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)["messages"]
deadline = time.monotonic() + 3
while messages() == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
a = messages(); t = time.monotonic(); time.sleep(2.0)
b = messages(); elapsed = time.monotonic() - t
print(a, a + round((b - a) * 2.0 / elapsed))
PY
)
status=0
wait "$runner" || status=$?
cat "$work/log"

per_2s=$((second - first))
summary=$(grep -E 'Drained: published=' "$work/log" | tail -n 1 || true)
published=$(sed -n 's/.*published=\([0-9]*\).*/\1/p' <<<"$summary")
accepted=$(sed -n 's/.*broker_accepted=\([0-9]*\).*/\1/p' <<<"$summary")

fail() { echo "FAIL: $*"; exit 1; }
[ "$status" = 0 ] || fail "the streamer exited $status, not 0 after its drain"
[ -n "$summary" ] || fail "no drain summary in the log"
[ "$published" = "$accepted" ] || fail "published=$published but the broker accepted $accepted"
# 10 msg/s: 20 in 2 s. Below 100 msg/s a worker sends what falls due within --linger (1 s) in one
# chunk (5 messages here), so a 2 s window counts 2 chunks per worker, give or take one; the total
# below, and the timestamps (tests/test_efficiency.py), hold the rate exactly
[ "$per_2s" -ge 10 ] && [ "$per_2s" -le 30 ] || fail "$per_2s messages in 2 s while running; expected 20, give or take a chunk per worker"
# 5 s less start-up (at most ~2 s on a slow machine) at 10 msg/s, plus each worker's first message
[ "$published" -ge 30 ] && [ "$published" -le 52 ] || fail "published=$published in a 5 s run; expected about 2 x 5 x 5 = 50"
echo "PASS: $per_2s messages in 2 s mid-run, published=$published = broker_accepted=$accepted, drained with exit 0"
