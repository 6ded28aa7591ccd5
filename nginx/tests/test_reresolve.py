"""Kubernetes' path, on this machine: nginx re-resolves the workers' name (`resolve` on the upstream
servers, QAIO_NGINX_RESOLVER), as it does for the headless Service's pods, and follows a new address.

Debian 12's nginx (1.22) has no `resolve`; scripts/fetch-nginx.sh unpacks Debian unstable's, which has
(1.27.3 or later, as in the nginx image). A name server of the test's own (dnslib) answers the workers' name."""
import subprocess
import uuid

import pytest
import requests
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSServer

from qaio_testing import REPO, SHARED_CPU_WORKER_ENV, NginxServer, eventually, served_by

pytestmark = [pytest.mark.nginx, pytest.mark.tool]
NAME = "workers.qaio.test."


class OneName(BaseResolver):
    """Answers NAME with `address` (one second to live), whatever it is at the time of asking."""

    def __init__(self, address: str):
        self.address = address

    def resolve(self, request, handler):
        reply = request.reply()
        if str(request.q.qname) == NAME and request.q.qtype == QTYPE.A:
            reply.add_answer(RR(NAME, QTYPE.A, rdata=A(self.address), ttl=1))
        return reply


@pytest.fixture(scope="module")
def nginx_with_resolve() -> str:
    fetched = subprocess.run([str(REPO / "scripts" / "fetch-nginx.sh")], capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    return fetched.stdout.strip().splitlines()[-1]


def test_nginx_follows_the_workers_name_to_its_new_address(gunicorn_server, nginx_with_resolve):
    first = gunicorn_server(host="127.0.0.2", **SHARED_CPU_WORKER_ENV)
    second = gunicorn_server(host="127.0.0.3", port=first.port, **SHARED_CPU_WORKER_ENV)  # the same port
    names = OneName("127.0.0.2")
    dns = DNSServer(names, address="127.0.0.1", port=0)
    dns.start_thread()
    proxy = None
    try:
        resolver = f"127.0.0.1:{dns.server.server_address[1]}"
        proxy = NginxServer([f"{NAME.rstrip('.')}:{first.port}"], binary=nginx_with_resolve,
                            QAIO_NGINX_RESOLVER=resolver, QAIO_MODEL=first.model)

        def answered_by() -> str:
            response = requests.post(proxy.url + "/v1/sentiment", json={"text": f"好吃 {uuid.uuid4()}"}, timeout=30)
            assert response.status_code == 200, response.text
            return served_by(response.headers)

        assert answered_by() == first.address
        names.address = "127.0.0.3"  # the pod went; another has the name now
        eventually(lambda: answered_by() == second.address, timeout=60,
                   interval=0.5, what=f"nginx sending {NAME} to {second.address} (it re-resolves every 10 s)")
    finally:
        if proxy is not None:
            proxy.stop()
        dns.stop()
