"""`catnet serve` end to end in headless Chromium (selenium + /usr/bin/chromedriver).

Skips on a developer machine where Chromium or its driver are missing; fails in CI, where `make test`
installs them (`make browser`: apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
from test_predict import CLASSES, shared_tiny_run, write_tiny_video

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    _msg = "headless Chromium not installed (run `make browser`: apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(_msg, pytrace=False)
    pytest.skip(_msg, allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CLIPS = 5  # serve's cheap setting overrides the run's 3 clips


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    """A server on a random port with a tiny trained run (random i3d_r50 features, 1 epoch), Grad-CAM maps
    and a label timeline of 1 s windows."""
    from catnet.inference.predict import Predictor
    from catnet.inference.serve import App, find_samples, make_server

    root = tmp_path_factory.mktemp("browser")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATNET_HOME", str(root / "home"))
        predictor = Predictor.from_run(shared_tiny_run(), num_clips=CLIPS, num_crops=1)
        app = App(predictor, find_samples(), max_bytes=2_000_000, model_name="tiny run", window=1.0)
        srv = make_server(app, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _wait_for_result(browser, timeout=60):
    WebDriverWait(browser, timeout).until(
        lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
    return browser.find_element(By.ID, "status").text


def _check_results(browser, video_name):
    assert browser.find_element(By.ID, "video-name").text == video_name
    labels = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#top5 li .label")]
    assert sorted(labels) == CLASSES  # top-5 of a 2-class run = both classes
    bars = browser.find_elements(By.CSS_SELECTOR, "#timeline .clip")
    assert len(bars) == CLIPS and all("attention" in b.get_attribute("title") for b in bars)
    heights = [b.size["height"] for b in bars]
    assert max(heights) > 0
    imgs = browser.find_elements(By.CSS_SELECTOR, "#keyframes img")
    assert len(imgs) == 3
    for img in imgs:
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    overlays = browser.find_elements(By.CSS_SELECTOR, "#explain img")
    assert len(overlays) == 3 and all(o.is_displayed() for o in overlays)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline .clip.explained")) == 3
    segments = browser.find_elements(By.CSS_SELECTOR, "#label-timeline .segment")
    assert segments and all(" s: " in seg.get_attribute("title") for seg in segments)


def test_pick_sample_then_upload_then_refused_upload(base_url, browser, tmp_path):
    browser.get(base_url)
    WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "model"), "tiny run"))
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#sample option")]
    assert options == ["moving_square.mp4"]

    browser.find_element(By.ID, "run-sample").click()
    assert _wait_for_result(browser).startswith("done"), browser.find_element(By.ID, "status").text
    _check_results(browser, "moving_square.mp4")

    video = write_tiny_video(tmp_path / "my upload.mp4", frames=30, seed=5)
    browser.find_element(By.ID, "file").send_keys(str(video))
    browser.find_element(By.ID, "upload").click()
    WebDriverWait(browser, 60).until(EC.text_to_be_present_in_element((By.ID, "video-name"), "my upload.mp4"))
    assert _wait_for_result(browser).startswith("done")
    _check_results(browser, "my upload.mp4")

    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    browser.find_element(By.ID, "file").send_keys(str(text))
    browser.find_element(By.ID, "upload").click()
    status = _wait_for_result(browser)
    assert status.startswith("error") and "unsupported file type" in status


def _screenshot_region(browser, element, path) -> np.ndarray:
    """The page as the user sees it, saved to `path`, cropped to `element` (device pixels)."""
    from PIL import Image

    ratio = browser.execute_script("return window.devicePixelRatio") or 1
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    browser.save_screenshot(str(path))
    shot = np.asarray(Image.open(path).convert("RGB"))
    r = browser.execute_script("const b = arguments[0].getBoundingClientRect();"
                               "return [b.left, b.top, b.width, b.height];", element)
    x, y, w, h = (round(v * ratio) for v in r)
    return shot[max(0, y):y + h, max(0, x):x + w]


def test_overlays_show_in_a_screenshot(base_url, browser, tmp_path):
    """The Grad-CAM overlays are really painted under the timeline: non-blank pixels where they sit."""
    browser.set_window_size(1000, 1400)
    browser.get(base_url)
    WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "model"), "tiny run"))
    browser.find_element(By.ID, "run-sample").click()
    assert _wait_for_result(browser).startswith("done")
    card = browser.find_element(By.ID, "explain-card")
    timeline = browser.find_element(By.ID, "timeline")
    assert card.location["y"] > timeline.location["y"]  # under the attention timeline
    for i, overlay in enumerate(browser.find_elements(By.CSS_SELECTOR, "#explain img")):
        region = _screenshot_region(browser, overlay, tmp_path / f"page{i}.png")
        assert region.shape[0] >= 150 and region.shape[1] >= 150, region.shape
        page_white = (region > 245).all(axis=-1).mean()
        assert page_white < 0.2 and region.std() > 10, "the overlay region is blank"
    assert (tmp_path / "page0.png").stat().st_size > 0
