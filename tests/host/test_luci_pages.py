"""luci-app-oe's pages in headless Chromium on LuCI's real JavaScript (luci-base and the
bootstrap theme as the userland build installs them, the app's files from its .ipk),
against a recording stand-in for rpcd, uhttpd's apply endpoints and the daemon
(tests/host/luci_pages.py). What the real router does with the calls is the QEMU tier's.

- the status page: device rows (peer, protected/clear, auth), tunnels, shunts; Down
  calls `oe down {"peer"}` and the tunnel leaves the page; Flush calls `oe flush`;
- a session without the write grant: status shown, no usable button, settings read-only;
- settings: an invalid CIDR is refused in the browser (nothing staged, nothing applied);
  a new hold limit and a new private group are staged with uci, applied (LuCI's checked
  apply), and the page asks the daemon to reload; a refused reload shows the daemon's
  problems, whether the gateway keeps the refusal's reply or drops it.

Needs Debian's chromium and chromium-driver and selenium (requirements-dev.txt): without
them the tests fail, they are not skipped.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ipk
import pytest

from tests.host.luci_pages import Backend, sample_devices, sample_status, serve

REPO = Path(__file__).resolve().parents[2]

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as exc:  # pragma: no cover - a missing test tool is a failure
    pytest.fail(f"selenium is needed (requirements-dev.txt): {exc}", pytrace=False)


@pytest.fixture(scope="module")
def www(openwrt_userland: Any, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """luci-app-oe's files as its .ipk installs them, then the userland's /www."""
    built = ipk.build_luci(tmp_path_factory.mktemp("ipk"))
    root = tmp_path_factory.mktemp("app-root")
    data = ipk.read_ipk(built.path)["data.tar.gz"]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(root, filter="data")
    base = openwrt_userland.root / "www"
    assert (base / "luci-static" / "resources" / "form.js").is_file(), base
    return [root / "www", base]


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("Debian's chromium and chromium-driver are needed", pytrace=False)
    opts = Options()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def _backend(**kw: Any) -> Backend:
    grants = {"flush": True, "down": True, "uci": True}
    return Backend(
        uci_text=(REPO / "files/etc/config/oe").read_text(),
        status=sample_status(),
        devices=sample_devices(),
        grants={**grants, **kw.pop("grants", {})},
        **kw,
    )


def _wait(drv: WebDriver, what: str, cond: Callable[[WebDriver], Any], timeout: float = 20) -> Any:
    try:
        return WebDriverWait(drv, timeout).until(cond)
    except Exception as exc:
        raise AssertionError(f"timed out waiting for {what}") from exc


#: browser log lines that are the stand-in's or LuCI's own, not the app's: no favicon and
#: no cgi-io (LuCI's reachability probe after apply loads /cgi-bin/cgi-exec)
NOT_THE_APPS = ("favicon", "/cgi-bin/cgi-exec")


def _errors(drv: WebDriver) -> list[str]:
    """The page's JavaScript errors."""
    return [
        e["message"]
        for e in drv.get_log("browser")
        if e["level"] == "SEVERE" and not any(n in e["message"] for n in NOT_THE_APPS)
    ]


def _rows(drv: WebDriver, selector: str) -> list[dict[str, str | None]]:
    out = []
    for tr in drv.find_elements(By.CSS_SELECTOR, selector):
        attrs = ("data-peer", "data-state", "data-auth", "data-source", "data-device")
        out.append({a: tr.get_attribute(a) for a in attrs})
    return out


