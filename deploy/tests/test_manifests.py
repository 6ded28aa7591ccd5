"""Static checks of what users deploy: compose files, Kubernetes manifests and Dockerfiles."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.tool

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ["k8s", "k8s/overlays/queue-depth"]
DOCKERFILES = ["worker/Dockerfile", "nginx/Dockerfile"]
TOOLS = Path(sys.executable).parent
CHECKOV = TOOLS.parent / "checkov" / "bin" / "checkov"  # its own venv (make install): it pins packaging<24


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def kustomize(path: str) -> list[dict]:
    assert shutil.which("kubectl"), "kubectl is needed (scripts/install-system-deps.sh installs it)"
    built = run("kubectl", "kustomize", path)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.mark.parametrize("args, path", [
    (["--gpus", "2"], "docker-compose.yml"),
    (["--cpu-workers", "2"], "compose.cpu.yml"),
    (["--gpus", "2", "--prometheus"], "deploy/prometheus/compose.yml"),
])
def test_checked_in_compose_files_are_the_generators_output(args, path):
    generated = run(sys.executable, "deploy/compose.py", *args)
    assert generated.returncode == 0, generated.stderr
    assert (REPO / path).read_text() == generated.stdout, f"{path} is stale: python deploy/compose.py {' '.join(args)}"


def test_each_gpu_worker_is_pinned_to_its_own_gpu_and_only_nginx_publishes():
    compose = yaml.safe_load(run(sys.executable, "deploy/compose.py", "--gpus", "3").stdout)
    services = compose["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    pinned = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in workers.values()]
    assert pinned == [["0"], ["1"], ["2"]]
    assert all("ports" not in s and s["networks"] == ["backend"] for s in workers.values())
    assert compose["networks"]["backend"]["internal"] is True
    assert set(services["nginx"]["depends_on"]) == set(workers) | {"nginx-log-exporter"}
    assert all(services["nginx"]["depends_on"][w] == {"condition": "service_healthy"} for w in workers)
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports)
    assert services["nginx"]["environment"]["QAIO_NGINX_UPSTREAMS"] == "worker-0:8001,worker-1:8001,worker-2:8001"
    chosen = yaml.safe_load(run(sys.executable, "deploy/compose.py", "--gpu-ids", "2,5").stdout)["services"]
    assert [chosen[f"worker-{i}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for i in range(2)] == [["2"], ["5"]]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomizations_build_and_validate_against_the_kubernetes_schemas(path, tmp_path):
    documents = kustomize(path)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(documents))
    checked = run(str(TOOLS / "kubernetes-validate"), "--strict", "--kubernetes-version", "1.33", str(rendered))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_hpa_scales_on_gpu_use_and_queue_depth_as_pods_metrics_never_on_a_gpu_resource_metric():
    for path, metrics in (("k8s", ["qaio_gpu_utilization_percent", "qaio_queue_depth"]),
                          ("k8s/overlays/queue-depth", ["qaio_queue_depth"])):
        (hpa,) = [d for d in kustomize(path) if d["kind"] == "HorizontalPodAutoscaler"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"] * len(metrics)
        assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == metrics
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_nginx_pods_mount_configmaps_generated_from_the_repository_templates():
    documents = kustomize("k8s")
    maps = {d["metadata"]["name"].rsplit("-", 1)[0]: d for d in documents if d["kind"] == "ConfigMap"}
    templates = maps["qaio-nginx-templates"]["data"]
    for template in (REPO / "nginx" / "templates").glob("*.template"):
        assert templates[template.name] == template.read_text(), f"{template.name} differs from the repository"
    assert maps["qaio-nginx-entrypoint"]["data"]["qaio-env.envsh"] == (REPO / "nginx/qaio-env.envsh").read_text()
    (nginx,) = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "qaio-nginx"]
    env = {e["name"]: e.get("value") for e in nginx["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["QAIO_NGINX_RESOLVER"] and env["QAIO_NGINX_UPSTREAMS"].startswith("qaio-worker.")
    (service,) = [d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "qaio-worker"]
    assert service["spec"]["clusterIP"] == "None", "headless, so nginx sees every pod"


def test_worker_pods_are_locked_down_and_outlive_their_longest_request():
    (worker,) = [d for d in kustomize("k8s") if d["kind"] == "Deployment" and d["metadata"]["name"] == "qaio-worker"]
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    from qwen_worker.config import WorkerConfig

    graceful = WorkerConfig().chat_deadline_ms / 1000 + 10  # gunicorn.conf.py's graceful_timeout
    assert pod["terminationGracePeriodSeconds"] > graceful
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)


def test_checkov_passes_on_the_rendered_manifests_and_the_dockerfiles(tmp_path):
    for i, path in enumerate(KUSTOMIZATIONS):
        (tmp_path / f"k8s-{i}.yaml").write_text(yaml.safe_dump_all(kustomize(path)))
    for dockerfile in DOCKERFILES:
        target = tmp_path / dockerfile.replace("/", "-")
        target.write_text((REPO / dockerfile).read_text())
    report = run(str(CHECKOV), "--directory", str(tmp_path), "--framework", "kubernetes", "dockerfile",
                 "--quiet", "--compact", "--output", "json", "--skip-download")
    assert report.returncode == 0, report.stdout[-6000:] + report.stderr[-2000:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    linted = run(str(TOOLS / "hadolint"), "--failure-threshold", "style", dockerfile)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_prometheus_pods_reach_the_metrics_port_and_nothing_else_of_a_worker():
    """The monitoring namespace's Prometheus pods (no other pod there) reach only the port that serves
    /metrics alone; the front door reaches the API port. The PodMonitor scrapes that metrics port."""
    documents = kustomize("k8s")
    (policy,) = [d for d in documents if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "qaio-worker"]
    (worker,) = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "qaio-worker"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QAIO_METRICS_PORT"] == str(ports["metrics"]) and ports["http"] == 8001
    rules = {tuple(sorted(peer)): [p["port"] for p in rule["ports"]] for rule in policy["spec"]["ingress"]
             for peer in rule["from"]}
    assert rules == {("podSelector",): [8001], ("namespaceSelector", "podSelector"): [ports["metrics"]]}
    monitoring = next(peer for rule in policy["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" in peer)
    assert monitoring["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    podmonitor = yaml.safe_load((REPO / "k8s" / "monitoring" / "worker-podmonitor.yaml").read_text())
    assert [e["port"] for e in podmonitor["spec"]["podMetricsEndpoints"]] == ["metrics"]


def test_compose_runs_the_front_door_locked_down_like_the_workers():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("nginx", "worker-0"):
        service = services[name]
        assert service["read_only"] and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    assert services["nginx"]["cap_add"] == ["CHOWN", "SETGID", "SETUID"] and "/etc/nginx/conf.d" in services["nginx"]["tmpfs"]
