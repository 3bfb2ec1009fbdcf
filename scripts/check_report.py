#!/usr/bin/env python3
"""Open a report in headless Chromium with the network cut off; confirm that every image
loads and that the page asks for nothing outside its own file.

    python scripts/check_report.py runs/demo-<time>/report.html [--min-images 8]

Chromium (Debian: ``apt-get install -y chromium``) is driven through the DevTools protocol
over a pipe (``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4), so
only the standard library is needed. The page runs offline (``Network.emulateNetworkConditions``,
and every host name resolves to nothing); every request the page makes is recorded
(``Network.requestWillBeSent``): anything but ``data:`` URLs and the report itself fails
the check, as does an ``<img>`` that is not complete or has ``naturalWidth`` 0 after the
load event. Prints one JSON line; exit status 0 when the report passes, 1 when it does
not, 2 when it cannot be checked (no browser, no file, the browser failed).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
_IMAGES = ("JSON.stringify(Array.from(document.images, i => ({src: i.src.slice(0, 60), "
           "alt: i.alt, complete: i.complete, width: i.naturalWidth, height: "
           "i.naturalHeight})))")


class CheckError(RuntimeError):
    """The report could not be checked (as opposed to: it was checked and failed)."""


def find_browser(name: str | None = None) -> str | None:
    """The Chromium executable: ``name`` if given, else the first of :data:`BROWSERS` found."""
    for candidate in (name,) if name else BROWSERS:
        path = shutil.which(candidate)
        if path:
            return path
    return None


class _DevTools:
    """The DevTools protocol over the pipe of a Chromium started here."""

    def __init__(self, browser: str, profile: str) -> None:
        to_browser_r, self._out = os.pipe()
        self._in, from_browser_w = os.pipe()
        argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                "--proxy-bypass-list=<-loopback>", f"--user-data-dir={profile}",
                "--remote-debugging-pipe", "about:blank"]
        devnull = os.open(os.devnull, os.O_WRONLY)
        actions = [(os.POSIX_SPAWN_DUP2, to_browser_r, 3),
                   (os.POSIX_SPAWN_DUP2, from_browser_w, 4),
                   (os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)]
        try:
            self.pid = os.posix_spawn(browser, argv, os.environ, file_actions=actions)
        finally:
            for fd in (to_browser_r, from_browser_w, devnull):
                os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send a command and wait for its result (events met meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        reply = self._read_until(lambda m: m.get("id") == self._next_id, timeout)
        if "error" in reply:
            raise CheckError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float) -> dict[str, Any]:
        """The first event ``method`` received so far, or the next one."""
        for event in self.events:
            if event.get("method") == method:
                return event
        return self._read_until(lambda m: m.get("method") == method, timeout)

    def _read_until(self, done: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if done(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise CheckError(f"the browser did not answer within {timeout:g} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise CheckError("the browser closed its DevTools pipe (it exited)")
            self._buffer += chunk

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (CheckError, OSError):
            pass
        deadline = time.monotonic() + 5
        while os.waitpid(self.pid, os.WNOHANG) == (0, 0):  # still running
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)  # the browser started here, by its pid
                os.waitpid(self.pid, 0)
                break
            time.sleep(0.05)
        for fd in (self._in, self._out):
            os.close(fd)


def check_report(path: str | Path, *, browser: str | None = None, timeout: float = 60.0,
                 min_images: int = 1) -> dict[str, Any]:
    """Render ``path`` offline in headless Chromium; a dict with ``ok``, the images and the
    requests that left the file. Raises :class:`CheckError` when it cannot be checked."""
    report = Path(path).resolve()
    if not report.is_file():
        raise CheckError(f"{report} is not a file")
    exe = find_browser(browser)
    if exe is None:
        names = (browser,) if browser else BROWSERS
        raise CheckError(f"no Chromium found (looked for {', '.join(names)}); "
                         "on Debian: apt-get install -y chromium")
    url = report.as_uri()
    with tempfile.TemporaryDirectory(prefix="check-report-") as profile:
        tools = _DevTools(exe, profile)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
            session = tools.send("Target.attachToTarget", {"targetId": target["targetId"],
                                                           "flatten": True})["sessionId"]
            for method, params in (("Network.enable", {}), ("Page.enable", {}),
                                   ("Network.emulateNetworkConditions", {
                                       "offline": True, "latency": 0,
                                       "downloadThroughput": -1, "uploadThroughput": -1})):
                tools.send(method, params, session)
            tools.events.clear()  # what the blank page did before is not the report's
            nav = tools.send("Page.navigate", {"url": url}, session, timeout=timeout)
            if nav.get("errorText"):
                raise CheckError(f"the browser could not open {url}: {nav['errorText']}")
            tools.wait_event("Page.loadEventFired", timeout)
            value = tools.send("Runtime.evaluate", {"expression": _IMAGES,
                                                    "returnByValue": True}, session)
            images = json.loads(value["result"]["value"])
            requests = [e["params"]["request"]["url"] for e in tools.events
                        if e.get("method") == "Network.requestWillBeSent"]
        finally:
            tools.close()
    if url not in requests:  # the page's own request must be among those seen
        raise CheckError(f"the browser reported no request for {url}: nothing was monitored")
    outside = [u for u in requests if not u.startswith("data:") and u != url]
    broken = [i for i in images if not i["complete"] or i["width"] == 0]
    return {"report": str(report), "ok": not outside and not broken
            and len(images) >= min_images, "images": len(images),
            "broken_images": broken, "requests_seen": len(requests),
            "requests_outside_the_file": outside,
            "min_images": min_images, "browser": exe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="the report.html to check")
    parser.add_argument("--browser", help=f"Chromium executable (default: the first of "
                        f"{', '.join(BROWSERS)} on PATH)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the page (default 60)")
    parser.add_argument("--min-images", type=int, default=1,
                        help="fail if the page has fewer images (default 1)")
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.min_images < 0:
        parser.error("--timeout must be > 0 and --min-images ≥ 0")
    try:
        result = check_report(args.report, browser=args.browser, timeout=args.timeout,
                              min_images=args.min_images)
    except (CheckError, OSError) as exc:
        print(json.dumps({"report": args.report, "ok": None, "error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
