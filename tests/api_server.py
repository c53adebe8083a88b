"""A scripted fake of the OpenAI and Anthropic HTTP APIs for tests and benchmarks.

:class:`FakeLLMServer` is a real HTTP server on ``127.0.0.1`` (random free port) that speaks

- OpenAI ``POST /v1/chat/completions`` (point ``openai.OpenAI(base_url=server.openai_base_url)``
  at it), and
- Anthropic ``POST /v1/messages`` (``anthropic.Anthropic(base_url=server.anthropic_base_url)``),

well enough for the official SDKs: same JSON shapes, status codes and headers. Nothing is
mocked inside the client, so retries, timeouts and headers go through the SDKs' real code.

Scripting responses
-------------------
Each incoming request gets one :class:`Reply`, chosen in this order:

1. ``server.script(reply, reply, ...)`` appends to a FIFO queue shared by both paths; the next
   request (whatever its content) pops the next reply. Use it with one request at a time.
2. Otherwise ``responder(request)``, a function of the :class:`RecordedRequest` that returns a
   ``Reply`` (script by content: e.g. refuse when ``request.image_sha256s`` holds a given image);
   ``responder`` may also be a fixed ``Reply``.
3. Otherwise :func:`auto` (the default): a valid answer built from the request's own JSON schema.

Reply builders (each renders in the right shape for whichever API was called):

- ``answer(obj)``: a structured answer; OpenAI: message content ``json.dumps(obj)``;
  Anthropic: a ``tool_use`` block with ``input=obj`` when the request offered a tool, else text.
- ``text(s)``: plain assistant text (no structure).
- ``auto()``: ``answer`` of an object that satisfies the request's schema (first enum value).
- ``refusal(msg)``: the provider's refusal signal; OpenAI ``message.refusal`` (content null);
  Anthropic ``stop_reason="refusal"``.
- ``text_refusal(msg)``: a refusal written as ordinary text ("I can't help with that.") with no
  provider flag, as models often do.
- ``malformed(s)``: assistant content that is not valid JSON (Anthropic: text, no tool call).
- ``error(status, retry_after=..., retry_after_ms=...)``: an API error body with that status and
  optional ``Retry-After`` (seconds) / ``retry-after-ms`` headers.
- ``slow(delay_s, then)``: wait ``delay_s`` before sending ``then`` (past the client timeout this
  is a timeout; the late write to a closed socket is ignored).
- ``hang(event, then)``: block until ``event`` is set (or 60 s), then send ``then``.
- ``broken_body()``: status 200 with a body that is not JSON.
- ``raw_body(body, status=200, content_type=...)``: exactly that body whatever the API (a proxy's
  HTML page, a JSON list, an Anthropic ``{"type": "error"}`` object sent with status 200...).
- ``truncated(obj)``: an answer cut at the output-token cap; OpenAI: the first half of
  ``json.dumps(obj)`` with ``finish_reason="length"``; Anthropic: a ``tool_use`` block whose input
  is ``obj`` (pass a partial object) with ``stop_reason="max_tokens"``.
- ``trickle(pieces, interval_s, then)``: send ``then`` with its full ``Content-Length`` but the
  body in ``pieces`` parts, ``interval_s`` apart (each socket read is quick; the whole is slow).
- any builder takes ``delay_s=`` to answer late.

Inspection
----------
``server.requests`` (list of :class:`RecordedRequest`: path, provider, headers, parsed body, raw
body hash, prompt text, system text, image hashes), ``server.count(path=None)``,
``server.path_counts()``, ``server.hash_counts()`` (requests received per body hash) and
``server.completed_hash_counts()`` (responses fully written per body hash: a request whose client
died before the answer was delivered is received but not completed).

Pytest
------
Use the ``llm_server`` fixture (tests/conftest.py makes it available to every test module), or
``with FakeLLMServer(responder) as server:`` directly.
Run pytest as ``python -m pytest`` from the repository root so ``tests.api_server`` imports.
"""

