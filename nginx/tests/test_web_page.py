"""The web page nginx serves, driven in real headless Chromium against real workers."""
import shutil
import tempfile

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture()
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='qaio-chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_runs_sentiment_streams_chat_and_warns_about_the_demo_model(workers, nginx, browser):
    proxy = nginx(workers)
    browser.get(proxy.url + "/")
    assert browser.title == "Qwen All-in-One"
    wait = WebDriverWait(browser, 60)

    browser.find_element(By.ID, "sentiment").click()
    wait.until(lambda d: d.find_element(By.ID, "label").text)
    label = browser.find_element(By.ID, "label").text
    assert label.split(" / ")[0] in ("positive", "negative", "neutral") and "%" in label
    assert len(browser.find_elements(By.CSS_SELECTOR, "#scores .bar")) == 3
    assert browser.find_element(By.ID, "demo").is_displayed()
    assert "queue" in browser.find_element(By.ID, "meta").text

    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys("Tell me something nice")
    browser.find_element(By.ID, "chat").click()
    wait.until(lambda d: d.find_element(By.ID, "meta").text and d.find_element(By.ID, "chat").is_enabled())
    assert browser.find_element(By.ID, "reply").text.strip()
    assert not browser.find_element(By.ID, "error").text

    text.clear()
    browser.find_element(By.ID, "sentiment").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert "400" in browser.find_element(By.ID, "error").text and "empty_text" in browser.find_element(By.ID, "error").text
