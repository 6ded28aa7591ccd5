#!/bin/sh
# `make compose-test`: build both images, bring the CPU compose stack up with podman and the demo
# model, and check it end to end through nginx: API keys on (a request without one is refused),
# answers, balancing across the worker containers, traffic continuing with one worker stopped,
# Prometheus scraping. Always brings everything down.
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
python=${QAIO_PYTHON:-$root/.venv/bin/python}
compose="$(dirname "$python")/podman-compose"
port=${QAIO_COMPOSE_TEST_PORT:-18080}
prom_port=${QAIO_COMPOSE_TEST_PROMETHEUS_PORT:-19090}
demo=${QAIO_COMPOSE_TEST_MODEL:-$root/models/tiny}
wheels=${QAIO_PIP_WHEELS:-/opt/wheels}
ca=${QAIO_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
project=qaio

"$root/deploy/podman/setup.sh"
[ -d "$demo" ] || "$python" -m qaio_models.demo tiny "$demo"

started=$(date +%s)
echo "== building images"
build_args="--format docker --network host"
[ -s "$ca" ] && build_args="$build_args --secret id=ca,src=$ca"
if [ -d "$wheels" ]; then  # local wheels (the CPU torch): no index for torch is reachable here
  build_args="$build_args -v $wheels:/wheels:ro --build-arg PIP_WHEELS=/wheels"
fi
# shellcheck disable=SC2086  # build_args is a list of words
podman build $build_args -f worker/Dockerfile -t qaio-worker:latest .
podman build --format docker -f nginx/Dockerfile -t qaio-nginx:latest .
podman build --format docker --network host -f deploy/mtail/Dockerfile -t qaio-log-exporter:latest .
echo "== images built in $(( $(date +%s) - started )) s"

# A keys directory of its own, with one key, as `make api-key` writes keys/ for a real deployment.
keys_dir=$(mktemp -d)
chmod 755 "$keys_dir"
api_key=$("$root/scripts/api-key.sh" add "$keys_dir/api-keys" compose-test)
export QAIO_PUBLISH_PORT="$port" QAIO_PROMETHEUS_PORT="$prom_port" QAIO_MODEL=/models/demo QAIO_NGINX_RESOLVER="" \
  QAIO_API_KEYS_DIR="$keys_dir"
# Debian's nginx 1.22 in the local stand-in has no `resolve`; the real image (>= 1.27.3) uses it.

healthchecks=""
down() {
  [ -n "$healthchecks" ] && kill "$healthchecks" 2>/dev/null || true
  "$compose" -p "$project" -f compose.cpu.yml down -v >/dev/null 2>&1 || true
  podman volume rm -f "${project}_models" >/dev/null 2>&1 || true  # filled below, so not compose's to remove
}
trap 'down; rm -rf "$keys_dir"' EXIT INT TERM
down

echo "== the demo model into the models volume"
podman volume create "${project}_models" >/dev/null
podman run --rm -v "${project}_models:/models" -v "$demo:/src:ro" localhost/qaio-debian:bookworm \
  sh -c 'rm -rf /models/demo && cp -r /src /models/demo && chown -R 10001:10001 /models'

echo "== up"
# podman runs HEALTHCHECKs from systemd timers; without systemd (containers, CI) run them here.
( while sleep 3; do
    for c in $(podman ps --filter "label=io.podman.compose.project=$project" --format '{{.Names}}'); do
      podman healthcheck run "$c" >/dev/null 2>&1 || true
    done
  done ) &
healthchecks=$!
"$compose" -p "$project" -f compose.cpu.yml up -d

url="http://127.0.0.1:$port"
deadline=$(( $(date +%s) + 600 ))
# Docker Compose starts nginx only once the workers are healthy; podman-compose on podman 4.3 cannot
# wait for health (it says so and starts nginx at once), so wait for the workers' HEALTHCHECK here.
for worker in $(podman ps --filter "label=io.podman.compose.project=$project" --format '{{.Names}}' | grep worker); do
  until [ "$(podman inspect --format '{{.State.Health.Status}}' "$worker")" = healthy ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "$worker never became healthy" >&2; podman logs --tail 30 "$worker"; exit 1; }
    sleep 2
  done
  echo "== $worker healthy after $(( $(date +%s) - started )) s since the build began"
done
until curl -sf -o /dev/null "$url/nginx-health"; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "nginx did not come up" >&2; podman ps -a; exit 1; }
  sleep 2
done
echo "== nginx answers after $(( $(date +%s) - started )) s since the build began"

"$python" - "$url" "http://127.0.0.1:$prom_port" "$api_key" <<'PY'
import collections, json, subprocess, sys, time, urllib.error, urllib.request

url, prometheus, api_key = sys.argv[1], sys.argv[2], sys.argv[3]

def post(path, body, key=api_key):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.load(response)

try:
    post("/v1/chat", {"text": "你好"}, key=None)
    raise AssertionError("served without an API key")
except urllib.error.HTTPError as err:
    assert err.code == 401 and json.load(err)["error"]["code"] == "invalid_api_key", err
print("without an API key: 401")

def spread(tag, count=24):
    served = collections.Counter()
    for i in range(count):
        status, body = post("/v1/sentiment", {"text": f"{tag} 第{i}条评论：味道不错"})
        assert status == 200 and body["sentiment"]["label"] in ("positive", "negative", "neutral"), body
        served[body["instance"]] += 1
    return served

status, chat = post("/v1/chat", {"text": "你好", "max_tokens": 8, "temperature": 0})
assert status == 200 and chat["reply"] is not None, chat
print("chat through nginx:", chat["instance"], chat["usage"])
served = spread("balance")
print("sentiment spread:", dict(served))
assert set(served) == {"worker-0", "worker-1"}, served

stopped = [name for name in subprocess.check_output(
    ["podman", "ps", "--format", "{{.Names}}"], text=True).split() if "worker-0" in name]
subprocess.run(["podman", "stop", "-t", "5", *stopped], check=True, capture_output=True)
served = spread("failover")
print("with worker-0 stopped:", dict(served))
assert set(served) == {"worker-1"}, served

deadline = time.time() + 90
while True:  # Prometheus scrapes every 15 s
    with urllib.request.urlopen(prometheus + "/api/v1/query?query=" + urllib.request.quote(
            'max by (job, instance) (up)'), timeout=10) as response:
        up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1] for r in json.load(response)["data"]["result"]}
    if up.get(("qaio-worker", "worker-1:8001")) == "1" and up.get(("qaio-nginx", "nginx-exporter:9113")) == "1":
        break
    assert time.time() < deadline, f"Prometheus does not see the stack: {up}"
    time.sleep(3)
print("prometheus targets:", up)
PY
echo "== compose test passed in $(( $(date +%s) - started )) s"