def test_status_page_rows_and_its_buttons(
    browser: WebDriver, www: list[Path], tmp_path: Path
) -> None:
    backend = _backend()
    with serve(www, backend) as base:
        browser.get(base + "/page/oe/status")
        _wait(browser, "the device table", lambda d: d.find_elements(By.ID, "oe-devices"))
        browser.save_screenshot(str(tmp_path / "status.png"))
        devices = _rows(browser, "#oe-devices tr.oe-destination")
        assert [(r["data-peer"], r["data-state"], r["data-auth"]) for r in devices] == [
            ("192.0.2.7", "protected", "pubkey"),
            ("192.0.2.9", "clear", ""),
        ]
        tunnels = _rows(browser, "#oe-tunnels tr.oe-tunnel")
        assert [(r["data-peer"], r["data-source"]) for r in tunnels] == [
            ("192.0.2.7", "oe"),
            ("203.0.113.5", "ike"),
        ]
        shunt = browser.find_element(By.CSS_SELECTOR, "#oe-shunts tr.oe-shunt")
        assert shunt.get_attribute("data-destination") == "192.0.2.9/32"
        assert "no key" in shunt.text
        assert "queries" in browser.find_element(By.ID, "oe-dns").text

        down = browser.find_element(By.CSS_SELECTOR, "button.oe-down[data-peer='203.0.113.5']")
        assert down.is_enabled() and down.text == "Down"
        down.click()
        _wait(
            browser,
            "the tunnel to leave the page",
            lambda d: not d.find_elements(By.CSS_SELECTOR, "tr.oe-tunnel[data-peer='203.0.113.5']"),
        )
        browser.find_element(By.ID, "oe-flush").click()
        _wait(browser, "flush", lambda d: ["oe", "flush", {}] in backend.calls)
        assert ["oe", "down", {"peer": "203.0.113.5"}] in backend.calls
        assert not _errors(browser)


def test_without_the_write_grant_nothing_can_be_changed(
    browser: WebDriver, www: list[Path]
) -> None:
    backend = _backend(grants={"flush": False, "down": False, "uci": False})
    with serve(www, backend) as base:
        browser.get(base + "/page/oe/status/ro")
        _wait(browser, "the device table", lambda d: d.find_elements(By.ID, "oe-devices"))
        assert _rows(browser, "#oe-devices tr.oe-destination")
        buttons = browser.find_elements(By.CSS_SELECTOR, "#oe-status button")
        assert len(buttons) == 3 and not any(b.is_enabled() for b in buttons)
        for b in buttons:
            browser.execute_script("arguments[0].click()", b)  # even a forced click
        time.sleep(1)
        assert not [c for c in backend.calls if c[0] == "oe" and c[1] in ("flush", "down")]

        browser.get(base + "/page/oe/settings/ro")
        _wait(browser, "the form", lambda d: d.find_elements(By.ID, "oe-settings"))
        assert browser.find_element(By.ID, "oe-settings").get_attribute("data-writable") == "0"
        field = browser.find_element(By.ID, "widget.cbid.oe.dns.hold_limit")
        assert not field.is_enabled()
        for b in browser.find_elements(By.CSS_SELECTOR, ".cbi-page-actions button"):
            assert not b.is_enabled(), b.text
        apply = browser.find_element(By.CSS_SELECTOR, ".cbi-page-actions .cbi-button-apply")
        assert apply.get_attribute("disabled") is not None
        assert not _errors(browser)


def _policy_input(drv: WebDriver, group: str) -> WebElement:
    node = drv.find_element(By.CSS_SELECTOR, f"[data-oe-group='{group}']")
    return node.find_element(By.CSS_SELECTOR, "input[id$='.dest']")


def _staged(backend: Backend) -> list[list[Any]]:
    return [c for c in backend.calls if c[0] == "uci" and c[1] in ("set", "add", "delete")]


def test_an_invalid_cidr_is_refused_in_the_browser(browser: WebDriver, www: list[Path]) -> None:
    backend = _backend()
    with serve(www, backend) as base:
        browser.get(base + "/page/oe/settings")
        _wait(browser, "the form", lambda d: d.find_elements(By.CSS_SELECTOR, "[data-oe-group]"))
        field = _policy_input(browser, "clear")
        field.send_keys("10.0.0.1/8", Keys.ENTER)
        assert "cbi-input-invalid" in (field.get_attribute("class") or "")
        assert "host bits set" in (field.get_attribute("data-tooltip") or "")
        items = browser.find_elements(By.CSS_SELECTOR, "[data-oe-group='clear'] .item")
        assert "10.0.0.1/8" not in [i.text for i in items]
        browser.find_element(By.CSS_SELECTOR, ".cbi-page-actions .cbi-button-apply").click()
        modal = _wait(browser, "the refusal", lambda d: d.find_elements(By.CSS_SELECTOR, ".modal"))
        assert "10.0.0.1/8" in modal[0].text and "host bits set" in modal[0].text
        time.sleep(1)
        assert not _staged(backend)
        assert not [c for c in backend.calls if c[0] in ("http", "oe") and c[1] != "status"]
        # LuCI rejects Save by throwing the refusal (form.js): the only error on the page
        errors = _errors(browser)
        assert len(errors) == 1 and "Destinations" in errors[0], errors


