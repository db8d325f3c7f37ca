"""The clinician page in a real headless browser (Debian's chromium + chromedriver): with an
API key, upload a real frame, fill clinical fields, and read back what the API answered.

``ENDOFUSE_SCREENSHOT=docs/web-page.png pytest tests/test_web_page.py`` refreshes the README's
screenshot."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api import create_app
from service.api.auth import create_key
from service.config import Settings
from service.registry import Registry
from tests.conftest import require_data
from tests.http_server import running
from tests.redis_harness import REPO

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (make install-test-deps)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    key = create_key(keys, "browser", ["predict", "models:read"])
    settings = Settings(models_dir=REPO / "models", providers="cpu", warmup_runs=0,
                        api_keys_file=keys)  # fmt: skip
    registry = Registry.load(REPO / "models", providers=["CPUExecutionProvider"], warmup_runs=0)
    with running(create_app(settings, registry), settings) as (host, port):
        yield f"http://{host}:{port}", key


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100",
                "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    yield driver
    driver.quit()


def wait_for(browser: webdriver.Chrome, condition, seconds: float = 30):
    return WebDriverWait(browser, seconds).until(condition)


def open_with_key(browser: webdriver.Chrome, base: str, key: str) -> None:
    browser.get(base + "/")
    field = browser.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait_for(browser, lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 2)


def test_page_without_a_key_says_so(browser: webdriver.Chrome, site: tuple[str, str]) -> None:
    base, _ = site
    browser.get(base + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(base + "/")
    wait_for(browser, ec.text_to_be_present_in_element((By.ID, "status"), "401"))


def test_endoscopy_frame_through_the_page(
    browser: webdriver.Chrome, site: tuple[str, str], fullres_frames: list[Path]
) -> None:
    base, key = site
    frame = fullres_frames[0]
    url = f"{base}/models/hyperkvasir-lgi/predict"
    files = {"image": ("f", frame.read_bytes())}
    expected = httpx.post(url, files=files, headers={"X-API-Key": key}, timeout=60).json()
    open_with_key(browser, base, key)
    Select(browser.find_element(By.ID, "model")).select_by_value("hyperkvasir-lgi")
    wait_for(browser, lambda d: not d.find_element(By.ID, "coverage").get_property("disabled"))
    assert browser.find_element(By.ID, "tabular").get_property("hidden")
    browser.find_element(By.ID, "file").send_keys(str(frame))
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, ec.visibility_of_element_located((By.ID, "result")))
    assert browser.find_element(By.ID, "label").text == expected["label"]
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert bars[0].get_attribute("data-label") == expected["label"]
    assert len(bars) == len(expected["probabilities"])
    assert browser.find_element(By.ID, "set").text == ", ".join(expected["prediction_set"])
    flags = browser.find_element(By.ID, "flags").text
    assert ("Refer" in flags) == expected["refer"]
    # Marginal sets: the page asks for them and says which kind answered.
    marginal = httpx.post(
        url + "?coverage=0.95&sets=marginal", files=files, headers={"X-API-Key": key}, timeout=60
    ).json()
    Select(browser.find_element(By.ID, "coverage")).select_by_value("0.95")
    Select(browser.find_element(By.ID, "sets")).select_by_value("marginal")
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, ec.text_to_be_present_in_element((By.ID, "coverage-got"), "on average"))
    assert browser.find_element(By.ID, "set").text == ", ".join(marginal["prediction_set"])


def test_dermoscopy_image_with_fields(browser: webdriver.Chrome, site: tuple[str, str]) -> None:
    base, key = site
    image = require_data("ham10000") / "images" / "nv" / "ISIC_0024306.jpg"
    open_with_key(browser, base, key)
    Select(browser.find_element(By.ID, "model")).select_by_value("ham10000")
    wait_for(browser, lambda d: not d.find_element(By.ID, "tabular").get_property("hidden"))
    browser.find_element(By.CSS_SELECTOR, "[data-field=age]").send_keys("45")
    Select(browser.find_element(By.CSS_SELECTOR, "[data-field=sex]")).select_by_value("male")
    browser.find_element(By.ID, "file").send_keys(str(image))
    browser.find_element(By.ID, "submit").click()
    try:
        wait_for(browser, ec.text_to_be_present_in_element((By.ID, "model-used"), "ham10000"))
    except Exception:
        pytest.fail("no result; the page says: " + browser.find_element(By.ID, "status").text)
    inputs = browser.find_element(By.ID, "inputs").text
    assert "fields used: age, sex" in inputs and "missing: localization" in inputs
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 7
    shot = os.environ.get("ENDOFUSE_SCREENSHOT")
    if shot:
        # The screenshot is kept in the repository: the patient's image stays out of it.
        browser.execute_script("document.getElementById('preview').hidden = true")
        browser.save_screenshot(shot)


def test_out_of_distribution_image_is_flagged_on_the_page(
    browser: webdriver.Chrome, site: tuple[str, str]
) -> None:
    """A dermoscopy image posted to the endoscopy model: the page says what the API says,
    that it is not the kind of image the model was built for, and to refer."""
    base, key = site
    image = require_data("ham10000") / "images" / "nv" / "ISIC_0024306.jpg"
    url = f"{base}/models/hyperkvasir-lgi/predict"
    files = {"image": ("f", image.read_bytes())}
    expected = httpx.post(url, files=files, headers={"X-API-Key": key}, timeout=60).json()
    assert expected["ood"]["flagged"] and expected["refer"], expected
    open_with_key(browser, base, key)
    Select(browser.find_element(By.ID, "model")).select_by_value("hyperkvasir-lgi")
    wait_for(browser, lambda d: not d.find_element(By.ID, "coverage").get_property("disabled"))
    browser.find_element(By.ID, "file").send_keys(str(image))
    browser.find_element(By.ID, "submit").click()
    wait_for(browser, ec.text_to_be_present_in_element((By.ID, "flags"), "Out of distribution"))
    flags = browser.find_element(By.ID, "flags").text
    assert "Refer to a clinician" in flags and "No referral flag" not in flags
    # Beside the flag, how often it marked val images given the same label.
    v = expected["ood"]["val_flagged"]
    assert v["label"] == expected["label"]
    assert (
        f"Of the validation images named {v['label']}, it marked {v['flagged']} of {v['of']}"
        in flags
    )
