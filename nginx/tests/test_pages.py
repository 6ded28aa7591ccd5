"""Both pages nginx serves, driven in real headless Chromium against real workers: the conversation page
(`/`) and the operator dashboard (`/dashboard`, over the real Prometheus of `make run`'s stack).
Screenshots go to artifacts/screenshots/; with QAIO_DOCS_SCREENSHOTS=1 also to docs/img/ (README's)."""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ADMIN_TOKEN
from qaio_testing import REPO, add_api_key, eventually, scratch_dir, served_by
from qaio_testing import metric as worker_metric

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = REPO / "artifacts" / "screenshots"


@pytest.fixture()
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/install-system-deps.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", "--lang=en-US",
                 f"--user-data-dir={scratch_dir('qaio-chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to read the request bodies sent
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def screenshot(browser, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    if os.environ.get("QAIO_DOCS_SCREENSHOTS") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(REPO / "docs" / "img" / f"{name}.png"))


def sent_posts(browser, path: str) -> list[tuple[dict, dict]]:
    """(JSON body, headers) of the POSTs to `path` the page sent, from Chromium's network log (reading
    the log empties it: what was read is kept on the driver)."""
    seen = browser.__dict__.setdefault("qaio_posts", [])
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            if request["method"] == "POST":
                seen.append((request["url"], json.loads(request.get("postData") or "null"), request.get("headers", {})))
    return [(body, headers) for url, body, headers in seen if url.endswith(path)]


def sent_bodies(browser, path: str) -> list[dict]:
    return [body for body, _ in sent_posts(browser, path)]


def conversation_ids(browser, path: str) -> list[str | None]:
    """The X-Conversation-Id each POST to `path` carried (nginx routes a conversation's turns by it)."""
    return [{k.lower(): v for k, v in headers.items()}.get("x-conversation-id")
            for _, headers in sent_posts(browser, path)]


def set_max_tokens(browser, n: int) -> None:
    field = browser.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(n))


