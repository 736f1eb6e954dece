#!/usr/bin/env bash
# The S3-compatible test server (SeaweedFS `weed mini` on 127.0.0.1), adapted
# from ../shared/recipes/s3-test-server.sh. Run as the user who owns S3_DIR.
# Usage: s3-server.sh start | stop | kill   (kill = SIGKILL, for outage tests)
# Environment: S3_DIR, S3_PORT, WEED, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_BUCKET,
# WEED_EXTRA_ARGS (e.g. -master.port=... for a second server beside the first).
set -euo pipefail
S3_DIR=${S3_DIR:-/var/tmp/pg_backup/s3}
S3_PORT=${S3_PORT:-18333}
S3_BUCKET=${S3_BUCKET:-walshipper-test}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-testkey}
export AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-testsecret}
WEED=${WEED:-/var/tmp/s3-venv/bin/weed}

signed() { curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
             --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$@" || true; }

start() {
  if [ -f "$S3_DIR/weed.pid" ] && kill -0 "$(cat "$S3_DIR/weed.pid")" 2>/dev/null; then
    return 0
  fi
  mkdir -p "$S3_DIR/data" "$S3_DIR/log"
  # Credentials on every start: without them weed runs wide open.
  setsid "$WEED" -logdir="$S3_DIR/log" mini -dir="$S3_DIR/data" \
      -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" \
      -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
      -master.telemetry=false ${WEED_EXTRA_ARGS:-} >>"$S3_DIR/log/stdout.log" 2>&1 </dev/null &
  echo $! >"$S3_DIR/weed.pid"
  for _ in $(seq 1 600); do
    if ! kill -0 "$(cat "$S3_DIR/weed.pid")" 2>/dev/null; then
      echo "weed died:"; tail -20 "$S3_DIR/log/stdout.log"; return 1
    fi
    if [ "$(signed "http://127.0.0.1:$S3_PORT/")" = 200 ]; then
      code=$(signed -X PUT "http://127.0.0.1:$S3_PORT/$S3_BUCKET")
      case "$code" in 200|409) return 0 ;; esac
    fi
    sleep 0.1
  done
  echo "weed not ready after 60s"; return 1
}

stop() {
  local pid; pid=$(cat "$S3_DIR/weed.pid" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || { rm -f "$S3_DIR/weed.pid"; return 0; }
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$S3_DIR/weed.pid"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$S3_DIR/weed.pid"
}

kill_now() {
  local pid; pid=$(cat "$S3_DIR/weed.pid" 2>/dev/null) || return 0
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  rm -f "$S3_DIR/weed.pid"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  kill) kill_now ;;
  *) echo "usage: $0 start|stop|kill" >&2; exit 2 ;;
esac
