"""The engine link below HTTP, as vLLM tests its engine-core client in both process modes: the one client
interface (client/base.py) against the engine loop on a thread of this process (InProcessClient) and
against a real engine-server subprocess over its Unix socket (RemoteClient): answers, streams,
deadlines, cancellation, a full queue, drain, and (the socket only) the loss of the engine. No HTTP, no
gunicorn; test_contract.py keeps one smoke run of the same promises per layout through real servers."""
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from qaio_testing import eventually
from qwen_worker.client.inprocess import InProcessClient
from qwen_worker.client.remote import RemoteClient
from qwen_worker.config import WorkerConfig
from qwen_worker.engine import GenerationRow
from qwen_worker.engine_process import AUTHKEY_ENV, SOCKET_ENV
from qwen_worker.metrics import WorkerMetrics
from qwen_worker.model import ModelService
from qwen_worker.prompts import Message
from qwen_worker.protocol import RequestFailed

SETTINGS = {"QAIO_DTYPE": "float32", "QAIO_MAX_BATCH_SIZE": "2", "QAIO_QUEUE_CAPACITY": "1", "QAIO_TORCH_THREADS": "1",
            "QAIO_MAX_TOKENS_LIMIT": "1000"}
LONG = 1000  # max_tokens of a generation meant to be stopped early


def started(client):
    """The client, started, once its engine says it is ready."""
    client.start()

    def ready() -> bool:
        status = client.status()
        assert status.state != "failed", f"the engine failed to load: {status.load_error}"
        return status.ready

    eventually(ready, timeout=300, what="the engine ready")
    return client


class EngineProcess:
    """qwen_worker.engine_server in a subprocess, as gunicorn's master starts it, and a client of it."""

    def __init__(self, env: dict, tmp_path):
        self.address = str(tmp_path / "engine.sock")
        authkey = secrets.token_bytes(16)
        self.log = open(tmp_path / "engine.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen_worker.engine_server"],
                                     env={**os.environ, **env, SOCKET_ENV: self.address, AUTHKEY_ENV: authkey.hex()},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.client = RemoteClient(WorkerConfig.from_env(env), WorkerMetrics(CollectorRegistry()), self.address, authkey)

    def stop(self):
        self.client.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.log.close()


LAYOUTS = ["in-process", "engine-process"]


@contextlib.contextmanager
def open_link(layout: str, env: dict, tmp_path_factory):
    """A started client of an engine with settings `env`: on a thread of this process, or in an
    engine-server subprocess over its socket; stopped on exit."""
    if layout == "engine-process":
        process = EngineProcess(env, tmp_path_factory.mktemp("engine"))
        try:
            yield started(process.client)
        finally:
            process.stop()
        return
    client = InProcessClient(WorkerConfig.from_env(env), WorkerMetrics(CollectorRegistry()))
    try:
        yield started(client)
    finally:
        client.stop()


