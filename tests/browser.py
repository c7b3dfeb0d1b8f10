"""Headless Chromium driven by Selenium, for the tests that use Airflow's UI as a person does.

Debian's ``chromium`` and ``chromium-driver`` packages (``make install`` installs them). The
chromedriver's path is given to Selenium, which then skips Selenium Manager (it would look for,
and download, a browser and a driver of its own). :func:`headless_chromium` starts one
browser with a clean profile and always quits it; when the block fails it first saves a
screenshot and the page's text next to chromedriver's log, for the failure report.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit

from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

CHROMEDRIVER = "/usr/bin/chromedriver"
# The real binary: /usr/bin/chromium is a shell wrapper that reads /etc/chromium.d.
CHROMIUM = "/usr/lib/chromium/chromium"
FLAGS = [
    "--headless=new",
    "--no-sandbox",  # runs as root here
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    "--lang=en-US",
]
# How long a page of Airflow's UI may take to show what is waited for (a shared, slow machine).
WAIT_S = 60


def missing() -> str | None:
    """Why no browser can be driven here (None when both binaries are there)."""
    for path, package in ((CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: run `make install` (it installs the Debian package {package})"
    return None


@contextmanager
def headless_chromium(log_file: Path, *, width: int = 1440, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A headless Chromium with a viewport of exactly ``width`` x ``height`` CSS pixels; always quit.

    chromedriver's log goes to ``log_file``; if the block raises, ``<log_file>.png`` and
    ``<log_file>.txt`` keep what the page showed.
    """
    problem = missing()
    if problem:
        raise AssertionError(problem)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--window-size={width},{height}"]:
        options.add_argument(flag)
    # Chromium leaves a directory for its singleton socket in $TMPDIR when it is stopped: give
    # it a $TMPDIR of its own, removed after. A short path: a socket's may not pass 107 bytes.
    with tempfile.TemporaryDirectory(prefix="nfs-chromium-", ignore_cleanup_errors=True) as tmpdir:
        service = Service(CHROMEDRIVER, log_output=str(log_file), service_args=["--log-level=WARNING"],
                          env={**os.environ, "TMPDIR": tmpdir})
        driver = webdriver.Chrome(service=service, options=options)
        try:
            set_viewport(driver, width, height)
            try:
                yield driver
            except BaseException:
                keep_page(driver, log_file)
                raise
        finally:
            driver.quit()


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` (an ASGI app) on a real HTTP server (uvicorn, in a thread) on a free port of
    127.0.0.1, for a browser to open: its base URL."""
    import uvicorn
    from local_airflow import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def keep_page(driver: webdriver.Chrome, log_file: Path) -> None:
    """Save what the page shows (screenshot, text, URL) next to ``log_file``, as far as it can be read."""
    try:
        driver.save_screenshot(str(log_file.with_suffix(".png")))
        log_file.with_suffix(".txt").write_text(f"{driver.current_url}\n\n{page_text(driver)}")
        print(f"\nthe browser's last page: {log_file.with_suffix('.png')} and {log_file.with_suffix('.txt')}")
    except (WebDriverException, OSError) as exc:
        print(f"\ncould not keep the browser's last page: {exc}")


def set_viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """The page's size in CSS pixels, exactly (a window's size would include the browser's frame)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def page_text(driver: webdriver.Chrome) -> str:
    """The text the page shows, as a person reads it."""
    return driver.execute_script("return document.body ? document.body.innerText : '';")


def wait(driver: webdriver.Chrome, timeout: float = WAIT_S) -> WebDriverWait:
    # Airflow's UI re-renders as it polls its API: an element found a moment ago may be gone.
    return WebDriverWait(driver, timeout, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException])


def click(driver: webdriver.Chrome, what: str, find: Callable[[webdriver.Chrome], WebElement | None]) -> None:
    """Click what ``find`` finds as soon as it is shown and enabled, found again if the UI re-rendered it."""

    def clicked(d: webdriver.Chrome) -> bool:
        element = find(d)
        if element is None or not (element.is_displayed() and element.is_enabled()):
            return False
        element.click()
        return True

    WebDriverWait(driver, WAIT_S, poll_frequency=0.5, ignored_exceptions=[
        StaleElementReferenceException, ElementClickInterceptedException, ElementNotInteractableException,
    ]).until(clicked, f"{what}: not clickable after {WAIT_S} s")


def first(locator: tuple[str, str]) -> Callable[[webdriver.Chrome], WebElement | None]:
    """A ``find`` for :func:`click`: the first element ``locator`` finds, if any."""
    return lambda d: next(iter(d.find_elements(*locator)), None)


def log_in(driver: webdriver.Chrome, base_url: str, username: str, password: str) -> None:
    """Log in through Airflow's login page, as a person does: type, press Sign in, land in the UI."""
    driver.get(f"{base_url}/")  # not logged in: Airflow sends the browser to its login page
    wait(driver).until(EC.element_to_be_clickable((By.NAME, "username"))).send_keys(username)
    driver.find_element(By.NAME, "password").send_keys(password)
    click(driver, "Sign in", first((By.CSS_SELECTOR, "button[type=submit]")))
    wait(driver).until(lambda d: "/auth/" not in d.current_url and d.current_url.startswith(base_url))


# -- Airflow's Required Actions (human-in-the-loop) pages --------------------------------------
# Selectors, as Airflow 3.3's UI renders them: the Browse menu's trigger is a button labelled
# "Browse" and its "Required Actions" item a link to /required_actions; that page lists each
# pending action with its subject linking to the task's Required Action tab, where each option
# is a button with data-testid "hitl-option-<option>".
OPTION_BUTTONS = "button[data-testid^='hitl-option-']"
# The text of the nearest element around the option buttons that shows the subject too: the
# action's panel (subject, body, buttons, and "Response received at ..." once answered).
PANEL_TEXT = f"""
for (let el = document.querySelector("{OPTION_BUTTONS}"); el; el = el.parentElement) {{
    if (el.innerText.includes(arguments[0])) return el.innerText;
}}
return "";"""


def required_action_path(dag_id: str, run_id: str, task_id: str) -> str:
    """The Required Action tab of a task instance (what the subject links to), as the UI writes it."""
    return f"/dags/{dag_id}/runs/{quote(run_id, safe='')}/tasks/{task_id}/required_actions"


def option_button(option: str) -> tuple[str, str]:
    return By.CSS_SELECTOR, f"button[data-testid='hitl-option-{option}']"


def open_required_action(driver: webdriver.Chrome, path: str, subject: str) -> None:
    """Browse > Required Actions, then the action's subject, as a person finds it; wait for its options."""

    def subject_link(d: webdriver.Chrome) -> WebElement | None:
        links = d.find_elements(By.CSS_SELECTOR, f"a[href='{path}']")  # the subject's and the task id's
        return next((a for a in links if a.get_property("textContent").strip() == subject), None)

    click(driver, "the Browse menu", first((By.CSS_SELECTOR, "button[aria-label='Browse']")))
    click(driver, "Browse > Required Actions", first((By.CSS_SELECTOR, "a[role=menuitem][href='/required_actions']")))
    click(driver, f"the subject {subject!r}", subject_link)
    wait(driver).until(lambda d: urlsplit(d.current_url).path == path)
    wait(driver).until(EC.presence_of_element_located((By.CSS_SELECTOR, OPTION_BUTTONS)))


def action_panel_text(driver: webdriver.Chrome, subject: str) -> str:
    """The text of the panel that shows the action's subject, body and option buttons ('' before it shows)."""
    return driver.execute_script(PANEL_TEXT, subject)
