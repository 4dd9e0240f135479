"""The web page in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium):
load `/`, send a prompt with prompt-lookup (side by side with plain), see the streamed tokens, an
accepted draft token marked, and the stats panels filled in; the same behind `--api-key`. A
screenshot of each run goes to $ARGEN_TEST_ARTIFACTS (default: the test's tmp dir).

Without the browser the tests skip, saying what to install; with ARGEN_REQUIRE_BROWSER=1 (CI) they fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from server_helpers import running_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"
KEY = "browser-secret"


def _missing() -> list[str]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        import selenium  # noqa: F401  -- optional: in the `test` extra only
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    return missing


@pytest.fixture(scope="module")
def browser():
    if missing := _missing():
        reason = f"no headless browser: {', '.join(missing)} missing; run `{INSTALL}` (and install the test extra)"
        if os.environ.get("ARGEN_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver  # optional dependency (the `test` extra): imported only when present
    from selenium.webdriver.chrome.service import Service  # optional dependency, as above

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # the system browser: Selenium Manager never downloads one
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("ARGEN_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _chat(driver, url: str, screenshot: Path, key: str | None = None) -> None:
    from selenium.webdriver.common.by import By  # optional dependency (the `test` extra)
    from selenium.webdriver.common.keys import Keys  # optional dependency, as above
    from selenium.webdriver.support import expected_conditions as ec  # optional dependency, as above
    from selenium.webdriver.support.ui import Select, WebDriverWait  # optional dependency, as above

    wait = WebDriverWait(driver, 20)
    driver.get(url + "/")
    if key is not None:
        wait.until(lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None)
        driver.find_element(By.ID, "key").send_keys(key, Keys.ENTER)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#strategy-a option[value='prompt-lookup']")))
    assert driver.find_element(By.ID, "model").text == "tiny-looping"
    Select(driver.find_element(By.ID, "strategy-a")).select_by_value("prompt-lookup")
    adaptive = driver.find_element(By.ID, "opt-a-adaptive")
    if adaptive.is_selected():
        adaptive.click()
    driver.find_element(By.ID, "side-by-side").click()
    Select(driver.find_element(By.ID, "strategy-b")).select_by_value("plain")
    tokens = driver.find_element(By.ID, "max_tokens")
    tokens.clear()
    tokens.send_keys("64")
    driver.find_element(By.ID, "system").send_keys("Repeat yourself.")
    driver.find_element(By.ID, "prompt").send_keys("hello hello", Keys.ENTER)  # Enter sends

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".stats.final")) == 2)
    columns = driver.find_elements(By.CSS_SELECTOR, ".column")
    assert [c.find_element(By.TAG_NAME, "h3").text for c in columns] == ["prompt-lookup", "plain"]
    for column in columns:
        spans = column.find_elements(By.CSS_SELECTOR, ".output .tok")
        assert len(spans) == 64, "one span per streamed token"
        stats = {
            row.get_attribute("data-stat"): row.text for row in column.find_elements(By.CSS_SELECTOR, "[data-stat]")
        }
        assert float(stats["tokens/s"].split()[-1]) > 0 and stats["tokens"].endswith("64")
    lookup, plain = columns
    drafts = lookup.find_elements(By.CSS_SELECTOR, ".output .tok.o-draft")
    assert drafts, "no token marked as an accepted draft"
    assert not plain.find_elements(By.CSS_SELECTOR, ".tok.o-draft")
    acceptance = lookup.find_element(By.CSS_SELECTOR, "[data-stat='acceptance'] dd").text
    assert acceptance.endswith("%") and int(acceptance[:-1]) > 0
    accepted = lookup.find_element(By.CSS_SELECTOR, "[data-stat='draft tokens'] dd").text.split("/")[0]
    assert len(drafts) == int(accepted)  # greedy, 64 tokens: no draft cut by max_tokens here
    assert driver.execute_script("return document.querySelector('.output').innerText.length") > 0

    # Keyboard: an answer takes the focus, the arrow keys walk its tokens, each shows its details.
    output = lookup.find_element(By.CSS_SELECTOR, ".output")
    output.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    focused = driver.switch_to.active_element
    assert focused == lookup.find_elements(By.CSS_SELECTOR, ".output .tok")[1]
    wait.until(ec.visibility_of_element_located((By.ID, "tip")))
    assert "log-prob" in driver.find_element(By.ID, "tip").text
    assert focused.get_attribute("aria-describedby") == "tip"
    driver.execute_script("arguments[0].focus()", drafts[0])
    tip = driver.find_element(By.ID, "tip").text
    assert "draft: proposed by the strategy's drafter" in tip and "log-prob" in tip
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    # Nothing was fetched from anywhere but this server, and nothing broke (a CSP violation is logged).
    origins = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert origins and all(name.startswith(url + "/") for name in origins), origins
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    if key is not None:  # the first /v1/argen/strategies, before the key was given, is logged as a 401
        errors = [entry for entry in errors if "401" not in entry["message"]]
    assert not errors, errors


def test_the_page_streams_and_shows_where_tokens_came_from(browser, looping, artifacts):
    from selenium.webdriver.common.by import By  # optional dependency (the `test` extra)
    from selenium.webdriver.support.ui import WebDriverWait  # optional dependency, as above

    with running_server(looping) as (url, _):
        _chat(browser, url, artifacts / "web-page.png")
        # Regenerate with n=2: the last answer is replaced by two samples per strategy.
        n = browser.find_element(By.ID, "n")
        n.clear()
        n.send_keys("2")
        browser.find_element(By.ID, "regenerate").click()
        WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".stats.final")) == 4)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.user")) == 1
        assert len(browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == 1
        assert len(browser.find_elements(By.CSS_SELECTOR, ".column .output")) == 4


def test_the_page_behind_an_api_key(browser, looping, artifacts):
    with running_server(looping, api_key=KEY) as (url, _):
        _chat(browser, url, artifacts / "web-page-api-key.png", key=KEY)
        assert browser.execute_script("return sessionStorage.getItem('argen.apiKey')") == KEY