def _set_hold_limit_and_add_private(drv: WebDriver, cidr: str) -> None:
    hold = drv.find_element(By.ID, "widget.cbid.oe.dns.hold_limit")
    hold.clear()
    hold.send_keys("5s", Keys.TAB)
    add = drv.find_element(By.CSS_SELECTOR, "[data-oe-section='policy'] .cbi-section-create button")
    add.click()
    new = _wait(
        drv,
        "the new policy section",
        lambda d: d.find_elements(By.CSS_SELECTOR, "[data-oe-section='policy'] [data-oe-group='']"),
    )[0]
    group = new.find_element(By.CSS_SELECTOR, "select[id$='.group']")
    assert group.get_attribute("value") == "private"
    field = new.find_element(By.CSS_SELECTOR, "input[id$='.dest']")
    field.send_keys(cidr, Keys.ENTER)
    assert cidr in [i.text for i in new.find_elements(By.CSS_SELECTOR, ".item")]


def test_save_and_apply_stages_applies_and_reloads(
    browser: WebDriver, www: list[Path], tmp_path: Path
) -> None:
    backend = _backend()
    with serve(www, backend) as base:
        browser.get(base + "/page/oe/settings")
        _wait(browser, "the form", lambda d: d.find_elements(By.CSS_SELECTOR, "[data-oe-group]"))
        _set_hold_limit_and_add_private(browser, "198.51.100.0/24")
        browser.find_element(By.CSS_SELECTOR, ".cbi-page-actions .cbi-button-apply").click()
        _wait(browser, "oe reload", lambda d: ["oe", "reload", {}] in backend.calls, 30)
        order = [c[1] for c in backend.calls if c[0] == "http" or c[1] == "reload"]
        assert order == ["apply_rollback", "confirm", "reload"], order
        values = backend.uci_values()
        assert values["dns"]["hold_limit"] == "5s"
        private = [v for v in values.values() if v.get("group") == "private"]
        assert len(private) == 1 and private[0]["dest"] == ["198.51.100.0/24"], private
        box = _wait(
            browser,
            "the reload's outcome",
            lambda d: [
                b
                for b in d.find_elements(By.ID, "oe-reload")
                if b.get_attribute("data-state") == "accepted"
            ],
        )[0]
        assert box.get_attribute("data-generation") == "4"
        browser.save_screenshot(str(tmp_path / "settings-applied.png"))
        assert not _errors(browser)


@pytest.mark.parametrize("dropped", [False, True], ids=["reply-kept", "reply-dropped"])
def test_a_refused_reload_shows_the_daemons_problems(
    browser: WebDriver, www: list[Path], dropped: bool
) -> None:
    """The daemon refuses what the form cannot check alone (here a cross-check): the page
    shows its problems and that the last good generation keeps running; with the
    refusal's reply dropped by the gateway the page reads them from `oe status`."""
    problem = "/etc/config/oe:38: oe.ike.rekey_margin: '2h' leaves no time before rekeying"
    backend = _backend(reload_problems=[problem], reload_body_dropped=dropped)
    with serve(www, backend) as base:
        browser.get(base + "/page/oe/settings")
        _wait(browser, "the form", lambda d: d.find_elements(By.CSS_SELECTOR, "[data-oe-group]"))
        margin = browser.find_element(By.ID, "widget.cbid.oe.ike.rekey_margin")
        margin.clear()
        margin.send_keys("2h", Keys.TAB)
        assert "cbi-input-invalid" not in (margin.get_attribute("class") or "")
        browser.find_element(By.CSS_SELECTOR, ".cbi-page-actions .cbi-button-apply").click()
        _wait(browser, "oe reload", lambda d: ["oe", "reload", {}] in backend.calls, 30)
        box = _wait(
            browser,
            "the refusal on the page",
            lambda d: [
                b
                for b in d.find_elements(By.ID, "oe-reload")
                if b.get_attribute("data-state") == "refused"
            ],
        )[0]
        assert box.get_attribute("data-generation") == "3"
        problems = box.find_elements(By.CSS_SELECTOR, "#oe-reload-problems li")
        assert [p.get_attribute("textContent") for p in problems] == [problem]
        assert backend.uci_values()["ike"]["rekey_margin"] == "2h"
        assert not _errors(browser)