def turns(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#turns .turn")


def wait_turn(browser, index: int, states=("done",), timeout: float = 90):
    WebDriverWait(browser, timeout).until(
        lambda d: len(turns(d)) > index and turns(d)[index].get_attribute("data-state") in states)
    return turns(browser)[index]


# ---- the conversation page --------------------------------------------------------------------------
def test_a_two_turn_conversation_with_badges_streamed_replies_and_both_languages(workers, nginx, browser):
    proxy = nginx(workers)
    browser.get(proxy.url + "/")
    assert browser.title == "Qwen All-in-One"
    if browser.find_element(By.ID, "lang").text == "EN":  # start in English
        browser.find_element(By.ID, "lang").click()
    assert browser.find_element(By.ID, "mode-auto").is_selected()
    box = browser.find_element(By.ID, "input")
    assert box == browser.switch_to.active_element  # ready for typing, no mouse needed
    set_max_tokens(browser, 24)
    box.click()

    box.send_keys("The delivery was fast and the food was great", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "thanks!")
    assert len(turns(browser)) == 0  # Shift+Enter is a new line, not a send
    box.send_keys(Keys.ENTER)
    first = wait_turn(browser, 0)
    assert first.find_element(By.CSS_SELECTOR, ".user").text == "The delivery was fast and the food was great\nthanks!"
    badge = first.find_element(By.CSS_SELECTOR, ".badge")
    assert re.fullmatch(r"(positive|negative|neutral) \d+%", badge.text)
    assert re.fullmatch(r"positive [\d.]+% · neutral [\d.]+% · negative [\d.]+%", badge.get_attribute("title"))
    reply = browser.execute_script("return arguments[0].textContent", first.find_element(By.CSS_SELECTOR, ".reply"))
    assert reply.strip()
    meta = first.find_element(By.CSS_SELECTOR, ".meta").text
    assert re.search(r"instance worker-\d+\s+queue \d+ ms\s+compute \d+ ms\s+[\d.]+ tok/s\s+not cached \(stream\)", meta), meta
    assert browser.find_element(By.ID, "banner").is_displayed()
    assert "Demo model" in browser.find_element(By.ID, "banner").text

    box.send_keys("And what do you think of the price?", Keys.ENTER)
    second = wait_turn(browser, 1)
    assert second.find_element(By.CSS_SELECTOR, ".badge").text
    # Auto mode: one streamed analyze request per turn (the sentiment its first event), with the history.
    analyzed = sent_bodies(browser, "/v1/analyze")
    assert len(analyzed) == 2 and all(body["stream"] for body in analyzed)
    assert analyzed[1]["messages"] == [
        {"role": "user", "content": "The delivery was fast and the food was great\nthanks!"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And what do you think of the price?"}]
    assert sent_bodies(browser, "/v1/chat") == [] and sent_bodies(browser, "/v1/sentiment") == []
    screenshot(browser, "conversation")

    browser.find_element(By.ID, "lang").click()  # 中文
    assert browser.find_element(By.ID, "send").text == "发送"
    assert re.match(r"(正面|负面|中性) \d+%", first.find_element(By.CSS_SELECTOR, ".badge").text)
    assert "实例 worker-" in first.find_element(By.CSS_SELECTOR, ".meta").text
    box.send_keys("送餐太慢了，饭菜都凉了", Keys.ENTER)
    wait_turn(browser, 2)
    screenshot(browser, "conversation-zh")

    browser.find_element(By.ID, "mode-sentiment").click()
    box.send_keys("很好吃", Keys.ENTER)
    only = wait_turn(browser, 3)
    assert only.find_elements(By.CSS_SELECTOR, ".assistant") == [] and only.find_element(By.CSS_SELECTOR, ".badge").text
    assert len(sent_bodies(browser, "/v1/analyze")) == 3 and sent_bodies(browser, "/v1/chat") == []  # no reply asked for
    assert sent_bodies(browser, "/v1/sentiment")[-1] == {"text": "很好吃"}

    browser.find_element(By.ID, "new").click()
    assert turns(browser) == []
    browser.find_element(By.ID, "mode-chat").click()
    box.send_keys("hello again", Keys.ENTER)
    wait_turn(browser, 0)
    assert sent_bodies(browser, "/v1/chat")[-1]["messages"] == [{"role": "user", "content": "hello again"}]
    # One name per conversation on every request, so nginx sends its turns to one worker; a new one after "new".
    (named,), (again,) = set(conversation_ids(browser, "/v1/analyze")), set(conversation_ids(browser, "/v1/chat"))
    assert named and again and named != again and set(conversation_ids(browser, "/v1/sentiment")) == {named}
    assert turns(browser)[0].find_elements(By.CSS_SELECTOR, ".badge") == []  # chat mode: no badge


def test_the_page_fits_a_phone(workers, nginx, browser):
    proxy = nginx(workers)
    browser.set_window_size(390, 844)
    browser.get(proxy.url + "/")
    set_max_tokens(browser, 24)
    box = browser.find_element(By.ID, "input")
    box.send_keys("今天的外卖很好吃，送得也快", Keys.ENTER)
    wait_turn(browser, 0)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    send = browser.find_element(By.ID, "send").rect
    assert send["x"] + send["width"] <= browser.execute_script("return window.innerWidth")
    screenshot(browser, "conversation-phone")


def test_stop_generating_closes_the_stream_and_the_worker_stops_the_row(tiny_model_dir, gunicorn_server, nginx, browser):
    worker = gunicorn_server(QAIO_TORCH_THREADS="1")
    proxy = nginx([worker])
    browser.get(proxy.url + "/")
    browser.find_element(By.ID, "mode-chat").click()
    set_max_tokens(browser, 1024)
    browser.find_element(By.ID, "input").send_keys("Tell me a very long story", Keys.ENTER)
    WebDriverWait(browser, 60).until(lambda d: turns(d) and turns(d)[0].find_element(By.CSS_SELECTOR, ".reply").text)
    browser.find_element(By.ID, "stop").click()
    turn = wait_turn(browser, 0, states=("stopped",), timeout=10)
    assert browser.find_element(By.ID, "send").is_displayed()
    # The worker stopped the row: no slot held, the token count stands still, well short of 1024.
    eventually(lambda: worker_metric(worker, "qaio_live_slots") == 0, what="the worker stops generating after Stop")
    generated = eventually(lambda: worker_metric(worker, "qaio_generated_tokens_total", '{task="chat"}'),
                           what="the stopped row's tokens counted")
    time.sleep(0.5)
    assert 0 < generated == worker_metric(worker, "qaio_generated_tokens_total", '{task="chat"}') < 1024
    assert turn.get_attribute("data-state") == "stopped" and turn.find_element(By.CSS_SELECTOR, ".notice").text


def test_a_rate_limited_turn_says_so_and_is_retried_after_retry_after(workers, nginx, browser):
    # One chat request per 4 s per address and one in reserve (nginx's smallest burst): the third turn
    # at once gets 429 with Retry-After: 1, and the page retries until a slot frees.
    proxy = nginx(workers, QAIO_NGINX_CHAT_RATE="15r/m", QAIO_NGINX_CHAT_BURST="1")
    browser.get(proxy.url + "/")
    browser.find_element(By.ID, "mode-chat").click()
    set_max_tokens(browser, 4)
    box = browser.find_element(By.ID, "input")
    box.send_keys("first", Keys.ENTER)
    wait_turn(browser, 0)
    box.send_keys("second", Keys.ENTER)
    wait_turn(browser, 1)
    box.send_keys("third", Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: len(turns(d)) == 3 and "Retrying in 1 s" in
                                     turns(d)[2].find_element(By.CSS_SELECTOR, ".notice").text)
    assert "Too many requests" in turns(browser)[2].find_element(By.CSS_SELECTOR, ".notice").text
    screenshot(browser, "conversation-rate-limited")
    third = wait_turn(browser, 2, timeout=30)
    assert third.find_element(By.CSS_SELECTOR, ".reply").text and not third.find_element(By.CSS_SELECTOR, ".error").text
    assert not third.find_element(By.CSS_SELECTOR, ".notice").text
    # The third turn's answer reached the page, so its log line is being written: wait for it.
    statuses = eventually(lambda: (s := [e["status"] for e in proxy.log_entries('"/v1/chat"', 3)])[-1] == 200 and s,
                          what="the third turn's 200 in the access log")
    assert statuses[:2] == [200, 200] and 429 in statuses and statuses[-1] == 200
    assert len(statuses) <= 2 + 5  # at most the page's attempts, one a second


def test_the_page_asks_for_an_api_key_once_and_keeps_it(workers, nginx, browser, api_keys_file):
    key = add_api_key(api_keys_file, "page")
    proxy = nginx(workers, QAIO_API_KEYS_FILE=str(api_keys_file))
    browser.get(proxy.url + "/")
    browser.find_element(By.ID, "mode-chat").click()
    set_max_tokens(browser, 4)
    box = browser.find_element(By.ID, "input")
    box.send_keys("hello", Keys.ENTER)
    form = browser.find_element(By.ID, "key-form")
    WebDriverWait(browser, 30).until(lambda d: form.is_displayed())
    assert "needs an API key" in browser.find_element(By.ID, "key-why").text
    assert "Waiting for an API key" in turns(browser)[0].find_element(By.CSS_SELECTOR, ".notice").text
    field = browser.find_element(By.ID, "api-key")
    assert field == browser.switch_to.active_element and field.get_attribute("type") == "password"
    field.send_keys("not-the-key", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: "was refused" in d.find_element(By.ID, "key-why").text)
    screenshot(browser, "conversation-api-key")
    browser.find_element(By.ID, "api-key").send_keys(key, Keys.ENTER)
    first = wait_turn(browser, 0)
    assert first.find_element(By.CSS_SELECTOR, ".reply").text and not form.is_displayed()

    browser.refresh()  # kept in the browser: the next visit sends it without asking
    browser.find_element(By.ID, "mode-chat").click()
    browser.find_element(By.ID, "input").send_keys("again", Keys.ENTER)
    wait_turn(browser, 0)
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    entries = proxy.log_entries('"/v1/chat"', 4)
    assert [(e["status"], e["key"]) for e in entries] == [(401, ""), (401, ""), (200, "page"), (200, "page")]


def test_errors_are_shown_in_words(workers, nginx, browser):
    proxy = nginx(workers)
    browser.get(proxy.url + "/")
    browser.find_element(By.ID, "mode-chat").click()
    browser.find_element(By.ID, "input").send_keys("x" * 5000, Keys.ENTER)  # over the worker's input limit
    turn = wait_turn(browser, 0, states=("error",))
    assert "Request failed (413 text_too_long)" in turn.find_element(By.CSS_SELECTOR, ".error").text or \
        "413" in turn.find_element(By.CSS_SELECTOR, ".error").text


# ---- the dashboard ----------------------------------------------------------------------------------
def dashboard_row(browser, address: str):
    rows = browser.find_elements(By.CSS_SELECTOR, f'#instances tr[data-instance="{address}"]')
    return rows[0] if rows else None


def cell(browser, address: str, name: str) -> str:
    try:
        row = dashboard_row(browser, address)
        return row.find_element(By.CSS_SELECTOR, name).text if row else ""
    except (NoSuchElementException, StaleElementReferenceException):  # the table was redrawn meanwhile
        return ""


class Load:
    """Sentiment requests through the front door (new texts: no cache hits) until stopped; records
    when each was sent, its status and the worker that answered."""

    def __init__(self, url: str):
        self.url, self.results, self.stopping = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        with requests.Session() as session:
            i = 0
            while not self.stopping.is_set():
                i += 1
                sent = time.monotonic()
                response = session.post(self.url + "/v1/sentiment", json={"text": f"第{i}单 味道还行 {time.time()}"}, timeout=30)
                self.results.append((sent, response.status_code,
                                     served_by(response.headers) if response.status_code == 200 else None))
                time.sleep(0.1)

    def stop(self):
        self.stopping.set()
        self.thread.join(30)


def tile(browser, key: str) -> str:
    try:
        return browser.find_element(By.CSS_SELECTOR, f"#stack-{key} .value").text
    except (NoSuchElementException, StaleElementReferenceException):  # the tiles were redrawn meanwhile
        return ""


def instances_seen(browser) -> str:
    """What the dashboard shows of the stack and its instances, for a failed wait's message."""
    try:
        return " | ".join(browser.find_element(By.CSS_SELECTOR, section).text.replace("\n", " ")
                          for section in ("#stack", "#instances", "#admin-message"))
    except (NoSuchElementException, StaleElementReferenceException):
        return "(redrawn meanwhile)"


def until(browser, seconds: float, condition, what: str):
    """Wait for `condition` on the page; past `seconds` fail saying what was awaited and what was shown."""
    try:
        return WebDriverWait(browser, seconds).until(condition)
    except TimeoutException:
        raise AssertionError(f"{what}: not within {seconds} s; the page shows: {instances_seen(browser)}") from None


def undrain(stack, address: str) -> None:
    """Put a worker back in service through the front door's admin endpoint (whatever a test left)."""
    requests.post(f"{stack.url}/admin/{address}/undrain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                  timeout=30).raise_for_status()


def test_dashboard_shows_instances_and_drain_moves_traffic_away_without_failures(local_stack, browser):
    drained, other = local_stack.worker_addresses
    load = Load(local_stack.url)
    try:
        browser.get(local_stack.url + "/dashboard")
        until(browser, 60, lambda d: all(cell(d, a, ".state") == "ready" for a in (drained, other)), "both ready")
        until(browser, 60, lambda d: all(cell(d, a, ".share") not in ("", "–", "0.0%") for a in (drained, other)),
              "both with a share")
        # The stack tiles come from mtail's nginx counters, scraped apart from the workers: a rate over
        # 30 s needs two of their scrapes, which on a loaded machine come after the workers' shares.
        until(browser, 60, lambda d: re.fullmatch(r"[\d.]+%", tile(d, "errors"))
              and re.fullmatch(r"[\d.]+", tile(d, "rps")), "the stack tiles")
        assert "worker-0" in dashboard_row(browser, drained).text or "worker-1" in dashboard_row(browser, drained).text
        assert "sentiment" in cell(browser, drained, ".latency")
        until(browser, 60, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-rps svg polyline"), "the rps chart")
        # API keys are off in this stack: every request is the key table's "(none)" row.
        until(browser, 60, lambda d: d.find_elements(By.CSS_SELECTOR, '#keys tr[data-key=""]'), "the keys table")
        assert browser.find_element(By.CSS_SELECTOR, '#keys tr[data-key=""] .name').text == "(none)"

        browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
        dashboard_row(browser, drained).find_element(By.CSS_SELECTOR, "button.drain").click()
        # The answer says "draining" while the worker still holds a request of the load, else "drained".
        until(browser, 60, lambda d: re.search(r": drain(ing|ed)$", d.find_element(By.ID, "admin-message").text),
              "the drain's answer")
        drained_at = time.monotonic()
        until(browser, 60, lambda d: cell(d, drained, ".state") in ("draining", "drained"), "the state draining")
        # Its share of new requests falls to zero as the 30 s window passes; the other takes it all.
        until(browser, 90, lambda d: cell(d, drained, ".share") == "0.0%", "the drained worker's share at zero")
        assert cell(browser, other, ".share") == "100%"
        assert cell(browser, drained, ".state") == "drained"
        screenshot(browser, "dashboard")

        undrained_at = time.monotonic()
        dashboard_row(browser, drained).find_element(By.CSS_SELECTOR, "button.undrain").click()
        until(browser, 60, lambda d: cell(d, drained, ".state") == "ready", "the undrained worker ready")
        deadline = time.monotonic() + 30
        while not any(t > undrained_at and who == drained for t, _, who in load.results):
            assert time.monotonic() < deadline, "no request reached the undrained worker"
            time.sleep(0.2)
    finally:
        load.stop()
        undrain(local_stack, drained)  # a failure above must not leave the shared stack one worker short
    assert load.results and all(status == 200 for _, status, _ in load.results), \
        [r for r in load.results if r[1] != 200][:5]
    while_drained = [who for t, _, who in load.results if drained_at < t < undrained_at]
    assert while_drained and drained not in while_drained, (len(while_drained), while_drained.count(drained))


def test_dashboard_admin_needs_the_right_token(local_stack, browser):
    browser.get(local_stack.url + "/dashboard")
    address = local_stack.worker_addresses[0]
    until(browser, 60, lambda d: cell(d, address, ".state") == "ready", "the worker ready")
    browser.find_element(By.ID, "token").send_keys("wrong-token-0123456789")
    dashboard_row(browser, address).find_element(By.CSS_SELECTOR, "button.drain").click()
    until(browser, 10, lambda d: "disabled" in d.find_element(By.ID, "admin-message").text, "the refusal's message")
    assert requests.get(f"http://{address}/readyz", timeout=5).json()["status"] == "ready"
