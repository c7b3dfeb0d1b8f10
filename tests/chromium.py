"""Headless Chromium through chromedriver's W3C WebDriver HTTP API, with httpx (no Selenium).

Debian's ``chromium`` and ``chromium-driver`` packages (``make install`` installs them):
chromedriver is started on a free port of 127.0.0.1 (it accepts local connections only),
drives one headless Chromium, and is killed, with its process group, on :meth:`Browser.close`.
Only what the tests need: open a URL, set a cookie, run a script, wait for a condition,
take a screenshot.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

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
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver's key of an element reference

T = TypeVar("T")


class BrowserError(AssertionError):
    """chromedriver or Chromium did not do what was asked (message says what)."""


def missing() -> str | None:
    """Why no browser can be driven here (None when both binaries are there)."""
    for path, package in ((CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: run `make install` (it installs the Debian package {package})"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Browser:
    """One headless Chromium session; use as a context manager (always closed)."""

    def __init__(self, log_file: Path, *, width: int = 1440, height: int = 1000) -> None:
        problem = missing()
        if problem:
            raise BrowserError(problem)
        self.log_file = log_file
        self.port = _free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="nfs-chromium-"))
        self.size = (width, height)
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        self.session: str | None = None

    def __enter__(self) -> Browser:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, timeout: float = 30) -> None:
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1", "--log-level=WARNING"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.get("/status").json()["value"]["ready"]:
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BrowserError(f"chromedriver did not become ready; see {self.log_file}")
            time.sleep(0.2)
        width, height = self.size
        options = {
            "binary": CHROMIUM,
            "args": [*FLAGS, f"--window-size={width},{height}", f"--user-data-dir={self.profile}"],
        }
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        self.session = self._call("POST", "/session", {"capabilities": capabilities})["sessionId"]
        self.set_viewport(width, height)

    def close(self) -> None:
        if self.session is not None:
            try:
                self.client.delete(f"/session/{self.session}", timeout=20)
            except httpx.HTTPError:
                pass
            self.session = None
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # chromedriver and every Chromium process
            except ProcessLookupError:
                pass
            self.process.wait(10)
        self.client.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    # -- WebDriver commands -------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.client.request(method, path, json=body)
        try:
            value = response.json()["value"]
        except (ValueError, KeyError):
            raise BrowserError(f"{method} {path}: {response.status_code} {response.text[:500]}") from None
        if response.status_code != 200:
            message = value.get("message", "") if isinstance(value, dict) else value
            raise BrowserError(f"{method} {path}: {response.status_code} {str(message)[:500]}")
        return value

    def command(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def add_cookie(self, name: str, value: str, *, path: str = "/") -> None:
        """Set a cookie for the origin of the page open now."""
        self.command("POST", "/cookie", {"cookie": {"name": name, "value": value, "path": path}})

    def find(self, css: str) -> str:
        """The WebDriver id of the first element matching ``css``."""
        found = self.command("POST", "/element", {"using": "css selector", "value": css})
        return found[ELEMENT_KEY]

    def type(self, css: str, text: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/click", {})

    def set_viewport(self, width: int, height: int) -> None:
        """The page's size in CSS pixels, exactly (the window's size includes no browser frame)."""
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.command("POST", "/goog/cdp/execute", {"cmd": "Emulation.setDeviceMetricsOverride", "params": metrics})

    def run(self, script: str, *args: Any) -> Any:
        """Run JavaScript (a function body: ``return ...``) in the page; its result."""
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def text(self) -> str:
        return self.run("return document.body ? document.body.innerText : '';")

    def wait_until(self, what: str, check: Callable[[], T | None], *, timeout: float = 60) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> bytes:
        """Save a PNG of the viewport to ``path``; return its bytes."""
        png = base64.b64decode(self.command("GET", "/screenshot"))
        if not png.startswith(PNG_SIGNATURE):
            raise BrowserError("the screenshot is not a PNG")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png
