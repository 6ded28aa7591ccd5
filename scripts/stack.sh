#!/usr/bin/env bash
# The local stack on 127.0.0.1: N gunicorn model workers behind a real nginx, no containers.
#
#   scripts/stack.sh up            start, wait until ready, print the URL; Ctrl-C stops everything
#   scripts/stack.sh up --detach   start, wait until ready, return (stop later with `down`)
#   scripts/stack.sh down          stop a stack started from this checkout
#   scripts/stack.sh status        what runs, and each worker's readiness
#
# Beside them, for the dashboard (/dashboard): Debian's Prometheus on 127.0.0.1:9090, scraping every
# worker and mtail, which counts nginx's JSON access log (sent over UDP syslog) by route, status and
# cache result.
#
# Settings (environment): QAIO_STACK_WORKERS (default: one per GPU, else 2), QAIO_STACK_BASE_PORT
# (8001; worker i listens on base+i), QAIO_STACK_PROMETHEUS_PORT (9090; 0: no Prometheus and no
# mtail), QAIO_STACK_MTAIL_PORT (3903, its UDP log port the same number), QAIO_STACK_SCRAPE_INTERVAL
# (2s), QAIO_STACK_DIR (run/), QAIO_STACK_READY_TIMEOUT_S (600),
# QAIO_DEMO_SHAPE (tiny or qwen2.5-0.5b, for the demo fallback), QAIO_MODEL (skip the lookup and
# serve this), every QAIO_* worker setting and every QAIO_NGINX_* front-door setting.
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
run_dir=${QAIO_STACK_DIR:-$root/run}
python=${QAIO_PYTHON:-$root/.venv/bin/python}
gunicorn=$(dirname "$python")/gunicorn

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi
}

ensure_nginx() {
  command -v nginx >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "nginx is missing; installing Debian's nginx-light..." >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  else
    echo "nginx is missing: install it (e.g. sudo apt-get install nginx-light) and run again" >&2
    exit 1
  fi
}

wait_ready() {  # url pid log
  local deadline=$(( $(date +%s) + ${QAIO_STACK_READY_TIMEOUT_S:-600} ))
  until curl -sf -o /dev/null "$1"; do
    if ! kill -0 "$2" 2>/dev/null; then
      echo "process $2 exited before $1 was ready; last lines of $3:" >&2
      tail -n 30 "$3" >&2
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "timed out waiting for $1 (see $3)" >&2
      return 1
    fi
    sleep 0.5
  done
}

up() {
  local detach=${1:-}
  if [ -f "$run_dir/nginx/nginx.pid" ] && kill -0 "$(cat "$run_dir/nginx/nginx.pid")" 2>/dev/null; then
    echo "a stack is already running from $run_dir; stop it with: scripts/stack.sh down" >&2
    exit 1
  fi
  ensure_nginx
  mkdir -p "$run_dir/logs"
  local gpus workers base model
  gpus=$(gpu_count)
  workers=${QAIO_STACK_WORKERS:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
  base=${QAIO_STACK_BASE_PORT:-8001}
  local shape=${QAIO_DEMO_SHAPE:-tiny} demo_dir
  case "$shape" in  # the directories `make model-tiny` and `make model-0.5b` build
    qwen2.5-0.5b) demo_dir="$root/models/qwen2.5-0.5b-shape" ;;
    *) demo_dir="$root/models/$shape" ;;
  esac
  model=$("$python" -m qaio_models.source --model "${QAIO_MODEL:-}" \
    --stand-in-dir "$root/models/smollm2-135m-instruct" --demo-dir "$demo_dir" --demo-shape "$shape")
  export QAIO_MODEL="$model"  # the workers serve it and nginx keys its cache by it
  if [ "$gpus" -eq 0 ] && [ -z "${QAIO_TORCH_THREADS:-}" ]; then
    # Workers share the CPU: give each its slice instead of all of them fighting for every core.
    export QAIO_TORCH_THREADS=$(( $(nproc) / workers > 0 ? $(nproc) / workers : 1 ))
  fi

  local upstreams="" i port
  for ((i = 0; i < workers; i++)); do
    port=$((base + i))
    upstreams="${upstreams:+$upstreams,}127.0.0.1:$port"
    (
      export QAIO_PORT="$port" QAIO_HOST=127.0.0.1 QAIO_INSTANCE_ID="worker-$i"
      if [ "$gpus" -gt 0 ]; then export CUDA_VISIBLE_DEVICES="$((i % gpus))" QAIO_DEVICE=cuda:0; fi
      exec setsid "$gunicorn" -c "$root/worker/gunicorn.conf.py" 'qwen_worker:create_app()'
    ) >"$run_dir/logs/worker-$i.log" 2>&1 &
    echo $! >"$run_dir/worker-$i.pid"
  done

  local prometheus_port=${QAIO_STACK_PROMETHEUS_PORT:-9090} mtail_port=${QAIO_STACK_MTAIL_PORT:-3903}
  if [ "$prometheus_port" != 0 ]; then
    start_monitoring "$upstreams" "$prometheus_port" "$mtail_port"
    export QAIO_NGINX_PROMETHEUS="127.0.0.1:$prometheus_port" QAIO_NGINX_LOG_METRICS="127.0.0.1:$mtail_port"
  fi

  export QAIO_NGINX_UPSTREAMS="${QAIO_NGINX_UPSTREAMS:-$upstreams}"
  # nginx caps each worker at its capacity, derived from the device the workers run on.
  QAIO_DEVICE="${QAIO_DEVICE:-$([ "$gpus" -gt 0 ] && echo cuda || echo cpu)}" \
    "$root/nginx/render-config.sh" "$run_dir/nginx" >/dev/null || { down; exit 1; }
  nginx -p "$run_dir/nginx" -c "$run_dir/nginx/nginx.conf" -e "$run_dir/nginx/logs/error.log" || { down; exit 1; }

  trap 'down; exit 130' INT TERM
  for ((i = 0; i < workers; i++)); do
    wait_ready "http://127.0.0.1:$((base + i))/readyz" "$(cat "$run_dir/worker-$i.pid")" \
      "$run_dir/logs/worker-$i.log" || { down; exit 1; }
  done
  if [ "$prometheus_port" != 0 ]; then
    wait_ready "http://127.0.0.1:$prometheus_port/-/ready" "$(cat "$run_dir/prometheus.pid")" \
      "$run_dir/logs/prometheus.log" || { down; exit 1; }
  fi
  local listen=${QAIO_NGINX_LISTEN:-127.0.0.1:8080}
  case "$listen" in *:*) ;; *) listen="127.0.0.1:$listen" ;; esac
  local url="http://$listen"
  wait_ready "$url/nginx-health" "$(cat "$run_dir/nginx/nginx.pid")" "$run_dir/nginx/logs/error.log" || { down; exit 1; }

  local ready
  ready=$(curl -s "http://127.0.0.1:$base/readyz")
  echo "Qwen All-in-One is up: $url  ($workers workers on ports $base..$((base + workers - 1)))"
  echo "model: $model"
  case "$ready" in
    *'"demo_model":true'*)
      echo "WARNING: DEMO MODEL with random weights: answers are meaningless (\"demo_model\": true)" ;;
    *'"stand_in_model":true'*)
      echo "NOTE: STAND-IN MODEL SmolLM2-135M-Instruct, not Qwen (\"stand_in_model\": true)" ;;
  esac
  if [ "$prometheus_port" != 0 ]; then
    echo "dashboard: $url/dashboard  (Prometheus on 127.0.0.1:$prometheus_port, mtail on 127.0.0.1:$mtail_port)"
  fi
  echo "logs: $run_dir/logs/, $run_dir/nginx/logs/"
  if [ "$detach" = "--detach" ]; then
    trap - INT TERM
    echo "stop it with: make stop"
    return 0
  fi
  echo "Ctrl-C (or make stop) stops everything"
  while [ -f "$run_dir/nginx/nginx.pid" ]; do sleep 1; done
  down
}

