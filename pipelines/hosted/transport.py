"""HTTP for the hosted APIs: one request at a time over http.client, telling "never sent" from "sent, no answer".

This transport stays hand-written on purpose (the ComfyUI client in cli/ uses requests): paying twice
for an image must never happen, so a failure must say whether the request left this machine
(:class:`NotSent`: safe to send again) or may have reached the provider (:class:`NoAnswer`: it may
run and be charged, so it is reported, never re-sent), and Cancel or the deadline must cut a request
in flight at the socket, which requests' timeouts (per read, not per answer) cannot do.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .errors import ApiError

USER_AGENT = "flux2kit"
MAX_ERROR_BODY = 600  # characters of a provider's error body quoted in a message


class NotSent(Exception):
    """The request never reached the server (refused, unreachable): safe to send again."""


class NoAnswer(Exception):
    """The request was (possibly) sent but no complete answer came back: the server may have acted on it."""


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def text(self, limit: int = MAX_ERROR_BODY) -> str:
        text = self.body.decode("utf-8", "replace").strip()
        return text if len(text) <= limit else text[:limit] + "..."


def host_of(url: str) -> str:
    return (urllib.parse.urlsplit(url).hostname or "").lower()


def is_loopback(host: str) -> bool:
    """True only for "localhost" and loopback IP literals: a DNS name such as 127.example.com is not loopback."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Transport:
    """One HTTP request at a time over http.client, telling "never sent" apart from "sent, no answer"."""

    def __init__(self, policy):
        """``policy``: a jobs.RetryPolicy (connect/read timeouts, how often Cancel is checked)."""
        self.policy = policy

    def request(self, method: str, url: str, headers: dict | None = None, body: bytes | None = None,
                timeout: float | None = None, abort=None) -> Response:
        """``abort()`` (polled every ``cancel_check`` s from a watcher thread) cuts a request in flight: Cancel
        and the deadline must not wait for a slow answer or a result that trickles in (socket timeouts apply to
        each read, not to the whole answer)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(f"Not an http(s) URL: {parts.scheme}://{parts.hostname or ''}{parts.path}. Check the base URL.",
                           kind="config")
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kw = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        proxy = _proxy_for(parts)
        if proxy is None:
            conn = cls(parts.hostname, parts.port, timeout=self.policy.connect_timeout, **kw)
        else:  # HTTPS_PROXY / HTTP_PROXY from the environment, as urllib would use them
            proxy_headers = {}
            if proxy.username:
                cred = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
                proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
            conn = cls(proxy.hostname, proxy.port or 8080, timeout=self.policy.connect_timeout, **kw)
            if parts.scheme == "https":
                conn.set_tunnel(parts.hostname, parts.port or 443, headers=proxy_headers)
            else:
                path, headers = url, {**(headers or {}), **proxy_headers}
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        if body is not None:
            all_headers.setdefault("Content-Type", "application/json")
        done, aborted = threading.Event(), threading.Event()
        if abort is not None:
            def watch():
                while not done.wait(self.policy.cancel_check):
                    if abort():
                        aborted.set()
                        sock = conn.sock
                        if sock is not None:
                            try:
                                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes the blocked read
                            except OSError:
                                pass
                        return

            threading.Thread(target=watch, name="flux2kit-api-watch", daemon=True).start()
        try:
            try:
                conn.connect()
            except (ConnectionRefusedError, socket.gaierror, socket.timeout, OSError) as e:
                raise NotSent(f"{type(e).__name__}: {e}") from None
            if aborted.is_set():  # Cancel or the deadline came while connecting: do not send at all
                raise NotSent("stopped before sending (Cancel or deadline)")
            conn.sock.settimeout(timeout or self.policy.read_timeout)
            try:
                conn.request(method, path, body=body, headers=all_headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError) as e:
                raise NoAnswer("stopped waiting (Cancel or deadline)" if aborted.is_set() else f"{type(e).__name__}: {e}") from None
            if aborted.is_set():  # a body without a length can end "cleanly" when cut: never return it
                raise NoAnswer("stopped waiting (Cancel or deadline)")
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            done.set()
            conn.close()


def _proxy_for(parts):
    """The proxy urllib would use for this URL (environment variables), never for loopback."""
    if is_loopback((parts.hostname or "").lower()):
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
