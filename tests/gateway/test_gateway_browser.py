"""The search page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver` packages, driven by selenium) against the real gateway and search.

Skips where /usr/bin/chromium or /usr/bin/chromedriver is missing; CI (.ci/run) installs
both. Screenshots are kept under out/test-artifacts/gateway/.
"""
from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import ROOT, GatewaySuite

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = ROOT / "out" / "test-artifacts" / "gateway"

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="headless Chromium not installed (apt-get install chromium chromium-driver)"),
]

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

WAIT_S = 90  # a search on 2 busy cores: embedder + Milvus Lite


@pytest.fixture(scope="module")
def browser(gateway_suite: GatewaySuite) -> Iterator[webdriver.Chrome]:
    profile = tempfile.mkdtemp(prefix="mmsearch-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: webdriver.Chrome, gateway_suite: GatewaySuite) -> webdriver.Chrome:
    """The page freshly loaded, with the suite's token typed into its settings."""
    browser.get(gateway_suite.base_url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(gateway_suite.token, Keys.TAB)  # "change" stores it
    return browser


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def hit_ids(driver: webdriver.Chrome) -> list[str]:
    return [el.get_attribute("data-id") for el in driver.find_elements(By.CSS_SELECTOR, "#results .hit")]


def wait_for_results(driver: webdriver.Chrome, previous: list[str] | None = None) -> list[str]:
    """Waits until the grid shows a finished search (and, given, other hits than before)."""
    def done(d: webdriver.Chrome) -> list[str] | bool:
        if "busy" in (d.find_element(By.TAG_NAME, "body").get_attribute("class") or ""):
            return False
        ids = hit_ids(d)
        return ids if ids and ids != previous else False

    return WebDriverWait(driver, WAIT_S).until(done)


def wait_for_thumbnail(driver: webdriver.Chrome, index: int = 0) -> None:
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(
        "const img = document.querySelectorAll('#results .hit .thumb')[arguments[0]].querySelector('img');"
        "return !!img && img.complete && img.naturalWidth > 0;", index))


def drop_file(driver: webdriver.Chrome, path: Path, mime: str = "image/jpeg") -> None:
    """A real drop event on the drop zone, carrying the file (what a drag from the desktop does)."""
    driver.execute_script(
        """
        const [b64, name, type] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type }));
        const zone = document.getElementById('drop');
        zone.dispatchEvent(new DragEvent('dragover', { dataTransfer: transfer, bubbles: true, cancelable: true }));
        zone.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true, cancelable: true }));
        """,
        base64.b64encode(path.read_bytes()).decode(), path.name, mime,
    )


def test_typing_a_cat_shows_the_cat_first(page: webdriver.Chrome) -> None:
    box = page.find_element(By.ID, "q")
    box.send_keys("a cat", Keys.ENTER)
    ids = wait_for_results(page)
    assert ids[0] == "cat", ids
    first = page.find_elements(By.CSS_SELECTOR, "#results .hit")[0]
    assert float(first.find_element(By.CLASS_NAME, "score").text) > 0
    assert first.find_element(By.CLASS_NAME, "caption").text  # the lite captioner's description
    wait_for_thumbnail(page, 0)  # served through the gateway, under the file root
    assert screenshot(page, "text-a-cat").stat().st_size > 10_000


def test_dropping_the_flipped_cat_shows_the_cat_first(page: webdriver.Chrome, gateway_suite: GatewaySuite) -> None:
    drop_file(page, gateway_suite.queries / "cat_flipped.jpg")
    ids = wait_for_results(page)
    assert ids[0] == "cat", ids
    assert page.find_element(By.ID, "preview").get_attribute("alt") == "cat_flipped.jpg"
    wait_for_thumbnail(page, 0)
    screenshot(page, "image-flipped-cat")


def test_composed_query_image_and_instruction(page: webdriver.Chrome, gateway_suite: GatewaySuite) -> None:
    image = gateway_suite.queries / "cat_flipped.jpg"
    page.find_element(By.ID, "file").send_keys(str(image))  # the file picker path
    image_only = wait_for_results(page)
    assert image_only[0] == "cat"
    instruction = page.find_element(By.ID, "instruction")
    assert instruction.is_enabled()
    instruction.send_keys("a cup of espresso", Keys.ENTER)
    composed = wait_for_results(page, previous=image_only)
    # The instruction pulls the coffee photo up from where the image alone ranks it.
    assert composed.index("coffee") < image_only.index("coffee"), (image_only, composed)
    assert composed.index("coffee") <= 2, composed
    screenshot(page, "composed")


def test_a_bad_upload_shows_the_servers_message(page: webdriver.Chrome, gateway_suite: GatewaySuite,
                                                tmp_path: Path) -> None:
    bad = tmp_path / "not-a-photo.jpg"
    bad.write_bytes(b"this is a text file with a .jpg name\n")
    page.find_element(By.ID, "file").send_keys(str(bad))
    error = WebDriverWait(page, WAIT_S).until(
        lambda d: (el := d.find_element(By.ID, "error")).is_displayed() and el.text)
    # Exactly what the API answers for the same bytes.
    with gateway_suite.client(headers=gateway_suite.auth) as http:
        reply = http.post("/v1/search", json={"query": {"image": {"data": base64.b64encode(bad.read_bytes()).decode()}},
                                              "topK": 25, "target": "TARGET_IMAGE", "offset": 0})
    assert reply.status_code == 400
    assert error == f"400 INVALID_ARGUMENT: {reply.json()['message']}"
    assert "not a recognised image format" in error
    assert not page.find_elements(By.CSS_SELECTOR, "#results .hit") and not page.find_element(By.ID, "pager").is_displayed()
    screenshot(page, "bad-upload")


def test_placeholder_filter_target_and_pagination(page: webdriver.Chrome) -> None:
    # An uploaded item (inline bytes, no file): a placeholder instead of a thumbnail.
    page.find_element(By.ID, "filter").send_keys('metadata["label"] == "inline"')
    page.find_element(By.ID, "q").send_keys("red", Keys.ENTER)
    ids = wait_for_results(page)
    assert len(ids) == 1
    placeholder = page.find_element(By.CSS_SELECTOR, "#results .hit .thumb")
    assert "placeholder" in placeholder.get_attribute("class")
    assert not page.find_element(By.ID, "pager").is_displayed()  # one page only

    # Captions as the target, 12 per page: page 2 continues page 1.
    page.find_element(By.ID, "filter").clear()
    page.find_element(By.CSS_SELECTOR, "#target option[value=TARGET_CAPTION]").click()
    page.find_element(By.CSS_SELECTOR, "#page-size option[value='12']").click()
    page.find_element(By.ID, "search").click()
    first_page = wait_for_results(page, previous=ids)
    assert len(first_page) == 12
    ranks = [int(el.text.lstrip("#")) for el in page.find_elements(By.CSS_SELECTOR, "#results .rank")]
    assert ranks == list(range(1, 13))
    page.find_element(By.ID, "next").click()
    second_page = wait_for_results(page, previous=first_page)
    assert not set(second_page) & set(first_page)
    ranks = [int(el.text.lstrip("#")) for el in page.find_elements(By.CSS_SELECTOR, "#results .rank")]
    assert ranks[0] == 13 and page.find_element(By.ID, "page-no").text == "page 2"
    screenshot(page, "caption-page-2")
    page.find_element(By.ID, "prev").click()
    assert wait_for_results(page, previous=second_page) == first_page


def test_the_page_works_without_a_token_field_when_search_has_auth(browser: webdriver.Chrome,
                                                                   gateway_suite: GatewaySuite) -> None:
    """Without the token the server's UNAUTHENTICATED message is shown, not a blank grid."""
    browser.get(gateway_suite.base_url + "/")
    browser.execute_script("localStorage.clear(); document.getElementById('token').value = '';")
    browser.find_element(By.ID, "q").send_keys("a cat", Keys.ENTER)
    error = WebDriverWait(browser, WAIT_S).until(
        lambda d: (el := d.find_element(By.ID, "error")).is_displayed() and el.text)
    assert error.startswith("401 UNAUTHENTICATED: ")
    with httpx.Client(base_url=gateway_suite.base_url) as http:
        assert error.endswith(http.post("/v1/search", json={"query": {"text": "a cat"}}).json()["message"])


def test_more_like_this_on_a_hit(page: webdriver.Chrome) -> None:
    page.find_element(By.ID, "q").send_keys("a cat", Keys.ENTER)
    first = wait_for_results(page)
    assert first[0] == "cat"
    page.find_elements(By.CSS_SELECTOR, "#results .hit")[0].find_element(By.CLASS_NAME, "more").click()
    similar = wait_for_results(page, previous=first)
    assert "cat" not in similar  # the example itself is never among the hits
    assert page.find_element(By.ID, "like-id").text == "cat" and page.find_element(By.ID, "like").is_displayed()
    assert page.find_element(By.ID, "q").get_attribute("value") == ""
    screenshot(page, "more-like-cat")


def test_the_demo_index_links_to_the_live_page(browser: webdriver.Chrome, gateway_suite: GatewaySuite,
                                              tmp_path: Path) -> None:
    """`mmsearch demo`'s index.html (a file:// page) says whether the search page answers."""
    from mmsearch.cli.demo import write_index
    from tests.conftest import free_port

    for url, state in ((gateway_suite.base_url + "/", "the suite is running"),
                       (f"http://127.0.0.1:{free_port()}/", "not running now")):
        out = tmp_path / state.replace(" ", "-")
        out.mkdir()
        browser.get(write_index(out, [], live_url=url).as_uri())
        WebDriverWait(browser, 30).until(lambda d, want=state: want in d.find_element(By.ID, "live-state").text)
        assert browser.find_element(By.CSS_SELECTOR, "#live a").get_attribute("href") == url
