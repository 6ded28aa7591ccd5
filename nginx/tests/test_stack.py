"""The local stack as a newcomer runs it: scripts/stack.sh up, README's curl examples, down."""
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import requests

from qaio_testing import REPO, STACK_SCRIPT, LocalStack, http_status

pytestmark = pytest.mark.stack


def readme_curl_commands() -> list[str]:
    """Every curl command in the shell blocks of README and the API page, continuation lines joined."""
    readme = "\n".join((REPO / page).read_text(encoding="utf-8") for page in ("README.md", "docs/api.md"))
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("curl "):
                commands.append(command.strip())
    return commands


@pytest.fixture()
def stack(tiny_model_dir):
    started = LocalStack(tiny_model_dir)
    yield started
    started.stop()


def test_stack_serves_readme_examples_through_nginx_and_stops_cleanly(stack):
    assert f"Qwen All-in-One is up: {stack.url}" in stack.output
    assert "DEMO MODEL" in stack.output
    commands = readme_curl_commands()
    assert len([c for c in commands if "127.0.0.1:8080" in c]) >= 6, "README and docs/api.md should show the API through nginx"
    assert any("127.0.0.1:8001" in c for c in commands), "README should show a worker on its own"
    for command in commands:
        command = command.replace("http://127.0.0.1:8080", stack.url)
        args = shlex.split(command.replace("http://127.0.0.1:8001", f"http://{stack.worker_addresses[0]}"))
        done = subprocess.run(args + ["-w", "\n%{http_code}"], capture_output=True, text=True, timeout=120)
        body, status = done.stdout.rsplit("\n", 1)
        assert done.returncode == 0 and status == "200", (command, status, body[:300])
        if "text/event-stream" not in body and not body.startswith("data: "):
            json.loads(body)
    workers = sorted(stack.dir.glob("worker-*.pid"))
    assert len(workers) == 2
    pids = [int(p.read_text()) for p in workers]
    down = stack.stop()
    assert down.returncode == 0 and "stack stopped" in down.stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert http_status(stack.url + "/nginx-health") is None


def test_stack_refuses_to_start_twice(stack):
    again = subprocess.run([str(STACK_SCRIPT), "up", "--detach"], env=stack.env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already running" in again.stderr
    assert requests.get(stack.url + "/nginx-health", timeout=10).status_code == 200
