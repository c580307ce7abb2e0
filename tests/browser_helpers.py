"""A page in headless Chromium at a chosen viewport, through the DevTools protocol over a pipe
(``--remote-debugging-pipe``: no port, no extra package): what a person on a phone or a desktop
sees, measured by a script in the page and as a screenshot. Plain functions (tests/conftest.py
holds the fixtures)."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars", "--remote-debugging-pipe")  # fmt: skip


def chromium() -> str | None:
    """The Chromium on this machine, if any."""
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@contextmanager
def devtools(browser: str, timeout: float = 60.0) -> Iterator[Callable[..., dict[str, Any]]]:
    """A fresh Chromium (its own profile folder); yields ``call(method, session=None, **params)``
    returning the result, and waiting for an event when ``method`` is ``"wait:<event>"``."""
    to_child, from_parent = os.pipe()  # Chromium reads commands on fd 3 ...
    to_parent, from_child = os.pipe()  # ... and writes answers and events on fd 4

    def wire_fds() -> None:  # in the child: its ends on fds 3 and 4, kept open across exec
        read_end, write_end = os.dup(to_child), os.dup(from_child)  # above 4 first: the pipes may sit on 3 or 4
        os.dup2(read_end, 3, inheritable=True)
        os.dup2(write_end, 4, inheritable=True)

    with tempfile.TemporaryDirectory(prefix="saferclip-chromium-") as profile:
        proc = subprocess.Popen([browser, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=wire_fds, close_fds=False,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        buffer, events, ids = b"", [], iter(range(1, 1 << 30))

        def read_message(deadline: float) -> dict[str, Any]:
            nonlocal buffer
            while b"\0" not in buffer:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([to_parent], [], [], max(left, 0))
                if not ready:
                    raise TimeoutError("Chromium did not answer in time")
                chunk = os.read(to_parent, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                buffer += chunk
            message, buffer = buffer.split(b"\0", 1)
            return json.loads(message)

        def call(method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            if method.startswith("wait:"):
                event = method[len("wait:") :]
                while True:
                    found = next((e for e in events if e.get("method") == event), None)
                    if found is not None:
                        events.remove(found)
                        return found.get("params", {})
                    events.append(read_message(deadline))
            number = next(ids)
            message = {"id": number, "method": method, "params": params, **({"sessionId": session} if session else {})}
            os.write(from_parent, json.dumps(message).encode() + b"\0")
            while True:
                answer = read_message(deadline)
                if answer.get("id") == number:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer.get("result", {})
                events.append(answer)

        try:
            yield call
        finally:
            try:
                call("Browser.close")
            except Exception:  # noqa: BLE001 - it may be gone already
                pass
            os.close(from_parent)
            os.close(to_parent)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def view_page(browser: str, page: Path, width: int, height: int, script: str, shot: Path | None = None) -> Any:
    """``page`` at a ``width`` x ``height`` CSS-pixel viewport (a phone below 600 px: mobile
    emulation): the value of ``script`` (an expression) evaluated once it has loaded, and with
    ``shot`` a screenshot of the viewport."""
    with devtools(browser) as call:
        target = call("Target.createTarget", url="about:blank")["targetId"]
        session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        call("Page.enable", session)
        call("Page.navigate", session, url=Path(page).absolute().as_uri())
        call("wait:Page.loadEventFired")
        value = call("Runtime.evaluate", session, expression=script, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in value:
            raise RuntimeError(f"the page's check failed: {value['exceptionDetails']}")
        if shot is not None:
            shot.write_bytes(base64.b64decode(call("Page.captureScreenshot", session, format="png")["data"]))
        return value["result"].get("value")
