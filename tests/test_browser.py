"""The search page in a real headless Chromium (Debian's chromium + chromium-driver) via Selenium."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from conftest import REPO, Server, tone

from diffgap.media.audio import write_audio
from diffgap.pipeline import build

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
    assert first.find_element(By.CSS_SELECTOR, ".name").text.startswith("demo_")
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


AXE = REPO / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
DOCS = REPO / "docs"


@pytest.fixture(scope="module")
def long_file_server(served_index, tmp_path_factory):
    """The served corpus plus a 24 s file (four windows), indexed with the same encoders."""
    work = tmp_path_factory.mktemp("browser")
    corpus = work / "corpus"
    shutil.copytree(served_index.parent / "corpus" / "audio", corpus)
    wave = np.concatenate([tone(f, 4.0, 16000) for f in (300, 600, 900, 1500, 2000, 2500)])
    (corpus / "long").mkdir()
    write_audio(corpus / "long" / "four_tones.wav", wave, 16000)
    spec = json.loads((served_index / "manifest.json").read_text())["encoder_spec"]
    assert build(work / "index", spec, corpus=corpus).total_items > 30
    for modality in ("text", "video"):
        shutil.copytree(served_index / f"refiner-{modality}", work / "index" / f"refiner-{modality}")
    srv = Server(work / "index", {"DIFFGAP_API_KEY": "k3y"})
    yield srv
    srv.stop()


def hits(browser, selector="#results > li.hit"):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def test_the_page_end_to_end(browser, long_file_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    srv = long_file_server
    browser.get(srv.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-ready") == "1")
    shots = os.environ.get("DIFFGAP_SCREENSHOTS") == "1"
    if shots:
        DOCS.mkdir(exist_ok=True)
        browser.set_window_size(1280, 900)
        browser.save_screenshot(str(DOCS / "page-empty.png"))
    # the page works with an API key: typed once, sent with every call, waveforms and audio included
    browser.find_element(By.ID, "key").send_keys("k3y" + Keys.TAB)
    box = browser.find_element(By.ID, "q")
    box.send_keys("a high beep twice at the start" + Keys.ENTER)  # the keyboard alone runs a search
    wait.until(lambda d: len(hits(d)) == 10)
    assert "q=a+high+beep" in browser.current_url
    # every hit shows what it is, and its waveform loads
    wait.until(
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img.wave')].every(i => i.complete && i.naturalWidth == 480)"
        )
    )
    first = hits(browser)[0]
    assert first.find_element(By.CSS_SELECTOR, ".name").text
    assert "score" in first.find_element(By.CSS_SELECTOR, ".bar").get_attribute("title")
    assert first.find_elements(By.CSS_SELECTOR, ".badge.sound")
    assert first.find_element(By.CSS_SELECTOR, "a.download").get_attribute("download")
    ids = [h.get_attribute("data-id") for h in hits(browser)]
    if shots:
        browser.save_screenshot(str(DOCS / "page-results.png"))
    # reload the URL: the same search, the same results
    browser.refresh()
    wait.until(lambda d: len(hits(d)) == 10)
    assert [h.get_attribute("data-id") for h in hits(browser)] == ids
    # a grouped file expands to its windows
    browser.get(srv.url + "/?q=four+tones&lexical=1")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results > li.hit button.expand"))
    expand = browser.find_element(By.CSS_SELECTOR, "#results > li.hit button.expand")
    expand.send_keys(Keys.ENTER)
    wait.until(lambda d: len(hits(d, "ol.windows li.hit")) >= 3)
    assert expand.get_attribute("aria-expanded") == "true"
    # more like this, from the keyboard; the URL says so and back returns to the text search
    browser.back()
    wait.until(lambda d: len(hits(d)) == 10 and "more like" not in d.find_element(By.ID, "title-a").text)
    like = hits(browser)[0].find_element(By.CSS_SELECTOR, "button.like")
    liked_id = hits(browser)[0].get_attribute("data-id")
    like.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "title-a").text == f"more like item {liked_id}")
    assert f"like={liked_id}" in browser.current_url
    assert liked_id not in [h.get_attribute("data-id") for h in hits(browser)]  # the example itself is left out
    browser.back()
    wait.until(lambda d: d.find_element(By.ID, "title-a").text in ("refined", "direct"))
    # filters: a duration range nothing matches says so
    browser.get(srv.url + "/?q=a+beep&dmax=0.5")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.empty"))
    assert browser.find_element(By.ID, "dmax").get_attribute("value") == "0.5"
    browser.get(srv.url + "/?q=a+beep&folder=long%2F")
    wait.until(lambda d: len(hits(d)) >= 1)
    assert all(h.find_element(By.CSS_SELECTOR, ".folder").text == "long/" for h in hits(browser))
    # paging: more results
    browser.get(srv.url + "/?q=a+beep&k=5")
    wait.until(lambda d: len(hits(d)) == 5)
    browser.find_element(By.ID, "more").click()
    wait.until(lambda d: len(hits(d)) == 15)
    # drop a sound anywhere on the page
    browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/v1/items/1/audio', {headers: {Authorization: 'Bearer k3y'}}).then(r => r.blob()).then(b => {
          const dt = new DataTransfer();
          dt.items.add(new File([b], 'dropped.wav', {type: 'audio/wav'}));
          document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
          done();
        });
    """)
    wait.until(lambda d: d.find_element(By.ID, "title-a").text.startswith("audio query: dropped.wav"))
    assert browser.find_elements(By.CSS_SELECTOR, "#preview audio")
    # a file over the server's limit is refused before it is sent
    browser.execute_script("""
        const big = new File([new Uint8Array(51 * 1024 * 1024)], 'huge.wav', {type: 'audio/wav'});
        const dt = new DataTransfer(); dt.items.add(big);
        document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    """)
    wait.until(lambda d: "at most" in d.find_element(By.ID, "error").text)
    # compare view, and a phone-width window, for the README's pictures
    browser.get(srv.url + "/?q=a+low+buzz+at+the+end&compare=1")
    wait.until(lambda d: len(hits(d, "#results-direct > li.hit")) == 10)
    if shots:
        browser.save_screenshot(str(DOCS / "page-compare.png"))
        browser.set_window_size(390, 844)
        browser.save_screenshot(str(DOCS / "page-phone.png"))
        browser.set_window_size(1280, 900)
    if AXE.exists():  # accessibility: no serious or critical violations
        browser.execute_script(AXE.read_text())
        report = browser.execute_async_script(
            "const done = arguments[arguments.length - 1]; axe.run(document).then(r => done(r.violations))"
        )
        bad = [(v["id"], v["impact"], len(v["nodes"])) for v in report if v["impact"] in ("serious", "critical")]
        assert bad == [], bad
