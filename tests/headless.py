"""A headless Chromium driven over the DevTools protocol through a pipe (``--remote-debugging-pipe``):
standard library only, no selenium, no websocket package.

    with Browser.launch(tmp_dir) as browser:
        page = browser.open("file:///.../index.html")   # waits for the load event
        page.evaluate("document.title")
        page.errors                                     # console errors, uncaught exceptions, failed loads
        page.screenshot(path)
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

INSTALL_HINT = ("the report's browser test needs Debian's chromium: `apt-get install -y chromium` "
                "(or set JSNMF_CHROMIUM to a Chrome/Chromium binary)")


def find_chromium() -> str | None:
    for name in (os.environ.get("JSNMF_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    def __init__(self, process: subprocess.Popen, write_fd: int, read_fd: int, log: Path):
        self.process, self.write_fd, self.log = process, write_fd, log
        self.events: queue.Queue = queue.Queue()
        self.replies: dict[int, dict] = {}
        self.lock = threading.Condition()
        self.next_id = 0
        self.reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self.reader.start()

    @classmethod
    def launch(cls, work_dir: Path, binary: str | None = None) -> "Browser":
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # high-numbered copies, so putting them at 3 and 4 in the child cannot clobber one another
        high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 20) for fd in (to_child_r, from_child_w))

        def child_fds():
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        log = work_dir / "chromium.log"
        args = [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={work_dir / 'profile'}", "--window-size=1280,900", "about:blank"]
        with open(log, "wb") as stderr:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                       preexec_fn=child_fds, pass_fds=(3, 4))
        for fd in (to_child_r, from_child_w, high_r, high_w):
            os.close(fd)
        return cls(process, to_child_w, from_child_r, log)

    def _read(self, fd: int) -> None:
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as stream:
            while True:
                chunk = stream.read(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    message = json.loads(raw)
                    if "id" in message:
                        with self.lock:
                            self.replies[message["id"]] = message
                            self.lock.notify_all()
                    else:
                        self.events.put(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.next_id not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise TimeoutError(f"chromium did not answer {method}; see {self.log}")
                self.lock.wait(min(left, 0.5))
            reply = self.replies.pop(self.next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url: str, timeout: float = 60) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        page.wait_for("Page.loadEventFired", timeout)
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.write_fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session
        self.errors: list[str] = []
        self.requests: list[str] = []

    def _note(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"uncaught: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console." + params["type"] + ": "
                               + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.loadingFailed":
            self.errors.append(f"failed to load: {params.get('errorText')}")

    def drain(self) -> None:
        """Take in the events that arrived (console messages, exceptions, requests)."""
        while True:
            try:
                event = self.browser.events.get_nowait()
            except queue.Empty:
                return
            if event.get("sessionId") == self.session:
                self._note(event)

    def wait_for(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.browser.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if event.get("sessionId") == self.session:
                self._note(event)
                if event.get("method") == method:
                    return
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str):
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}…: {result['exceptionDetails']}")
        self.drain()
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.browser.send("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
