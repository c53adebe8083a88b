"""Loopback fake of the OpenAI Batch API and the Anthropic Message Batches API, on top of
:class:`tests.api_server.FakeLLMServer` (which keeps serving the sync endpoints).

Endpoints (shapes as the official SDKs expect them):

- OpenAI: ``POST /v1/files`` (multipart upload, purpose ``batch``), ``POST /v1/batches``,
  ``GET /v1/batches/{id}``, ``GET /v1/files/{id}/content`` (output and error JSONL files).
- Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
  ``GET /v1/messages/batches/{id}/results`` (JSONL).

Each request line of a batch is answered with the sync server's machinery: a
:class:`~tests.api_server.RecordedRequest` is built from its body and rendered with the server's
``responder`` (default :func:`~tests.api_server.auto`); an error reply (``error(400)``) becomes an
errored entry. A batch is processed once, when it ends:

- ``server.hold`` (an Event): while set, batches stay ``in_progress`` (for kill tests);
- otherwise a batch ends at its ``polls_to_end``-th status call (default 1);
- ``server.expire_after = n``: the next batch to end answers its first ``n`` requests, then
  expires (the rest: ``batch_expired`` / ``expired``); reset to ``None`` after use.

Counters: ``server.batch_creates`` (batches created), ``server.answered`` (custom id → times
answered), ``server.batch_lines`` (request lines received per custom id), and the sync
``server.count(path)``.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import json
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from http.server import ThreadingHTTPServer
from typing import Any

from tests.api_server import (
    ANTHROPIC_PATH, OPENAI_PATH, FakeLLMServer, RecordedRequest, _Handler, _render, _version_rejects, auto,
)


_ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                          404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                          500: "api_error", 529: "overloaded_error"}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


class BatchLLMServer(FakeLLMServer):
    """:class:`FakeLLMServer` plus the files and batches endpoints of both providers."""

    def __init__(self, responder: Any = None) -> None:
        super().__init__(responder)
        self.hold = threading.Event()
        self.polls_to_end = 1
        self.expire_after: int | None = None
        self.batch_creates = 0
        self.answered: Counter[str] = Counter()
        self.batch_lines: Counter[str] = Counter()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._blk = threading.Lock()

    def start(self) -> BatchLLMServer:
        server = self

        class Handler(_BatchHandler):
            fake = server

        class HTTPServer(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self._httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    # -- batch processing -------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    def create_batch(self, provider: str, lines: list[tuple[str, dict]],
                     headers: dict[str, str] | None = None) -> dict[str, Any]:
        with self._blk:
            self.batch_creates += 1
            bid = self._new_id("batch" if provider == "openai" else "msgbatch")
            for cid, _ in lines:
                self.batch_lines[cid] += 1
            batch = {"id": bid, "provider": provider, "lines": lines, "polls": 0, "status": "in_progress",
                     "created": time.time(), "results": None, "headers": dict(headers or {})}
            self.batches[bid] = batch
            return batch

    def poll(self, bid: str) -> dict[str, Any] | None:
        with self._blk:
            batch = self.batches.get(bid)
            if batch is None:
                return None
            if batch["status"] == "in_progress" and not self.hold.is_set():
                batch["polls"] += 1
                if batch["polls"] >= self.polls_to_end:
                    self._finish(batch)
            return batch

    def _finish(self, batch: dict[str, Any]) -> None:
        limit = self.expire_after
        self.expire_after = None
        results = []
        for i, (cid, body) in enumerate(batch["lines"]):
            if limit is not None and i >= limit:
                results.append((cid, None))
                continue
            path = OPENAI_PATH if batch["provider"] == "openai" else ANTHROPIC_PATH
            raw = json.dumps(body).encode()
            req = RecordedRequest(index=len(self.answered), path=path, provider=batch["provider"],
                                  headers=batch["headers"], body=body, raw=raw, content_hash=cid,
                                  time=time.monotonic())
            # The API version of the submission decides, per entry, what the params may hold.
            reply = (_version_rejects(req)
                     or (self.responder(req) if callable(self.responder) else (self.responder or auto())))
            status, _, out = _render(reply, req)
            self.answered[cid] += 1
            results.append((cid, (status, json.loads(out))))
        batch["results"] = results
        batch["status"] = "expired" if limit is not None else "ended"


class _BatchHandler(_Handler):
    fake: BatchLLMServer

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(status, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if self.path == "/v1/files":
            return self._upload()
        if self.path == "/v1/batches":
            return self._openai_create()
        if self.path == "/v1/messages/batches":
            return self._anthropic_create()
        return super().do_POST()

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        parts = self.path.split("?")[0].strip("/").split("/")
        fake = self.fake
        batch_id = parts[2] if parts[:2] == ["v1", "batches"] else parts[3] if parts[:3] == ["v1", "messages", "batches"] and len(parts) > 3 else None
        if batch_id is not None and batch_id not in fake.batches:
            return self._not_found(batch_id, "anthropic" if parts[1] == "messages" else "openai")
        if parts[:2] == ["v1", "batches"] and len(parts) == 3:
            return self._json(self._openai_batch(fake.poll(parts[2])))
        if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content":
            return self._send(200, {"Content-Type": "application/octet-stream"}, fake.files[parts[2]])
        if parts[:3] == ["v1", "messages", "batches"] and len(parts) == 4:
            return self._json(self._anthropic_batch(fake.poll(parts[3])))
        if parts[:3] == ["v1", "messages", "batches"] and len(parts) == 5 and parts[4] == "results":
            return self._send(200, {"Content-Type": "application/binary"}, self._anthropic_results(fake.batches[parts[3]]))
        self._send(404, {"Content-Type": "application/json"}, b'{"error": {"message": "not found"}}')

    def _not_found(self, batch_id: str, provider: str) -> None:
        message = f"No batch found with id '{batch_id}'."
        body = ({"type": "error", "error": {"type": "not_found_error", "message": message}} if provider == "anthropic"
                else {"error": {"message": message, "type": "invalid_request_error", "code": None}})
        self._json(body, 404)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- OpenAI -----------------------------------------------------------------------------

    def _upload(self) -> None:
        raw = self._body()
        msg = email.message_from_bytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw, policy=email.policy.HTTP
        )
        data, purpose = b"", ""
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                data = part.get_payload(decode=True)
            elif name == "purpose":
                purpose = part.get_payload(decode=True).decode()
        fid = self.fake._new_id("file")
        self.fake.files[fid] = data
        self._json({"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                    "filename": "batch.jsonl", "purpose": purpose, "status": "processed"})

    def _openai_create(self) -> None:
        req = json.loads(self._body())
        lines = []
        for line in self.fake.files[req["input_file_id"]].decode().splitlines():
            if line.strip():
                entry = json.loads(line)
                assert entry["url"] == req["endpoint"] == "/v1/chat/completions"
                lines.append((entry["custom_id"], entry["body"]))
        batch = self.fake.create_batch("openai", lines)
        batch["input_file_id"] = req["input_file_id"]
        self._json(self._openai_batch(batch))

    def _openai_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        fake = self.fake
        status = {"in_progress": "in_progress", "ended": "completed", "expired": "expired"}[batch["status"]]
        out: dict[str, Any] = {
            "id": batch["id"], "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
            "input_file_id": batch["input_file_id"], "completion_window": "24h", "status": status,
            "created_at": int(batch["created"]), "output_file_id": None, "error_file_id": None,
            "request_counts": {"total": len(batch["lines"]), "completed": 0, "failed": 0},
        }
        if batch["results"] is not None:
            if "files" not in batch:
                ok, bad = [], []
                for cid, res in batch["results"]:
                    line = {"id": f"batch_req_{cid[:8]}", "custom_id": cid}
                    if res is None:
                        line.update(response=None, error={"code": "batch_expired",
                                                          "message": "This request could not be executed before the completion window expired."})
                        bad.append(line)
                    else:
                        status_code, body = res
                        line.update(response={"status_code": status_code, "request_id": "req", "body": body}, error=None)
                        (ok if status_code == 200 else bad).append(line)
                files = {}
                for name, lines in (("output_file_id", ok), ("error_file_id", bad)):
                    if lines:
                        fid = fake._new_id("file")
                        fake.files[fid] = "".join(json.dumps(x) + "\n" for x in lines).encode()
                        files[name] = fid
                batch["files"] = files
                batch["counts"] = (len(ok), len(bad))
            out.update(batch["files"])
            out["request_counts"] = {"total": len(batch["lines"]), "completed": batch["counts"][0],
                                     "failed": batch["counts"][1]}
        return out

    # -- Anthropic --------------------------------------------------------------------------

    def _anthropic_create(self) -> None:
        req = json.loads(self._body())
        version = {k.lower(): v for k, v in self.headers.items()}.get("anthropic-version")
        batch = self.fake.create_batch("anthropic", [(r["custom_id"], r["params"]) for r in req["requests"]],
                                       headers={"anthropic-version": version} if version else None)
        self._json(self._anthropic_batch(batch))

    def _anthropic_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        ended = batch["results"] is not None
        if not ended:
            counts["processing"] = len(batch["lines"])
        else:
            for _, res in batch["results"]:
                counts["expired" if res is None else "succeeded" if res[0] == 200 else "errored"] += 1
        return {
            "id": batch["id"], "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": counts, "created_at": _iso(batch["created"]),
            "expires_at": _iso(batch["created"] + 86400), "ended_at": _iso(time.time()) if ended else None,
            "archived_at": None, "cancel_initiated_at": None,
            "results_url": f"{self.fake.url}/v1/messages/batches/{batch['id']}/results" if ended else None,
        }

    def _anthropic_results(self, batch: dict[str, Any]) -> bytes:
        lines = []
        for cid, res in batch["results"]:
            if res is None:
                result: dict[str, Any] = {"type": "expired"}
            elif res[0] == 200:
                result = {"type": "succeeded", "message": res[1]}
            else:
                err = dict(res[1])
                kind = _ANTHROPIC_ERROR_TYPES.get(res[0], "api_error")
                err["error"] = {**err.get("error", {}), "type": kind}
                result = {"type": "errored", "error": err}
            lines.append(json.dumps({"custom_id": cid, "result": result}) + "\n")
        return "".join(lines).encode()