# Prometheus (scraping the workers and mtail) and mtail (nginx's access log, over UDP syslog).
start_monitoring() {  # upstreams prometheus_port mtail_port
  local dir="$run_dir/prometheus" targets="" addr
  mkdir -p "$dir/data"
  for addr in ${1//,/ }; do targets="$targets\"$addr\", "; done
  cat >"$dir/prometheus.yml" <<EOF
# Written by scripts/stack.sh for this stack.
global:
  scrape_interval: ${QAIO_STACK_SCRAPE_INTERVAL:-2s}
  evaluation_interval: ${QAIO_STACK_SCRAPE_INTERVAL:-2s}
rule_files: ["$root/deploy/alerts/qaio-rules.yml"]  # the objectives and alerts (make alerts writes it)
scrape_configs:
  - job_name: qaio-worker
    static_configs: [{targets: [${targets%, }]}]
  - job_name: qaio-nginx-log
    static_configs: [{targets: ["127.0.0.1:$3"]}]
EOF
  setsid mtail --progs "$root/nginx/mtail" --logs "udp://127.0.0.1:$3" --address 127.0.0.1 --port "$3" \
    --emit_prog_label=false --logtostderr >"$run_dir/logs/mtail.log" 2>&1 &
  echo $! >"$run_dir/mtail.pid"
  setsid prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --storage.tsdb.retention.time=1d --web.listen-address="127.0.0.1:$2" >"$run_dir/logs/prometheus.log" 2>&1 &
  echo $! >"$run_dir/prometheus.pid"
}

stop_pid() {  # pid file, signal target is the process group (setsid) of a worker
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

down() {
  if [ -f "$run_dir/nginx/nginx.pid" ]; then
    nginx -p "$run_dir/nginx" -c "$run_dir/nginx/nginx.conf" -e "$run_dir/nginx/logs/error.log" -s quit \
      2>/dev/null || true
    for _ in $(seq 50); do [ -f "$run_dir/nginx/nginx.pid" ] || break; sleep 0.1; done
    rm -f "$run_dir/nginx/nginx.pid"
  fi
  local f
  for f in "$run_dir"/worker-*.pid "$run_dir"/prometheus.pid "$run_dir"/mtail.pid; do
    [ -e "$f" ] && stop_pid "$f"
  done
  echo "stack stopped"
}

status() {
  local f i
  for f in "$run_dir"/worker-*.pid; do
    [ -e "$f" ] || { echo "no workers"; break; }
    i=$(basename "$f" .pid)
    if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$i: running (pid $(cat "$f"))"; else echo "$i: dead"; fi
  done
  for f in "$run_dir"/prometheus.pid "$run_dir"/mtail.pid; do
    [ -e "$f" ] || continue
    if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$(basename "$f" .pid): running (pid $(cat "$f"))"; else echo "$(basename "$f" .pid): dead"; fi
  done
  if [ -f "$run_dir/nginx/nginx.pid" ]; then echo "nginx: running (pid $(cat "$run_dir/nginx/nginx.pid"))"; else echo "nginx: stopped"; fi
}

case "${1:-}" in
  up) up "${2:-}" ;;
  down) down ;;
  status) status ;;
  *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac
