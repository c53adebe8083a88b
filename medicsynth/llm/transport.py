"""A total deadline per HTTP attempt, under the SDKs' per-read timeouts.

The SDKs' ``timeout`` bounds each socket operation, not the request: a server that trickles its
body (one small piece every second) keeps an attempt alive for as long as it likes. The SDK
clients built by :mod:`medicsynth.llm.providers` therefore use :class:`DeadlineTransport`, an
``httpx2.HTTPTransport`` whose connection pool has a :class:`DeadlineBackend`: every connect,
read and write is given at most the time left until the deadline of the current attempt, and
fails with a timeout (``httpcore2.ReadTimeout`` → the SDK's ``APITimeoutError``, retried like any
timeout) once it has passed. The deadline is per thread (each worker runs its own attempt) and
set with :func:`attempt_deadline` around one SDK call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpcore2
import httpx2

_local = threading.local()


@contextmanager
def attempt_deadline(seconds: float) -> Iterator[None]:
    """Within the block, socket operations of this thread end at most ``seconds`` from now."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + float(seconds)
    try:
        yield
    finally:
        _local.deadline = previous


def _clamp(timeout: float | None, exc: type[Exception]) -> float | None:
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise exc("attempt deadline exceeded")
    return remaining if timeout is None else min(timeout, remaining)


class DeadlineStream(httpcore2.NetworkStream):
    """A network stream whose operations end by the thread's attempt deadline."""

    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore2.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None):
        inner = self._inner.start_tls(ssl_context, server_hostname, _clamp(timeout, httpcore2.ConnectTimeout))
        return DeadlineStream(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore2.NetworkBackend):
    """The default synchronous backend, with :class:`DeadlineStream` connections."""

    def __init__(self, inner: httpcore2.NetworkBackend | None = None) -> None:
        self._inner = inner or httpcore2.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ANN001
        stream = self._inner.connect_tcp(
            host, port, _clamp(timeout, httpcore2.ConnectTimeout), local_address, socket_options
        )
        return DeadlineStream(stream)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # noqa: ANN001
        return DeadlineStream(
            self._inner.connect_unix_socket(path, _clamp(timeout, httpcore2.ConnectTimeout), socket_options)
        )

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx2.HTTPTransport):
    """``httpx2.HTTPTransport`` (direct connections) whose pool uses :class:`DeadlineBackend`.

    Args:
        limits: connection limits (the SDKs' defaults are passed by the caller).
    """

    def __init__(self, limits: httpx2.Limits) -> None:
        super().__init__(limits=limits)
        # The same pool HTTPTransport builds for a direct connection, with our network backend
        # (httpcore2.ConnectionPool takes one; HTTPTransport does not pass it through).
        self._pool.close()
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=DeadlineBackend(),
        )


def proxy_configured() -> bool:
    """Whether the environment names an HTTP(S) proxy (which a custom transport would bypass)."""
    import urllib.request

    return any(k in ("http", "https", "all") for k in urllib.request.getproxies())
