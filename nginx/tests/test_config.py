"""The rendered configuration: valid for nginx, clean for gixy, the settings really applied."""
import os
import shutil
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from qaio_testing import RENDER_NGINX

pytestmark = pytest.mark.tool


def render(tmp_path: Path, **settings) -> Path:
    env = {**os.environ, **settings}
    out = subprocess.run([str(RENDER_NGINX), str(tmp_path)], env=env, check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


VARIANTS = {
    "defaults": {},
    "ip_hash": {"QAIO_NGINX_STRATEGY": "ip_hash"},
    "weighted round robin": {"QAIO_NGINX_STRATEGY": "round_robin", "QAIO_NGINX_WEIGHTS": "1,3",
                             "QAIO_NGINX_UPSTREAMS": "127.0.0.1:9001,127.0.0.1:9002"},
    "four workers": {"QAIO_NGINX_UPSTREAMS": "127.0.0.1:9001,127.0.0.1:9002,127.0.0.1:9003,127.0.0.1:9004"},
}


@pytest.mark.parametrize("settings", VARIANTS.values(), ids=VARIANTS.keys())
def test_rendered_config_passes_nginx_t_and_gixy(tmp_path, settings):
    assert_nginx_t_and_gixy_pass(tmp_path, render(tmp_path, **settings))


def assert_nginx_t_and_gixy_pass(tmp_path: Path, conf: Path) -> None:
    checked = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "err.log")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    gixy = subprocess.run([str(Path(sys.executable).parent / "gixy"), "-f", "json", str(conf)], capture_output=True,
                          text=True)
    assert gixy.returncode in (0, 1), gixy.stderr
    issues = [issue for issue in json.loads(gixy.stdout) if not is_the_upstream_choice(issue)]
    assert issues == [], issues


def is_the_upstream_choice(issue: dict) -> bool:
    """gixy's one false finding: `proxy_pass http://$qaio_upstream` "needs a resolver", but the variable
    only ever names one of the two upstream groups (a map of constants), which nginx finds without DNS."""
    return (issue["plugin"] == "missing_resolver" and issue["file"].endswith("qaio-proxy.inc")
            and "proxy_pass http://$qaio_upstream;" in issue["config"]
            and "qaio_upstream" in (Path(issue["file"]).read_text().splitlines()[issue["line"] - 1]))


def test_settings_reach_the_config(tmp_path):
    conf = render(tmp_path, QAIO_NGINX_STRATEGY="round_robin", QAIO_NGINX_WEIGHTS="2,5",
                  QAIO_NGINX_UPSTREAMS="10.0.0.1:8001,10.0.0.2:8001", QAIO_NGINX_MAX_FAILS="4",
                  QAIO_NGINX_FAIL_TIMEOUT="7s", QAIO_NGINX_CHAT_RATE="9r/s", QAIO_NGINX_MAX_BODY="32k")
    text = (conf.parent / "conf.d" / "qaio.conf").read_text()
    assert "server 10.0.0.1:8001 weight=2 max_conns=80 max_fails=4 fail_timeout=7s;" in text
    assert "server 10.0.0.2:8001 weight=5 max_conns=80 max_fails=4 fail_timeout=7s;" in text
    assert "least_conn;" not in text and "ip_hash;" not in text
    assert "rate=9r/s" in text and "client_max_body_size 32k;" in text and "client_body_buffer_size 32k;" in text
    proxy = "".join((conf.parent / "conf.d" / name).read_text() for name in ("qaio-proxy.inc", "qaio-upstream.inc"))
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in proxy
    assert "${" not in text + proxy, "every template variable must be substituted"
    cache = (conf.parent / "conf.d" / "qaio-cache.inc").read_text()
    assert "$request_body" in cache and "$upstream_addr" in (conf.parent / "conf.d" / "qaio-headers.inc").read_text()
    assert "proxy_buffer_size 40960;" in cache  # the 32k body fits the cache key's buffer
    assert "limit_conn qaio_per_client 32;" in proxy  # two CPU workers' slots per client address by default


def test_a_resolver_makes_upstream_names_re_resolved(tmp_path):
    conf = render(tmp_path, QAIO_NGINX_RESOLVER="10.96.0.10", QAIO_NGINX_UPSTREAMS="workers.qaio.svc:8001")
    text = (conf.parent / "conf.d" / "qaio.conf").read_text()
    assert "resolver 10.96.0.10 valid=10s ipv6=off;" in text
    assert "server workers.qaio.svc:8001 weight=1 max_conns=80 max_fails=0 fail_timeout=10s resolve;" in text


