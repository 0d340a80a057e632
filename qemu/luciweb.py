"""A real browser on LuCI: Debian's chromium, headless, driven through its chromedriver
(Selenium), against the router's uhttpd through the lab's management port.

Why a browser and not curl: luci-app-oe's pages are JavaScript views that LuCI builds in
the browser (form.js, rpc.js, poll); only a browser runs them, and only a browser refuses
an invalid form value before it is saved. Nothing is downloaded: the browser and its
driver are Debian's packages (scripts/apt-packages.txt), Selenium is told their paths.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

T = TypeVar("T")


class BrowserError(AssertionError):
    """What the page did not show in time, with what it showed instead."""


class Browser:
    """One headless chromium session on one LuCI (``base``: http://host:port)."""

    def __init__(self, base: str, artifacts: Path, width: int = 1400, height: int = 1800) -> None:
        self.base = base.rstrip("/")
        self.artifacts = artifacts
        artifacts.mkdir(parents=True, exist_ok=True)
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # root in CI: chromium's sandbox refuses to run as root
            "--disable-dev-shm-usage",
            "--disable-gpu",
            f"--window-size={width},{height}",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(
            service=Service(
                executable_path=CHROMEDRIVER, log_output=str(artifacts / "chromedriver.log")
            ),
            options=opts,
        )
        self.driver.set_page_load_timeout(90)

    def close(self) -> None:
        with contextlib.suppress(WebDriverException):
            self.driver.quit()

    # -- navigation

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def login(self, user: str, password: str) -> None:
        """LuCI's own login (the bootstrap theme's sysauth view): type and press Log in."""
        self.driver.delete_all_cookies()
        self.open("/cgi-bin/luci/")
        name = self.wait("the login form", lambda: self.visible(By.NAME, "luci_username"))
        name.clear()
        name.send_keys(user)
        pw = self.driver.find_element(By.NAME, "luci_password")
        pw.send_keys(password)
        self.wait("the Log in button", lambda: self.visible(By.CSS_SELECTOR, "button")).click()
        self.wait(
            "a logged-in page (the sysauth cookie)",
            lambda: any(c["name"].startswith("sysauth") for c in self.driver.get_cookies()) or None,
        )

    # -- reading the page

    def visible(self, by: str, what: str) -> WebElement | None:
        try:
            el = self.driver.find_element(by, what)
        except NoSuchElementException:
            return None
        return el if el.is_displayed() else None

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 60) -> T:
        """``probe()`` until it returns something truthy; fail naming ``what`` and showing
        the page's text and its JavaScript errors."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = probe()
            except (NoSuchElementException, StaleElementReferenceException):
                got = None
            if got:
                return got
            if time.monotonic() > deadline:
                shot = self.screenshot(f"timeout-{_slug(what)}")
                raise BrowserError(
                    f"the page did not show {what} in {timeout:.0f} s ({self.driver.current_url});"
                    f" screenshot {shot}; page text:\n{self.text()[:2000]}\n"
                    f"console: {self.console()[-10:]}"
                )
            time.sleep(0.25)

    def find(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def rows(self, css: str) -> list[dict[str, str]]:
        """Every element matching ``css``: its attributes and its text (``text``), read in
        one script, so a view that re-renders while it polls cannot hand out stale rows."""
        return list(
            self.driver.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0])).map(function(e) {"
                " var a = {}; for (const x of e.attributes) a[x.name] = x.value;"
                " a.text = e.innerText;"
                " a.disabled = (e.disabled || e.hasAttribute('disabled')) ? '1' : '';"
                " return a; });",
                css,
            )
        )

    def click(self, what: str, css: str, timeout: float = 60) -> None:
        """Click the first enabled element matching ``css``, finding it again if the page
        re-rendered it in between."""

        def press() -> bool:
            for el in self.find(css):
                if el.is_enabled():
                    el.click()
                    return True
            return False

        self.wait(what, press, timeout)

    def text(self) -> str:
        try:
            return str(self.driver.find_element(By.TAG_NAME, "body").text)
        except WebDriverException:
            return ""

    def console(self) -> list[str]:
        """The browser console's messages so far (errors of the views among them)."""
        try:
            return [str(e.get("message")) for e in self.driver.get_log("browser")]
        except WebDriverException:
            return []

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{_slug(name)}.png"
        self.driver.save_screenshot(str(path))
        return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)[:80]
