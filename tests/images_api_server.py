"""A loopback fake of the OpenAI Images API (``POST /v1/images/generations``) for tests.

:class:`FakeImagesServer` is a real HTTP server on ``127.0.0.1`` (random free port) that the
official ``openai`` SDK talks to unchanged (``openai.OpenAI(base_url=server.base_url)``):
same JSON request and response shapes (``{"created", "data": [{"b64_json"}], "usage"}``),
status codes and error bodies, so retries and timeouts run through the SDK's own code.

Each request gets a PNG of the requested ``size`` ("WxH", any size accepted) whose pixels are
a pure function of the prompt (a noise texture seeded by its sha256), so images are never
blank and a repeated request is recognisable.

Scripting: ``server.delay_s`` answers every request late; ``server.hold_from = n`` holds the
n-th and later requests unanswered until ``server.release.set()`` (a test kills the client
while they are held: deterministic, no timing); ``server.script(status, ...)`` makes the next requests fail with those HTTP statuses
(``400`` comes with OpenAI's ``content_policy_violation`` code, ``429``/``5xx`` are retried by
the SDK).

Inspection: ``server.received`` / ``server.completed`` (Counters per prompt: requests read, and
responses fully written to a client still connected), ``server.count()`` (requests received).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import numpy as np
from PIL import Image

from tests.api_server import LoopbackHandler, LoopbackServer

IMAGES_PATH = "/v1/images/generations"


def prompt_image(prompt: str, width: int, height: int) -> bytes:
    """PNG bytes of a ``width``×``height`` texture determined by ``prompt``."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, 3)
    noise = rng.integers(-40, 40, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class FakeImagesServer(LoopbackServer):
    """Scripted Images API on 127.0.0.1; see the module docstring."""

    request_queue_size = 64

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._script: list[int] = []
        self.received: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.bodies: list[dict] = []
        self.hold_from: int | None = None
        self.release = threading.Event()

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _Handler

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def script(self, *statuses: int) -> None:
        """The next ``len(statuses)`` requests fail with these HTTP statuses, in order."""
        with self._lock:
            self._script.extend(statuses)

    def count(self) -> int:
        with self._lock:
            return sum(self.received.values())

    def _take(self, body: dict) -> tuple[int | None, bool]:
        """Record a request; returns (scripted status or None, whether to hold it)."""
        with self._lock:
            self.received[body.get("prompt", "")] += 1
            self.bodies.append(body)
            hold = self.hold_from is not None and len(self.bodies) >= self.hold_from
            return (self._script.pop(0) if self._script else None), hold


class _Handler(LoopbackHandler):
    fake: FakeImagesServer

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != IMAGES_PATH:
            self._send(404, {"error": {"message": f"unknown path {self.path}", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        fake = self.fake
        status, hold = fake._take(body)
        if hold:
            fake.release.wait(60)
        if fake.delay_s:
            time.sleep(fake.delay_s)
        if status is not None:
            code = "content_policy_violation" if status == 400 else None
            self._send(status, {"error": {"message": f"scripted {status}", "type": "invalid_request_error", "code": code}})
            return
        width, height = (int(v) for v in str(body.get("size") or "64x64").split("x"))
        png = prompt_image(str(body.get("prompt", "")), width, height)
        answer = {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()}],
                  "usage": {"input_tokens": 10, "output_tokens": 100, "total_tokens": 110}}
        if self._send(200, answer):
            with fake._lock:
                fake.completed[body.get("prompt", "")] += 1

    def _send(self, status: int, obj: dict) -> bool:
        if self._peer_closed():  # the client died or gave up: nothing is delivered
            self.close_connection = True
            return False
        body = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False