@pytest.mark.parametrize("settings", [
    {"QAIO_DEVICE": "cpu"}, {"QAIO_DEVICE": "cuda"}, {"QAIO_DEVICE": "cuda:1", "QAIO_MAX_BATCH_SIZE": "64"},
    {"QAIO_MAX_BATCH_SIZE": "8", "QAIO_QUEUE_CAPACITY": "12"}, {"QAIO_DEVICE": "cpu", "QAIO_MAX_BATCH_SIZE": "40"},
])
def test_max_conns_per_worker_is_the_workers_own_capacity(tmp_path, settings):
    """nginx and the worker derive one bound from the same variables by the same rule."""
    from qwen_worker.config import WorkerConfig

    conf = render(tmp_path, QAIO_NGINX_UPSTREAMS="10.0.0.1:8001", **settings)
    text = (conf.parent / "conf.d" / "qaio.conf").read_text()
    capacity = WorkerConfig.from_env(settings).capacity
    assert f"server 10.0.0.1:8001 weight=1 max_conns={capacity} " in text


def test_nginx_waits_past_the_longest_deadline(tmp_path):
    conf = render(tmp_path, QAIO_CHAT_DEADLINE_MS="45000")
    assert "proxy_read_timeout 55s;" in (conf.parent / "conf.d" / "qaio-upstream.inc").read_text()
    assert "proxy_read_timeout 130s;" in (render(tmp_path / "default").parent / "conf.d" / "qaio-upstream.inc").read_text()


@pytest.mark.parametrize("settings, message", [
    ({"QAIO_NGINX_STRATEGY": "random"}, "QAIO_NGINX_STRATEGY"),
    ({"QAIO_NGINX_UPSTREAMS": ","}, "QAIO_NGINX_UPSTREAMS"),
    ({"QAIO_NGINX_KEY_RATE": "20"}, "QAIO_NGINX_KEY_RATE"),
    ({"QAIO_NGINX_KEY_CONN": "0"}, "QAIO_NGINX_KEY_CONN"),
    ({"QAIO_API_KEYS_FILE": "/nonexistent/api-keys"}, "cannot be read"),
])
def test_bad_settings_stop_rendering_with_a_message(tmp_path, settings, message):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(tmp_path, **settings)
    assert message in err.value.stderr


def test_the_admin_token_is_checked_like_the_workers_check_it(tmp_path):
    """nginx compares the token inside its config, so it refuses what the worker's config refuses."""
    for bad in ("short-token", 'quote"and$dollar-0123456789'):
        with pytest.raises(subprocess.CalledProcessError) as err:
            render(tmp_path, QAIO_ADMIN_TOKEN=bad)
        assert "QAIO_ADMIN_TOKEN" in err.value.stderr
    conf_d = render(tmp_path, QAIO_ADMIN_TOKEN="good-token_0123456789~+/=").parent / "conf.d"
    assert (conf_d / "qaio-admin-token.inc").read_text() == '"~^(?i:bearer) good-token_0123456789~\\+/=$" 1;\n'
    assert "location ~ ^/admin/127\\.0\\.0\\.1:8001(/(?:drain|undrain|state))$" in (conf_d / "qaio.conf").read_text()
    unset = (render(tmp_path / "unset").parent / "conf.d" / "qaio-admin-token.inc").read_text()
    assert "bearer" not in unset.lower() and "admin endpoints disabled" in unset


def test_the_admin_token_is_in_no_file_others_can_read(tmp_path):
    token = "Secret.Token+0123456789"
    conf = render(tmp_path, QAIO_ADMIN_TOKEN=token)
    holding = [path for path in tmp_path.rglob("*") if path.is_file() and token.encode() in path.read_bytes()]
    assert holding == []  # the file holds it as a pattern, escaped
    token_file = conf.parent / "conf.d" / "qaio-admin-token.inc"
    assert token_file.stat().st_mode & 0o077 == 0
    assert token_file.read_text() == '"~^(?i:bearer) Secret\\.Token\\+0123456789$" 1;\n'
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != token_file:
            assert b"Token" not in path.read_bytes(), path


