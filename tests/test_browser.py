"""The search page in a real headless Chromium (Debian's chromium + chromium-driver) via Selenium."""

from __future__ import annotations

import shutil
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="diffgap-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_type_a_query_see_results_and_play_one(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-ready") == "1")
    assert "30 items" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "q").send_keys("a high beep twice at the start")
    browser.find_element(By.ID, "compare").click()
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.hit")) == 10)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results-direct li.hit")) == 10)
    assert browser.find_element(By.ID, "title-a").text == "refined"
    assert browser.find_element(By.ID, "title-b").text == "direct"
    assert "refine" in browser.find_element(By.ID, "timing-a").text
    first = browser.find_elements(By.CSS_SELECTOR, "#results li.hit")[0]
    assert first.find_element(By.CSS_SELECTOR, ".path").text.startswith("demo_")
    # play the first result: the browser fetches the WAV window, decodes it and advances the clock
    played = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const audio = document.querySelector('#results li.hit audio');
        audio.muted = true;
        audio.addEventListener('error', () => done('error ' + (audio.error && audio.error.code)));
        audio.play().then(() => setTimeout(() => done(audio.currentTime), 700)).catch(e => done('reject ' + e));
    """)
    assert isinstance(played, (int, float)) and played > 0, played
    browser.save_screenshot(str(tmp_path / "page.png"))
    # bad input shows an error instead of breaking the page
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys("x" * 1001)
    browser.find_element(By.ID, "go").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "error"), "longer than"))