@pytest.fixture(scope="module", params=LAYOUTS)
def link(request, tiny_model_dir, tmp_path_factory):
    with open_link(request.param, {"QAIO_MODEL": tiny_model_dir, **SETTINGS}, tmp_path_factory) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The engine alone (no client, no loop): what the link must pass through unchanged."""
    service = ModelService(WorkerConfig.from_env({"QAIO_MODEL": tiny_model_dir, **SETTINGS}))
    service.load()
    return service


def chat_ids(client, text):
    return client.prompter.chat_ids([Message("user", text)])


def soon(seconds=60.0):
    return time.monotonic() + seconds


def engine_status(client):
    """The engine's state as it answers a Control now (a remote client's status() is the last one pushed)."""
    return client.control("status")


def idle(client):
    eventually(lambda: engine_status(client).busy == 0, what="the engine holds no request")


def outcome(submit) -> str:
    """The error code of a request, whether refused at submission (in process) or as its final output."""
    try:
        submit().wait()
    except RequestFailed as failed:
        return failed.code
    return "ok"


def test_answers_through_the_link_are_the_engines_own(link, reference):
    prompt = chat_ids(link, "你好，介绍一下你自己")
    handle = link.generate("chat", prompt, soon(), 12).wait()
    row = GenerationRow(prompt, 12)
    reference.engine.run([row])
    assert handle.tokens == row.tokens and handle.finish_reason == row.finish_reason
    assert handle.batch_size >= 1 and handle.started_at is not None and handle.finished_at >= handle.started_at
    scores = link.sentiment("sentiment", link.prompter.sentiment_ids("味道很好", "zh"), soon()).wait().scores
    assert scores and abs(sum(scores.values()) - 1) < 1e-4 and all(0 <= s <= 1 for s in scores.values())


def test_a_stream_arrives_in_pieces_that_add_up_to_the_answer(link):
    prompt = chat_ids(link, "tell me a story")
    whole = link.generate("chat", prompt, soon(), 24).wait().tokens
    handle = link.generate("chat", prompt, soon(), 24, stream=True)
    pieces = []
    while True:
        output = handle.receive()
        if output.tokens:
            pieces.append(list(output.tokens))
        if output.final:
            break
    assert sum(pieces, []) == whole and len(pieces) > 1


def test_a_deadline_ends_a_running_generation_with_what_it_made(link):
    handle = link.generate("chat", chat_ids(link, "write forever"), time.monotonic() + 0.5, LONG, stream=True)
    handle.wait()  # the engine ends the row at its deadline, and says so within the handle's grace
    assert handle.finish_reason == "deadline" and 0 < len(handle.tokens) < LONG
    idle(link)


def test_a_cancelled_generation_leaves_its_slot(link):
    handle = link.generate("chat", chat_ids(link, "a long story"), soon(), LONG, stream=True)
    handle.receive()  # generating now
    handle.cancel()
    idle(link)
    assert len(handle.tokens) < LONG


def test_a_full_queue_refuses_at_once_and_frees_nothing_it_holds(link):
    # "a long story": a prompt the tiny model does not end early (its random weights end some at once).
    held = [link.generate("chat", chat_ids(link, "a long story"), soon(), LONG, stream=True) for _ in range(2)]
    for handle in held:
        handle.receive()  # both slots generating
    queued = link.generate("chat", chat_ids(link, "next"), soon(), 2)
    eventually(lambda: engine_status(link).queue_depth == 1, what="the third request waits in the queue")
    assert outcome(lambda: link.generate("chat", chat_ids(link, "fourth"), soon(), 2)) == "queue_full"
    for handle in held:
        handle.cancel()
    assert queued.wait().finish_reason in ("stop", "length")  # it got a slot once they left
    idle(link)


def test_sentiments_sent_together_are_answered_as_each_alone_and_refused_each_alone(link):
    prompts = [link.prompter.sentiment_ids(text, "zh") for text in ("好吃", "太难吃了", "一般般")]
    alone = [link.sentiment("sentiment", prompt, soon()).wait().scores for prompt in prompts]
    sent = []
    if isinstance(link, RemoteClient):  # together: one frame on the socket
        send_bytes = link._conn.send_bytes
        link._conn.send_bytes = lambda data: (sent.append(data), send_bytes(data))[1]
    try:
        together = link.sentiments("sentiment", prompts, soon())
    finally:
        if isinstance(link, RemoteClient):
            del link._conn.send_bytes
            assert len(sent) == 1
    # Scored in one pass, padded otherwise than alone: equal to float rounding.
    assert [job.wait().scores for job in together] == [pytest.approx(scores, abs=1e-5) for scores in alone]
    # Refused (draining): each one, in process at once, over the socket as its final output.
    assert link.control("drain").draining is True
    try:
        jobs = link.sentiments("sentiment", prompts, soon())
    finally:
        link.control("undrain")
    assert [job.code if isinstance(job, RequestFailed) else outcome(lambda job=job: job) for job in jobs] == \
        ["draining"] * 3
    idle(link)


def test_drain_refuses_new_work_and_undrain_takes_it_again(link):
    assert link.control("drain").draining is True
    assert outcome(lambda: link.sentiment("sentiment", link.prompter.sentiment_ids("还开着吗", "zh"), soon())) == "draining"
    assert link.control("undrain").draining is False
    assert outcome(lambda: link.sentiment("sentiment", link.prompter.sentiment_ids("还开着吗", "zh"), soon())) == "ok"


def test_a_lost_engine_process_fails_what_it_held_at_once(tiny_model_dir, tmp_path):
    process = EngineProcess({"QAIO_MODEL": tiny_model_dir, **SETTINGS}, tmp_path)
    try:
        client = started(process.client)
        held = client.generate("chat", chat_ids(client, "a long story"), soon(), LONG, stream=True)
        held.receive()
        process.proc.kill()
        with pytest.raises(RequestFailed) as failed:
            held.wait()
        assert failed.value.code == "engine_lost"
        assert client.status().state == "failed"
        assert outcome(lambda: client.generate("chat", [1, 2, 3], soon(), 2)) == "engine_lost"
    finally:
        process.stop()


def test_an_unreadable_message_from_the_engine_fails_the_instance_instead_of_hanging(tmp_path):
    """A receiving thread that died on a bad message would leave every request waiting until its deadline."""
    import threading
    from multiprocessing.connection import Listener

    from qwen_worker.protocol import Output, encode_batch, hello

    authkey = secrets.token_bytes(16)
    with Listener(str(tmp_path / "engine.sock"), family="AF_UNIX", authkey=authkey) as listener:
        client = RemoteClient(WorkerConfig.from_env(SETTINGS), WorkerMetrics(CollectorRegistry()), listener.address,
                              authkey)
        accepted = {}
        acceptor = threading.Thread(target=lambda: accepted.update(conn=listener.accept()))
        acceptor.start()
        client.start()
        acceptor.join(60)
        engine = accepted["conn"]
        engine.recv_bytes()  # the client's hello
        engine.send_bytes(hello())

        def submitted():  # once the client has the connection (it is not reachable before)
            try:
                return client.generate("chat", [1, 2, 3], soon(), 4)
            except RequestFailed:
                return None

        held = eventually(submitted, what="the client connected")  # waits for an answer that will not come
        assert engine.recv_bytes()  # the request, as the engine would receive it
        engine.send_bytes(encode_batch([Output(1, tokens=[5])])[:-1])  # a truncated message
        with pytest.raises(RequestFailed) as failed:
            held.wait()
        assert failed.value.code == "engine_lost"
        assert client.status().state == "failed" and "a message from the engine process failed" in client.lost
        engine.close()


def test_a_wrong_key_fails_the_instance_instead_of_loading_forever(tmp_path):
    import threading
    from multiprocessing.connection import AuthenticationError, Listener

    with Listener(str(tmp_path / "engine.sock"), family="AF_UNIX", authkey=b"right" * 8) as listener:
        client = RemoteClient(WorkerConfig.from_env(SETTINGS), WorkerMetrics(CollectorRegistry()), listener.address,
                              b"wrong" * 8)
        refused = []

        def accept():
            try:
                listener.accept().close()
            except AuthenticationError:
                refused.append(True)

        acceptor = threading.Thread(target=accept)
        acceptor.start()
        client.start()
        acceptor.join(60)
        assert refused, "the engine's end admitted a client with the wrong key"
        eventually(lambda: client.status().state == "failed", what="the client gives up")
        assert "could not connect to the engine process: AuthenticationError" in client.lost