from __future__ import annotations

import base64
import hashlib
import json
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"


# ------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request as the server saw it."""

    index: int
    path: str
    provider: str  # "openai" | "anthropic" | "unknown"
    headers: dict[str, str]
    body: Any  # parsed JSON, or None if the body was not JSON
    raw: bytes
    content_hash: str  # sha256 of the raw body: identical requests share it
    time: float

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None

    @property
    def system(self) -> str:
        """System prompt text (OpenAI system/developer messages or Anthropic ``system``)."""
        if not isinstance(self.body, dict):
            return ""
        if self.provider == "anthropic":
            return _join_text(self.body.get("system", ""))
        return "\n".join(
            _join_text(m.get("content", ""))
            for m in self.body.get("messages", [])
            if m.get("role") in ("system", "developer")
        )

    @property
    def prompt(self) -> str:
        """All user text of the request, joined by newlines."""
        if not isinstance(self.body, dict):
            return ""
        return "\n".join(
            _join_text(m.get("content", ""))
            for m in self.body.get("messages", [])
            if m.get("role") == "user"
        )

    @property
    def images(self) -> list[tuple[str, bytes]]:
        """``(media_type, decoded bytes)`` of every base64 image in the request."""
        out: list[tuple[str, bytes]] = []
        if not isinstance(self.body, dict):
            return out
        for m in self.body.get("messages", []):
            content = m.get("content")
            if not isinstance(content, list):
                continue
            for part in content:
                if part.get("type") == "image_url":  # OpenAI data URL
                    url = part["image_url"]["url"]
                    head, _, data = url.partition(",")
                    out.append((head[len("data:") :].split(";")[0], base64.b64decode(data)))
                elif part.get("type") == "image":  # Anthropic base64 source
                    src = part["source"]
                    out.append((src["media_type"], base64.b64decode(src["data"])))
        return out

    @property
    def image_sha256s(self) -> list[str]:
        return [hashlib.sha256(data).hexdigest() for _, data in self.images]

    @property
    def _schema_spec(self) -> dict | None:
        """What carries the asked JSON schema: OpenAI ``response_format.json_schema`` (``name``,
        ``schema``) or the Anthropic tool (``name``, ``input_schema``); ``None`` without one."""
        if not isinstance(self.body, dict):
            return None
        if self.provider == "openai":
            fmt = self.body.get("response_format") or {}
            return fmt["json_schema"] if fmt.get("type") == "json_schema" else None
        return self.tool

    @property
    def schema(self) -> dict | None:
        """The JSON schema the client asked for (OpenAI response_format or Anthropic tool)."""
        spec = self._schema_spec
        return spec.get("schema" if self.provider == "openai" else "input_schema") if spec else None

    @property
    def schema_name(self) -> str | None:
        """The name of that schema (``medic_labels``, ``medic_<strategy>``, ...)."""
        spec = self._schema_spec
        return spec.get("name") if spec else None

    @property
    def tool(self) -> dict | None:
        """Anthropic: the tool the request forces (tool_choice) or its first tool."""
        if not isinstance(self.body, dict) or not self.body.get("tools"):
            return None
        choice = self.body.get("tool_choice") or {}
        for t in self.body["tools"]:
            if choice.get("name") in (None, t.get("name")):
                return t
        return self.body["tools"][0]


def _join_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


# ------------------------------------------------------------------------------------------
# Replies
# ------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """What to answer; build with the module functions (:func:`answer`, :func:`error`...)."""

    kind: str
    payload: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    then: Reply | None = None
    event: threading.Event | None = None


def answer(obj: Any, *, delay_s: float = 0.0) -> Reply:
    return Reply("answer", obj, delay_s=delay_s)


def text(s: str, *, delay_s: float = 0.0) -> Reply:
    return Reply("text", s, delay_s=delay_s)


def auto(*, delay_s: float = 0.0) -> Reply:
    return Reply("auto", delay_s=delay_s)


def refusal(msg: str = "I'm sorry, but I can't help with that.", *, delay_s: float = 0.0) -> Reply:
    return Reply("refusal", msg, delay_s=delay_s)


def text_refusal(msg: str = "I can't help with that request.", *, delay_s: float = 0.0) -> Reply:
    return Reply("text", msg, delay_s=delay_s)


def malformed(s: str = '{"damage_severity": "mild", "informative": ', *, delay_s: float = 0.0) -> Reply:
    return Reply("malformed", s, delay_s=delay_s)


def error(
    status: int,
    *,
    retry_after: float | str | None = None,
    retry_after_ms: float | None = None,
    message: str | None = None,
    delay_s: float = 0.0,
) -> Reply:
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    return Reply("error", message or f"scripted error {status}", status=status, headers=headers, delay_s=delay_s)


def slow(delay_s: float, then: Reply | None = None) -> Reply:
    return Reply("slow", delay_s=delay_s, then=then or auto())


def hang(event: threading.Event, then: Reply | None = None) -> Reply:
    return Reply("hang", event=event, then=then or auto())


def broken_body(*, delay_s: float = 0.0) -> Reply:
    return Reply("broken_body", delay_s=delay_s)


def raw_body(
    body: bytes | str | Any, *, status: int = 200, content_type: str | None = None, delay_s: float = 0.0
) -> Reply:
    """Send ``body`` as it is (bytes/str) or as JSON (anything else), whatever the API called."""
    if isinstance(body, str):
        body = body.encode()
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode()
        content_type = content_type or "application/json"
    headers = {"Content-Type": content_type or "text/html; charset=utf-8"}
    return Reply("raw", body, status=status, headers=headers, delay_s=delay_s)


def truncated(obj: Any, *, delay_s: float = 0.0) -> Reply:
    return Reply("truncated", obj, delay_s=delay_s)


def trickle(pieces: int, interval_s: float, then: Reply | None = None) -> Reply:
    return Reply("trickle", pieces, delay_s=interval_s, then=then or auto())


def schema_instance(schema: dict | None) -> Any:
    """A JSON value that satisfies a simple JSON schema (first enum value, empty arrays...)."""
    if not schema:
        return {}
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {k: schema_instance(v) for k, v in schema.get("properties", {}).items()}
    return {"string": "text", "integer": 0, "number": 0.0, "boolean": False, "array": [], "null": None}.get(
        kind, None
    )


def _tokens(n_chars: int) -> int:
    # A deterministic stand-in for a tokenizer: ~4 characters per token.
    return max(1, n_chars // 4)


def _render(reply: Reply, req: RecordedRequest) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of ``reply`` in the API shape of ``req``."""
    if reply.kind == "broken_body":
        return 200, {"Content-Type": "application/json"}, b'{"id": "chatcmpl-broken", "choi'
    if reply.kind == "raw":
        return reply.status, dict(reply.headers), reply.payload
    if reply.kind == "error":
        if req.provider == "anthropic":
            kind = {400: "invalid_request_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(reply.status, "api_error")
            body = {"type": "error", "error": {"type": kind, "message": reply.payload}}
        else:
            body = {"error": {"message": reply.payload, "type": "server_error", "code": None}}
        return reply.status, {"Content-Type": "application/json", **reply.headers}, json.dumps(body).encode()

    kind, payload = reply.kind, reply.payload
    if kind == "auto":
        kind, payload = "answer", schema_instance(req.schema)
    in_tokens = _tokens(len(req.raw))
    model = req.model or "unknown"
    if req.provider == "anthropic":
        content: list[dict] = []
        stop = "end_turn"
        if kind in ("answer", "truncated") and req.tool:
            content = [{"type": "tool_use", "id": f"toolu_{req.index}", "name": req.tool["name"], "input": payload}]
            stop = "tool_use" if kind == "answer" else "max_tokens"
        elif kind == "truncated":
            full = json.dumps(payload)
            content = [{"type": "text", "text": full[: len(full) // 2]}]
            stop = "max_tokens"
        elif kind == "answer":
            content = [{"type": "text", "text": json.dumps(payload)}]
        elif kind in ("text", "malformed"):
            content = [{"type": "text", "text": payload}]
        elif kind == "refusal":
            stop = "refusal"
            content = []
        out_tokens = _tokens(len(json.dumps(content)))
        body = {
            "id": f"msg_{req.index}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens},
        }
    else:
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        finish = "stop"
        if kind == "answer":
            message["content"] = json.dumps(payload)
        elif kind == "truncated":
            full = json.dumps(payload)
            message["content"] = full[: len(full) // 2]
            finish = "length"
        elif kind in ("text", "malformed"):
            message["content"] = payload
        elif kind == "refusal":
            message["refusal"] = payload
        out_tokens = _tokens(len(message["content"] or message["refusal"] or ""))
        body = {
            "id": f"chatcmpl-{req.index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {
                "prompt_tokens": in_tokens,
                "completion_tokens": out_tokens,
                "total_tokens": in_tokens + out_tokens,
            },
        }
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


#: Body fields Anthropic's API version 2026-10-21 answers 400 to (older versions take them).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


def anthropic_version_rejects(version: str | None, params: Any) -> str | None:
    """The 400 message Anthropic's API gives to ``params`` under ``version``, or ``None``.

    As the real API does: version 2026-10-21 (the anthropic 2.x SDK's) refuses any sampling
    parameter, even at its default value; 2023-06-01 takes them.
    """
    if version == "2023-06-01" or not isinstance(params, dict):
        return None
    bad = [f for f in SAMPLING_FIELDS if f in params]
    return f"{bad[0]}: Extra inputs are not permitted" if bad else None


def _version_rejects(req: RecordedRequest) -> Reply | None:
    if req.provider != "anthropic":
        return None
    version = next((v for k, v in req.headers.items() if k.lower() == "anthropic-version"), None)
    message = anthropic_version_rejects(version, req.body)
    return None if message is None else error(400, message=message)


# ------------------------------------------------------------------------------------------
# Server
# ------------------------------------------------------------------------------------------


Responder = Callable[[RecordedRequest], Reply]


class LoopbackServer:
    """Start-up and shut-down of a threaded HTTP server on ``127.0.0.1`` (a free port), shared
    by the fake API servers of the tests (this module, :mod:`tests.images_api_server`).

    A subclass returns its request handler class from :meth:`handler_class`; each handler
    instance reaches the fake (this object) as ``self.fake``. Usable as a context manager
    (``with FakeX() as server:`` starts it and stops it on exit).
    """

    #: Listen backlog; the default of 5 refuses connections when 16+ clients connect at once.
    request_queue_size = 256
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> Any:
        fake, backlog = self, self.request_queue_size

        class Handler(self.handler_class()):  # type: ignore[misc,valid-type]
            pass

        Handler.fake = fake

        class HTTPServer(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = backlog

        self._httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class FakeLLMServer(LoopbackServer):
    """Scripted OpenAI/Anthropic API on 127.0.0.1; see the module docstring for scripting."""

    def __init__(self, responder: Responder | Reply | None = None) -> None:
        self.responder = responder
        self._lock = threading.Lock()
        self._queue: list[Reply] = []
        self._requests: list[RecordedRequest] = []
        self._completed: Counter[str] = Counter()

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def base_url(self, provider: str) -> str:
        """The ``base_url`` to give the SDK of ``provider`` ("openai" or "anthropic")."""
        return {"openai": self.openai_base_url, "anthropic": self.anthropic_base_url}[provider]

    # -- scripting ------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order (before ``responder`` is consulted)."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget recorded requests, counts and queued replies."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self._completed.clear()

    # -- inspection -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._requests if path is None or r.path == path)

    def path_counts(self) -> Counter[str]:
        with self._lock:
            return Counter(r.path for r in self._requests)

    def hash_counts(self) -> Counter[str]:
        """Requests received per raw-body sha256."""
        with self._lock:
            return Counter(r.content_hash for r in self._requests)

    def completed_hash_counts(self) -> Counter[str]:
        """Responses fully written per raw-body sha256."""
        with self._lock:
            return Counter(self._completed)

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- internals ------------------------------------------------------------------------

    def _record(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[RecordedRequest, Reply]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        provider = {OPENAI_PATH: "openai", ANTHROPIC_PATH: "anthropic"}.get(path, "unknown")
        with self._lock:
            req = RecordedRequest(
                index=len(self._requests),
                path=path,
                provider=provider,
                headers=headers,
                body=body,
                raw=raw,
                content_hash=hashlib.sha256(raw).hexdigest(),
                time=time.monotonic(),
            )
            self._requests.append(req)
            rejected = _version_rejects(req)
            if rejected is not None:
                return req, rejected
            queued = self._queue.pop(0) if self._queue else None
        if queued is not None:
            return req, queued
        if isinstance(self.responder, Reply):
            return req, self.responder
        if callable(self.responder):
            return req, self.responder(req)
        return req, auto()

    def _mark_completed(self, req: RecordedRequest) -> None:
        with self._lock:
            self._completed[req.content_hash] += 1


class LoopbackHandler(BaseHTTPRequestHandler):
    """What the fake servers' request handlers share: HTTP/1.1 keep-alive, no Nagle delay, no
    log lines, and :meth:`_peer_closed` (a client that gave up gets nothing delivered)."""

    # HTTP/1.1 keeps connections alive, as the real APIs do; every response sets Content-Length.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for a delayed ACK (~40 ms).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output clean

    def _peer_closed(self) -> bool:
        # A client waiting for its answer sends nothing more, so a readable socket means EOF:
        # it timed out or died. Writing would still "succeed" into the kernel buffer.
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class _Handler(LoopbackHandler):
    fake: FakeLLMServer

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path not in (OPENAI_PATH, ANTHROPIC_PATH):
            self._send(404, {"Content-Type": "application/json"}, b'{"error": {"message": "not found"}}')
            return
        req, reply = self.fake._record(self.path, headers, raw)
        pieces, interval = 1, 0.0
        while reply.kind in ("slow", "hang", "trickle"):
            if reply.kind == "slow":
                time.sleep(reply.delay_s)
            elif reply.kind == "trickle":
                pieces, interval = max(1, int(reply.payload)), reply.delay_s
            else:
                assert reply.event is not None
                reply.event.wait(60)
            reply = reply.then or auto()
        if reply.delay_s:
            time.sleep(reply.delay_s)
        status, out_headers, body = _render(reply, req)
        if self._send(status, out_headers, body, pieces=pieces, interval_s=interval):
            self.fake._mark_completed(req)

    def _send(
        self, status: int, headers: dict[str, str], body: bytes, *, pieces: int = 1, interval_s: float = 0.0
    ) -> bool:
        if self._peer_closed():
            self.close_connection = True
            return False
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            step = -(-len(body) // pieces)
            for i, start in enumerate(range(0, len(body), step)):
                if i:
                    time.sleep(interval_s)
                    if self._peer_closed():
                        self.close_connection = True
                        return False
                self.wfile.write(body[start : start + step])
                self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            # The client gave up (timeout, or it was killed): nothing was delivered.
            self.close_connection = True
            return False


@pytest.fixture
def llm_server():
    """A started :class:`FakeLLMServer` (auto answers); script it with ``.script`` / ``.responder``."""
    with FakeLLMServer() as server:
        yield server
