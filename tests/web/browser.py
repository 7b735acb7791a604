"""Headless Chromium for the web page's tests: Debian's chromium + chromedriver driven by
Selenium (no browser download), installed by the test when it runs as root, else skipped.

`open_browser(tmp, url)` yields a `Page` on `url` with helpers by data-testid; `wait_for` polls a
condition with a deadline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e .[test])"
)
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

__all__ = ["By", "Page", "Select", "ensure_chromium", "open_browser", "wait_for"]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium keeps calling home, which a closed network
# answers with a flood of errors.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
]

T = TypeVar("T")


def ensure_chromium() -> None:
    """Debian's chromium and chromium-driver: present, installed now (root), or skip."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if os.geteuid() != 0:
        pytest.skip(
            "browser tests skipped: Debian's chromium and chromium-driver are not installed and this "
            "run is not root (install them: apt-get install chromium chromium-driver)"
        )
    if shutil.which("apt-get") is None:
        pytest.skip("browser tests skipped: chromium is missing and there is no apt-get to install it")
    steps = [
        ["apt-get", "update"],
        ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "chromium", "chromium-driver"],
    ]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
        if done.returncode != 0:
            pytest.skip(f"browser tests skipped: `{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("browser tests skipped: the chromium packages installed no /usr/bin/chromium(driver)")


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, poll_s: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


class Page:
    """The browser on the page, with small helpers by data-testid."""

    def __init__(self, driver: Any, base_url: str, shots: Path) -> None:
        self.driver = driver
        self.base_url = base_url
        self.shots = shots

    def el(self, testid: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def text(self, testid: str) -> str:
        found = self.driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')
        return str(found[0].text) if found else ""

    def attr(self, testid: str, name: str) -> str | None:
        found = self.driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')
        value = found[0].get_attribute(name) if found else None
        return None if value is None else str(value)

    def type(self, testid: str, text: str) -> None:
        field = self.el(testid)
        field.clear()
        field.send_keys(text)

    def number(self, testid: str) -> float | None:
        try:
            return float(self.text(testid))
        except ValueError:
            return None

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


@contextmanager
def open_browser(tmp: Path, url: str) -> Iterator[Page]:
    """A fresh headless Chromium (own profile under `tmp`) on `url`; screenshots in tmp/screenshots."""
    ensure_chromium()
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    shots = tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    print(f"screenshots: {shots}")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        pytest.fail(f"headless Chromium did not start: {exc.msg}")
    driver.set_page_load_timeout(30)
    try:
        driver.get(url)
        yield Page(driver, url, shots)
    finally:
        driver.quit()
