"""The page in a real browser: Debian's headless Chromium, driven by selenium.

Screenshots land in test-artifacts/ (git-ignored); each test prints its path.
"""

from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ROOT, photo

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# No network beyond the page under test: no updates, sync, field trials or QUIC probes.
FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver",
)


@pytest.fixture
def dog():
    return photo("dog.jpg")


@pytest.fixture
def url(server):
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}", "--window-size=1280,860"]:
        options.add_argument(flag)
    # An explicit driver path skips Selenium Manager, so nothing is downloaded;
    # SE_OFFLINE keeps it offline should it run anyway.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(browser, url):
    browser.get(url + "/")
    # The sliders take their defaults from /api/model: wait for them before choosing a photo.
    WebDriverWait(browser, 20).until(lambda d: not d.find_element(By.ID, "model").text.startswith("Loading"))


def choose(browser, path):
    """Choose a file as a person would, and wait for the service's answer."""
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "latency").text.endswith(" ms"))


def screenshot(browser, name):
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")


def canvas_changes(browser, rect):
    """Compare the canvas with the photo drawn plain: changed pixels overall and on the rectangle's left edge."""
    return browser.execute_async_script(
        """
        const [rect, done] = arguments;
        const canvas = document.getElementById("canvas");
        createImageBitmap(document.getElementById("file").files[0]).then((bitmap) => {
          const plain = new OffscreenCanvas(bitmap.width, bitmap.height).getContext("2d");
          plain.drawImage(bitmap, 0, 0);
          const size = [0, 0, bitmap.width, bitmap.height];
          const a = plain.getImageData(...size).data;
          const b = canvas.getContext("2d").getImageData(...size).data;
          const changed = (x, y) => {
            const i = 4 * (y * bitmap.width + x);
            return Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]) > 60;
          };
          let total = 0;
          for (let y = 0; y < bitmap.height; y++) for (let x = 0; x < bitmap.width; x++) total += changed(x, y);
          let edge = 0;
          for (let y = rect.top; y < rect.top + rect.height; y++) edge += changed(rect.left, y);
          done({ width: canvas.width, height: canvas.height, total, edge });
        });
        """,
        rect,
    )


def test_page_draws_the_dog_the_service_finds(browser, server, url, dog):
    open_page(browser, url)
    confidence = float(browser.find_element(By.ID, "confidence").get_attribute("value"))
    nms = float(browser.find_element(By.ID, "nms").get_attribute("value"))
    model = server.request("GET", "/api/model").json()
    assert (confidence, nms) == (model["confidence"], model["nms"])

    choose(browser, dog)
    screenshot(browser, "page-dog.png")
    assert not browser.find_element(By.ID, "error").is_displayed()
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#objects li")]
    assert any(item.startswith("dog") and item.endswith("%") for item in items), items

    # The boxes on the canvas are where the service says the dog is.
    answer = server.detect(dog.read_bytes(), confidence=confidence, nms=nms)
    assert answer.status == 200, answer.body
    rect = next(o["rectangle"] for o in answer.json()["objects"] if o["label"] == "dog")
    changes = canvas_changes(browser, rect)
    assert (changes["width"], changes["height"]) == (768, 576)
    assert changes["edge"] > 0.8 * rect["height"], changes  # the dog's left edge is drawn over
    assert 0.005 < changes["total"] / (768 * 576) < 0.3, changes  # boxes and tags, not a repainted photo


def test_sliders_rerun_the_same_photo(browser, server, url, dog):
    open_page(browser, url)
    choose(browser, dog)
    # Setting the value and firing `change` is what releasing the slider at 0.9 does.
    browser.execute_script(
        "const s = document.getElementById('confidence'); s.value = 0.9;"
        "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));"
    )
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "latency").text.endswith(" ms"))
    assert browser.find_element(By.ID, "confidence-value").text == "0.90"

    nms = float(browser.find_element(By.ID, "nms").get_attribute("value"))
    answer = server.detect(dog.read_bytes(), confidence=0.9, nms=nms)
    assert answer.status == 200, answer.body
    expected = sorted(answer.json()["objects"], key=lambda o: -o["accuracy"])
    shown = [span.text for span in browser.find_elements(By.CSS_SELECTOR, "#objects .label")]
    assert shown == [o["label"] for o in expected]


def test_page_shows_the_services_error(browser, server, url, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    answer = server.detect(notes.read_bytes())
    assert answer.status == 400

    open_page(browser, url)
    choose(browser, notes)
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.text == answer.json()["error"]
    assert not browser.find_element(By.ID, "canvas").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#objects li") == []
    screenshot(browser, "page-error.png")


def test_page_fits_a_phone_screen(browser, url, dog):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, url)
        choose(browser, dog)
        screenshot(browser, "page-phone.png")
        # Nothing is wider than the screen: no sideways scrolling.
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        canvas_width = browser.execute_script("return document.getElementById('canvas').clientWidth")
        assert 0 < canvas_width <= 390
    finally:
        browser.set_window_size(1280, 860)
