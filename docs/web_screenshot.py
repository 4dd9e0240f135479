"""Makes docs/images/web-page.png: the web page on the default model, prompt-lookup side by side with
plain, a draft token's details shown. Needs the test extra and Debian's chromium + chromium-driver:

    PYTHONPATH=src python docs/web_screenshot.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

import argen

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from server_helpers import running_server  # noqa: E402  -- the tests' in-process server

OUT = ROOT / "docs" / "images" / "web-page.png"
PROMPT = (
    "Rename the variable total to acc in this function and show the whole function:\n\n"
    "def add_all(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total"
)


def main() -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
    try:
        with running_server(argen.load("default")) as (url, _):
            wait = WebDriverWait(driver, 120)
            driver.get(url + "/")
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#strategy-a option[value='prompt-lookup']"))
            Select(driver.find_element(By.ID, "strategy-a")).select_by_value("prompt-lookup")
            driver.find_element(By.ID, "side-by-side").click()
            Select(driver.find_element(By.ID, "strategy-b")).select_by_value("plain")
            tokens = driver.find_element(By.ID, "max_tokens")
            tokens.clear()
            tokens.send_keys("80")
            driver.find_element(By.ID, "system").send_keys("You are a careful Python programmer.")
            prompt = driver.find_element(By.ID, "prompt")
            for i, line in enumerate(PROMPT.split("\n")):
                if i:
                    prompt.send_keys(Keys.SHIFT, Keys.ENTER, Keys.NULL)  # Shift+Enter: a new line
                prompt.send_keys(line)
            prompt.send_keys(Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".stats.final")) == 2)
            # a draft token on one line (a click at the middle of a wrapped one lands between its lines)
            token = driver.execute_script(
                "return [...document.querySelectorAll('.output .tok.o-draft')]"
                ".find((s) => s.getClientRects().length === 1 && s.textContent.trim().length > 2)"
            )
            if token:
                ActionChains(driver).move_to_element(token).click().perform()  # its details: the tip
            driver.save_screenshot(str(OUT))
    finally:
        driver.quit()
    Image.open(OUT).convert("RGB").quantize(96).save(OUT, optimize=True)  # a small palette PNG
    print(OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