def test_real_ip_and_the_per_client_cap_are_settings(tmp_path):
    conf = render(tmp_path, QAIO_NGINX_REAL_IP_FROM="10.0.0.0/8,fd00::/8", QAIO_NGINX_CONN_PER_CLIENT="0")
    text = (conf.parent / "conf.d" / "qaio.conf").read_text()
    assert "set_real_ip_from 10.0.0.0/8; set_real_ip_from fd00::/8;" in text and "real_ip_recursive on;" in text
    assert "limit_conn qaio_per_client" not in (conf.parent / "conf.d" / "qaio-proxy.inc").read_text()
    bad = subprocess.run([str(RENDER_NGINX), str(tmp_path / "bad")], capture_output=True, text=True,
                         env={**os.environ, "QAIO_NGINX_REAL_IP_FROM": "10.0.0.0/8; allow all"})
    assert bad.returncode != 0 and "QAIO_NGINX_REAL_IP_FROM" in bad.stderr


def keys_file(tmp_path: Path, text: str) -> Path:
    """A keys file nginx's workers could read (nobody, when started as root)."""
    tmp_path.chmod(0o755)
    path = tmp_path / "api-keys"
    path.write_text(text)
    path.chmod(0o644)
    return path


GOOD_KEYS = f"# comment\nalice:sha256:{'a' * 64}\n\nbob:sha256:{'b' * 64} rate=2r/m conn=3  # trailing\r\n"


def test_rendered_config_with_api_keys_passes_nginx_t_and_gixy(tmp_path):
    conf = render(tmp_path / "out", QAIO_API_KEYS_FILE=str(keys_file(tmp_path, GOOD_KEYS)), QAIO_MAX_BATCH_SIZE="16")
    assert_nginx_t_and_gixy_pass(tmp_path / "out", conf)
    keys = (conf.parent / "conf.d" / "qaio-keys.inc").read_text()
    assert "js_set $qaio_key qaio_keys.key;" in keys and "js_var $qaio_key_default_conn 8;" in keys  # half of 16
    assert "js_var $qaio_key_default_rate 20r/s;" in keys
    assert "load_module " in conf.read_text()
    limits = (conf.parent / "conf.d" / "qaio-key-limits.inc").read_text()
    assert limits.rstrip().endswith("auth_request /_qaio_key_check;")  # after every limit: wrong tries count
    assert "limit_req zone=qaio_bad_key burst=20 nodelay;" in limits


def test_without_api_keys_nothing_of_them_is_loaded(tmp_path):
    conf = render(tmp_path)
    assert "load_module" not in conf.read_text()
    assert "js_" not in (conf.parent / "conf.d" / "qaio-keys.inc").read_text()
    assert "auth_request" not in (conf.parent / "conf.d" / "qaio-key-limits.inc").read_text()


@pytest.mark.parametrize("text, lines", [
    (f"alice:sha256:{'a' * 63}\n", "1"),  # a short hash
    (f"alice:{'a' * 64}\nok:sha256:{'a' * 64}\nbad name:sha256:{'a' * 64}\n", "1 3"),
    (f"alice:sha256:{'a' * 64} rate=fast\n", "1"),
    (f"alice:sha256:{'A' * 64}\n", "1"),  # sha256sum writes lower case; upper case would never match
    ("plain-key-in-the-file\n", "1"),
])
def test_a_malformed_keys_file_stops_rendering_naming_its_lines(tmp_path, text, lines):
    with pytest.raises(subprocess.CalledProcessError) as err:
        render(tmp_path / "out", QAIO_API_KEYS_FILE=str(keys_file(tmp_path, text)))
    assert f"line(s) {lines} are not" in err.value.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="nginx's workers change user only when it starts as root")
def test_a_keys_file_nginxs_workers_cannot_read_stops_rendering():
    # A prefix nobody can reach (not under pytest's private tmp), so nginx's workers will run as nobody.
    base = Path(tempfile.mkdtemp(prefix="qaio-keys-"))
    try:
        path = keys_file(base, GOOD_KEYS)
        render(base / "readable", QAIO_API_KEYS_FILE=str(path))
        path.chmod(0o600)
        with pytest.raises(subprocess.CalledProcessError) as err:
            render(base / "unreadable", QAIO_API_KEYS_FILE=str(path))
        assert "cannot read QAIO_API_KEYS_FILE" in err.value.stderr
    finally:
        shutil.rmtree(base)
