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
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .errors import ApiError

USER_AGENT = "flux2kit"
MAX_ERROR_BODY = 600  # characters of a provider's error body quoted in a message


class NotSent(Exception):
    """The request never reached the server (refused, unreachable, or stopped while connecting): safe to send again.

    ``stopped``: why the client stopped ("Cancel", "the deadline") when it did; None for a network failure.
    """

    def __init__(self, message: str, stopped: str | None = None):
        super().__init__(message)
        self.stopped = stopped


class NoAnswer(Exception):
    """The request was (possibly) sent but no complete answer came back: the server may have acted on it.

    ``sent_at``: the wall-clock time (``time.time()``) the request was sent; ``stopped``: why the client stopped
    waiting ("Cancel", "the deadline"), or None when the connection failed on its own.
    """

    def __init__(self, message: str, sent_at: float | None = None, stopped: str | None = None):
        super().__init__(message)
        self.sent_at, self.stopped = sent_at, stopped


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
        """One request. ``abort()`` (polled every ``cancel_check`` s while the request is under way) returns why to
        stop ("Cancel", "the deadline") or None: it cuts the request in every phase (name lookup, connect, send,
        waiting for the answer, a result that trickles in), because socket timeouts apply to each step, not to the
        whole exchange. Stopped before the request went out: :class:`NotSent`; after: :class:`NoAnswer`."""
        exchange = _Exchange(self.policy, method, url, headers, body, timeout)
        if abort is None:
            return exchange.run()
        # The exchange blocks in http.client (and getaddrinfo, which nothing can interrupt), so it runs in a
        # helper thread while this one watches abort(); the helper never sends after an abort before sending.
        box: dict = {}
        done = threading.Event()

        def work():
            try:
                box["response"] = exchange.run()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=work, name="flux2kit-api-http", daemon=True).start()
        while not done.wait(self.policy.cancel_check):
            reason = abort()
            if reason:
                exchange.stop(reason)  # raises NotSent or NoAnswer, and frees the helper
        if "error" in box:
            raise box["error"]
        return box["response"]


class _Exchange:
    """One HTTP request/answer over http.client; ``stop`` ends it from another thread, knowing whether it was sent."""

    def __init__(self, policy, method, url, headers, body, timeout):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ApiError(f"Not an http(s) URL: {parts.scheme}://{parts.hostname or ''}{parts.path}. Check the base "
                           f"URL.", kind="config")
        self.policy, self.method, self.body, self.timeout = policy, method, body, timeout
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kw = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = dict(headers or {})
        proxy = _proxy_for(parts)
        if proxy is None:
            self.conn = cls(parts.hostname, parts.port, timeout=policy.connect_timeout, **kw)
        else:  # HTTPS_PROXY / HTTP_PROXY from the environment, as urllib would use them
            proxy_headers = {}
            if proxy.username:
                cred = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
                proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
            self.conn = cls(proxy.hostname, proxy.port or 8080, timeout=policy.connect_timeout, **kw)
            if parts.scheme == "https":
                self.conn.set_tunnel(parts.hostname, parts.port or 443, headers=proxy_headers)
            else:
                self.path, headers = url, {**headers, **proxy_headers}
        self.headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **headers}
        if body is not None:
            self.headers.setdefault("Content-Type", "application/json")
        self.lock = threading.Lock()
        self.sent_at: float | None = None  # set (under the lock) when the request starts going out
        self.stopped: str | None = None  # why stop() ended the exchange

    def stop(self, reason: str) -> None:
        """Called from the watching thread: end the exchange now and raise what the caller should see."""
        with self.lock:
            self.stopped = reason
            sent_at = self.sent_at
            sock = self.conn.sock
        if sent_at is None:  # still looking up or connecting: the helper sees ``stopped`` and never sends
            raise NotSent(f"stopped before sending: {reason}", stopped=reason)
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # wakes the helper's blocked read
            except OSError:
                pass
        raise NoAnswer(f"stopped waiting: {reason}", sent_at=sent_at, stopped=reason)

    def run(self) -> Response:
        conn = self.conn
        try:
            try:
                conn.connect()
            except (ConnectionRefusedError, socket.gaierror, socket.timeout, OSError) as e:
                raise NotSent(f"{type(e).__name__}: {e}") from None
            with self.lock:
                if self.stopped:  # Cancel or the deadline came while connecting: do not send at all
                    raise NotSent(f"stopped before sending: {self.stopped}", stopped=self.stopped)
                self.sent_at = time.time()
            conn.sock.settimeout(self.timeout or self.policy.read_timeout)
            try:
                conn.request(self.method, self.path, body=self.body, headers=self.headers)
                resp = conn.getresponse()
                data = resp.read()
            except (http.client.HTTPException, OSError) as e:
                if self.stopped:
                    raise NoAnswer(f"stopped waiting: {self.stopped}", self.sent_at, self.stopped) from None
                raise NoAnswer(f"{type(e).__name__}: {e}", self.sent_at) from None
            if self.stopped:  # a body without a length can end "cleanly" when cut: never return it
                raise NoAnswer(f"stopped waiting: {self.stopped}", self.sent_at, self.stopped)
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()


def _proxy_for(parts):
    """The proxy urllib would use for this URL (environment variables), never for loopback."""
    if is_loopback((parts.hostname or "").lower()):
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
