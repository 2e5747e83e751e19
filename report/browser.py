"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): open a page, run a
script in it, take a screenshot, and collect what it logged as an error. Standard library only: the protocol is
JSON messages separated by NUL bytes on file descriptors 3 (to the browser) and 4 (from it), so no websocket client
and no browser download are needed; the Debian package `chromium` is enough.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from gradcam_engine.engine.errors import UserError

EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe")


class BrowserError(UserError):
    """No browser to drive, or the browser did not answer; the message says which and what to install."""


def find_chromium() -> str:
    """Path of a Chromium-family browser on PATH (or $CHROMIUM), else a BrowserError naming the package."""
    named = os.environ.get("CHROMIUM")
    for candidate in ([named] if named else []) + list(EXECUTABLES):
        found = shutil.which(candidate)
        if found:
            return found
    raise BrowserError("no Chromium found on PATH (looked for " + ", ".join(EXECUTABLES) + "); install it, e.g. "
                       "`apt-get install chromium` on Debian, or set $CHROMIUM")


def _high_fd(fd: int) -> int:
    """The same pipe end above 4, so placing the ends on 3 and 4 in the child cannot overwrite one another."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Chromium:
    """One headless browser and one page; use as a context manager."""

    def __init__(self, width: int = 1280, height: int = 2000, timeout: float = 60.0,
                 executable: str | None = None):
        executable = executable or find_chromium()  # before anything is opened, so a failure leaves nothing behind
        self.width, self.height, self.timeout = width, height, timeout
        self.errors: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        self._profile = tempfile.mkdtemp(prefix="gradcam-chromium-")
        self._log = open(Path(self._profile) / "stderr.log", "w+b")
        to_browser_read, to_browser_write = (_high_fd(fd) for fd in os.pipe())
        from_browser_read, from_browser_write = (_high_fd(fd) for fd in os.pipe())

        def place_pipes() -> None:  # runs in the child, before exec
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        args = [executable, *FLAGS, f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}", "about:blank"]
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                         preexec_fn=place_pipes, pass_fds=(3, 4))
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._write_fd, self._read_fd = to_browser_write, from_browser_read
        self._session: str | None = None

    def __enter__(self) -> "Chromium":
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()  # no browser left behind when it never became usable
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._process.poll() is None:
                self._send({"id": self._new_id(), "method": "Browser.close"})
                self._process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            for fd in (self._write_fd, self._read_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    # --- the protocol ---------------------------------------------------------------------------------------------
    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._read_fd], [], [], max(0.0, left))
            if not ready:
                raise BrowserError(f"Chromium did not answer within {self.timeout:.0f} s{self._stderr_tail()}")
            chunk = os.read(self._read_fd, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (code {self._process.poll()}){self._stderr_tail()}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def _stderr_tail(self) -> str:
        self._log.flush()
        self._log.seek(0)
        lines = [line for line in self._log.read().decode(errors="replace").splitlines() if line.strip()]
        return (": " + " | ".join(lines[-3:])) if lines else ""

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command (to the page once attached) and wait for its answer; events met meanwhile are kept."""
        message: dict[str, Any] = {"id": self._new_id(), "method": method, "params": params or {}}
        if self._session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self._session
        self._send(message)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise BrowserError(f"Chromium refused {method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self._event(reply)

    def _event(self, event: dict[str, Any]) -> None:
        """Keep what the page reports as an error: uncaught exceptions, console.error, and browser log errors
        (a blocked or failed load, a Content-Security-Policy violation)."""
        self._events.append(event)
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append("exception: " + str(details.get("exception", {}).get("description")
                                                   or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", "")))
                                                      for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())

    def _wait_for(self, method: str) -> None:
        deadline = time.monotonic() + self.timeout
        if any(e.get("method") == method for e in self._events):
            return
        while True:
            event = self._receive(deadline)
            self._event(event)
            if event.get("method") == method:
                return

    # --- what callers use -----------------------------------------------------------------------------------------
    def open(self, url_or_path: str | Path) -> None:
        """Load a page (a file path or a URL) and wait for its load event."""
        text = str(url_or_path)
        url = text if "://" in text or text.startswith("about:") else Path(text).resolve().as_uri()
        self._events.clear()
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self._wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """Run a script in the page (promises awaited) and return its JSON value."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def screenshot(self, full_page: bool = False) -> bytes:
        """PNG of the viewport (or of the whole page)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate("({w: document.documentElement.scrollWidth, "
                                 "h: document.documentElement.scrollHeight})")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": size["w"], "height": size["h"],
                                                           "scale": 1})
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])


IMAGES_SCRIPT = """
Promise.all(Array.from(document.images).map(function (img) {
  return img.decode().then(function () { return null; }, function () { return null; });
})).then(function () {
  return Array.from(document.images).map(function (img) {
    return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight};
  });
})
"""


def page_images(browser: Chromium) -> list[dict[str, Any]]:
    """Every <img> of the open page once decoded (or failed): alt text, complete, natural size (0 when broken)."""
    return browser.evaluate(IMAGES_SCRIPT)
