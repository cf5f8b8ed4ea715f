"""Headless Chromium on a real ComfyUI page, driven over the DevTools protocol (websocket-client).

``Chromium(binary, profile)`` starts the browser; ``open_comfyui(browser, server)`` loads ComfyUI's
frontend and waits until the graph, flux2kit's extensions and the websocket are ready. Tests then run
JavaScript in the page (``evaluate``) and read back what is drawn: widget states, DOM sizes, texts.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import websocket

BINARY = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class BrowserError(RuntimeError):
    """The browser did not start, or a wait in the page timed out."""


class Chromium:
    """One headless Chromium with one page; ``errors`` collects the page's uncaught exceptions."""

    def __init__(self, binary: str, profile: str, *, width: int = 1700, height: int = 1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage", f"--remote-debugging-port={port}",
                                      f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws = None
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as f:
                    page = next(t for t in json.load(f) if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise BrowserError("headless Chromium did not start") from None
                time.sleep(0.3)
        # DevTools refuses websocket clients that send an Origin header it does not know
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self.ids = 0
        self.errors: list[str] = []

    def call(self, method: str, **params):
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(msg["params"]["exceptionDetails"])[:1000])
            if msg.get("id") == self.ids:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise BrowserError(json.dumps(r["exceptionDetails"])[:2000])
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 180.0):
        """The first truthy value of ``expression``, polled twice a second."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise BrowserError(f"timed out waiting for {expression[:120]}")

    def screenshot(self, path) -> None:
        """A PNG of the page, for a person to look at (tests assert on the DOM and the graph, not on pixels)."""
        import base64

        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def open_comfyui(browser: Chromium, server) -> None:
    """Load ComfyUI's frontend from ``server`` (a real_comfyui.ComfyUIServer) and wait until it is ready to use."""
    server.post_json("/settings/Comfy.TutorialCompleted", True)  # no first-run templates dialog over the graph
    browser.call("Runtime.enable")
    browser.call("Page.enable")
    browser.call("Page.navigate", url=server.url)
    browser.wait_for("!!(window.comfyAPI?.app?.app?.graph && window.LiteGraph)")
    browser.wait_for("['flux2kit.promptPreviews', 'flux2kit.api'].every((n) => "
                     "window.comfyAPI.app.app.extensions.some((e) => e.name === n))")
    browser.wait_for("!!(LiteGraph.registered_node_types['Flux2KitHexPalette'] && "
                     "LiteGraph.registered_node_types['PreviewAny'])")
    browser.wait_for("window.comfyAPI.api.api.socket?.readyState === 1")  # "executed" events need the socket
    # the frontend opens its default workflow once it is ready; a graph built before that would be replaced
    browser.wait_for("window.comfyAPI.app.app.graph.nodes.length > 0")
