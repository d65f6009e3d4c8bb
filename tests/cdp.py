"""A headless Chromium driven over the DevTools protocol on a pipe, for tests: no Python dependency.

Chromium's --remote-debugging-pipe reads protocol messages (JSON, each ending in a NUL byte) on its
file descriptor 3 and writes replies and events on 4. `Chromium.open(url)` loads a page in a new tab
and returns what a test asks of it: each image's natural width, each table's size, and every console
error, uncaught exception and failed load the page produced (Runtime and Log domains).
`Chromium.poll(url, expression, done)` evaluates JavaScript on a page until it says the page has drawn
what a test waits for (MLflow's UI fetches its runs and draws its charts after the load event).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

CANDIDATES = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """$VPN_CHROMIUM, else the first of CANDIDATES on PATH (Debian's package installs /usr/bin/chromium)."""
    return os.environ.get("VPN_CHROMIUM") or next((p for p in map(shutil.which, CANDIDATES) if p), None)


@dataclass
class Page:
    """What the browser saw: images (src, complete, natural width), tables (rows, columns, pixel
    height) and errors (console errors, exceptions, failed loads), in the order they came."""

    images: list[dict[str, Any]] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


INSPECT = """JSON.stringify({
  images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete, width: i.naturalWidth})),
  tables: [...document.querySelectorAll('table')].map(t => ({rows: t.rows.length,
           columns: t.rows.length ? t.rows[0].cells.length : 0, height: t.getBoundingClientRect().height}))
})"""


# argv: read end, write end, then the browser's command. Both ends go through descriptors >= 10
# first, so that neither is overwritten while the other moves to 3 or 4.
LAUNCHER = """import fcntl, os, sys
ends = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]
for fd in sys.argv[1:3]:
    os.close(int(fd))
for target, fd in zip((3, 4), ends):
    os.dup2(fd, target)
    os.close(fd)
os.execvp(sys.argv[3], sys.argv[3:])
"""


class Chromium:
    """One headless browser process; use as a context manager."""

    def __init__(self, executable: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="vpn-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            executable, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}",
            "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-extensions", "--mute-audio", *(("--no-sandbox",) if os.geteuid() == 0 else ()),  # root (CI)
            "about:blank",
        ]  # fmt: skip
        # A small launcher moves the pipe's ends to the descriptors 3 and 4 that Chromium reads and writes.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(to_browser_r), str(from_browser_w), *args],
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._send("Browser.close")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    # -- the protocol -------------------------------------------------------------------------------
    def _send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"no answer from Chromium in {self.timeout:.0f} s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept."""
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._events.append(message)

    def wait_for(self, event: str, session: str, since: int = 0) -> None:
        """Read until `event` of `session` is among the events kept from index `since` on."""
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == event and e.get("sessionId") == session for e in self._events[since:]):
            self._events.append(self._read(deadline))

    # -- a page -------------------------------------------------------------------------------------
    def open(self, url: str, settle_s: float = 0.5) -> Page:
        """Load url in a new tab, wait for its load event (every image fetched or failed), inspect it."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=session)
        navigation = self.call("Page.navigate", {"url": url}, session=session)
        if navigation.get("errorText"):
            raise RuntimeError(f"{url}: {navigation['errorText']}")
        # The reply comes when the navigation commits: every event of the page comes after it.
        since = len(self._events)
        self.wait_for("Page.loadEventFired", session, since)
        time.sleep(settle_s)  # late console messages
        found = json.loads(
            self.call("Runtime.evaluate", {"expression": INSPECT, "returnByValue": True}, session=session)["result"][
                "value"
            ]
        )
        page = Page(images=found["images"], tables=found["tables"])
        for e in (e for e in self._events[since:] if e.get("sessionId") == session):
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                page.errors.append(
                    "console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                )
            elif e["method"] == "Runtime.exceptionThrown":
                details = p.get("exceptionDetails", {})
                page.errors.append(
                    "exception: " + str(details.get("exception", {}).get("description", details.get("text")))
                )
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                page.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        self.call("Target.closeTarget", {"targetId": target})
        return page

    def poll(
        self,
        url: str,
        expression: str,
        done: Callable[[Any], bool],
        timeout: float = 90.0,
        size: tuple[int, int] = (1600, 1000),
    ) -> Any:
        """Load url in a new tab of `size` (width, height) pixels and evaluate `expression` (JavaScript giving a
        JSON value) every half second until done(value) or `timeout` passes; returns the last value. For
        pages that draw after their load event (a single-page app fetching its data)."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        width, height = size
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, session=session)
        navigation = self.call("Page.navigate", {"url": url}, session=session)
        if navigation.get("errorText"):
            raise RuntimeError(f"{url}: {navigation['errorText']}")
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
            value = answer.get("result", {}).get("value")
            if done(value):
                break
            time.sleep(0.5)
        self.call("Target.closeTarget", {"targetId": target})
        return value
