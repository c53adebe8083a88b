"""Headless Chromium for the tests, driven over the Chrome DevTools Protocol (CDP), no network.

:func:`open_page` starts Debian's ``chromium`` headless with a fresh profile, networking
disabled three ways (a host resolver that resolves nothing, a black-hole proxy, CDP network
emulation ``offline``), opens a local file and records **every** request the page makes
(``Network.requestWillBeSent``) plus every uncaught exception. It waits until the charts have
drawn (or a deadline passes: the deadline bounds a hang, no result depends on it), measures each
chart, and saves a full-page screenshot.

Used by ``tests/test_report_browser.py``; a test skips with the reason when no chromium is
installed (``.ci/run`` and ``make test`` install Debian's ``chromium`` with apt-get).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

#: Evaluated in the page: one entry per chart container, with what it drew.
MEASURE_JS = r"""
(() => {
  const out = [];
  const charts = document.querySelectorAll('.vl-chart, .vega-embed');
  const seen = new Set();
  charts.forEach((el) => {
    const box = el.classList.contains('vega-embed') ? el : (el.querySelector('.vega-embed') || el);
    if (seen.has(box)) return; seen.add(box);
    const svg = box.querySelector('svg');
    const canvas = box.querySelector('canvas');
    let marks = 0, painted = 0, w = 0, h = 0;
    if (svg) {
      marks = svg.querySelectorAll('path, rect, line, text, circle, symbol').length;
      const r = svg.getBoundingClientRect(); w = r.width; h = r.height;
    }
    if (canvas) {
      w = canvas.width; h = canvas.height;
      try {
        const ctx = canvas.getContext('2d');
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 3; i < data.length; i += 4 * 7) { if (data[i] > 0) painted++; }
      } catch (e) { painted = -1; }
    }
    const host = el.closest('.vl-chart') || el;
    out.push({id: host.id || box.id || '', svg: !!svg, canvas: !!canvas, marks, painted, width: w, height: h,
              error: host.getAttribute('data-error') || ''});
  });
  return JSON.stringify(out);
})()
"""

#: True once no chart is pending: report charts carry data-rendered/data-error; DVC's plot divs
#: (a <script> calling vegaEmbed) count as done when their container has an svg or canvas.
READY_JS = r"""
(() => {
  const report = Array.from(document.querySelectorAll('.vl-chart'));
  const pendingReport = report.filter(el => !el.hasAttribute('data-rendered') && !el.hasAttribute('data-error')).length;
  const dvc = Array.from(document.querySelectorAll('div[id] > script')).filter(s => s.textContent.includes('vegaEmbed'))
      .map(s => s.parentElement);
  const pendingDvc = dvc.filter(d => !d.querySelector('svg, canvas')).length;
  return document.readyState === 'complete' && pendingReport === 0 && pendingDvc === 0;
})()
"""


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    """What the page did: every request URL, exceptions, per-chart measurements, page text."""

    requests: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    charts: list[dict[str, Any]] = field(default_factory=list)
    ready: bool = False
    section_ids: list[str] = field(default_factory=list)
    text: str = ""

    def foreign_requests(self) -> list[str]:
        """Requests whose scheme is not ``file:`` or ``data:`` (must be empty offline)."""
        return [u for u in self.requests if not (u.startswith("file:") or u.startswith("data:"))]


class CDP:
    """A minimal synchronous CDP client over one browser websocket (flattened sessions)."""

    def __init__(self, ws_url: str, timeout: float = 60.0) -> None:
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def drain(self, method: str) -> list[dict[str, Any]]:
        """Remove and return buffered events of ``method``."""
        hits = [e for e in self.events if e.get("method") == method]
        self.events = [e for e in self.events if e.get("method") != method]
        return hits

    def close(self) -> None:
        self.ws.close()


def _wait_for_port(profile: Path, proc: subprocess.Popen, deadline: float) -> tuple[int, str]:
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        if port_file.exists():
            lines = port_file.read_text().split()
            if len(lines) >= 2:
                return int(lines[0]), lines[1]
        time.sleep(0.1)
    raise RuntimeError("chromium did not open its DevTools port in time")


def open_page(html_path: str | Path, screenshot: str | Path | None = None, *, width: int = 1280,
              deadline_s: float = 120.0, chromium: str | None = None) -> PageResult:
    """Open ``html_path`` in headless Chromium with the network disabled; see the module docstring.

    Args:
        html_path: a local HTML file.
        screenshot: where to save a full-page PNG (None: no screenshot).
        width: viewport width in CSS px.
        deadline_s: upper bound on waiting for the charts (a hang fails, never a slow machine
            result: ``ready`` says whether every chart finished).
        chromium: executable (default: :func:`find_chromium`).
    """
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium executable on PATH (apt-get install -y chromium)")
    url = Path(html_path).resolve().as_uri()
    profile = Path(tempfile.mkdtemp(prefix="msynth-chromium-"))
    args = [
        exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-features=Translate,OptimizationHints,MediaRouter", "--metrics-recording-only",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
        f"--window-size={width},900", "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result = PageResult()
    cdp = None
    try:
        deadline = time.monotonic() + deadline_s
        port, path = _wait_for_port(profile, proc, deadline)
        cdp = CDP(f"ws://127.0.0.1:{port}{path}")
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method, params in (("Network.enable", {}), ("Page.enable", {}), ("Runtime.enable", {}),
                               ("Network.emulateNetworkConditions",
                                {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0}),
                               ("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})):
            cdp.call(method, params, session)
        cdp.call("Page.navigate", {"url": url}, session)
        while time.monotonic() < deadline:
            ready = cdp.call("Runtime.evaluate", {"expression": READY_JS, "returnByValue": True}, session)
            if ready.get("result", {}).get("value") is True:
                result.ready = True
                break
            time.sleep(0.25)
        measured = cdp.call("Runtime.evaluate", {"expression": MEASURE_JS, "returnByValue": True}, session)
        result.charts = json.loads(measured["result"]["value"])
        ids = cdp.call("Runtime.evaluate", {"expression": "JSON.stringify(Array.from(document.querySelectorAll('section[id]')).map(s => s.id))",
                                            "returnByValue": True}, session)
        result.section_ids = json.loads(ids["result"]["value"])
        text = cdp.call("Runtime.evaluate", {"expression": "document.body ? document.body.innerText : ''", "returnByValue": True}, session)
        result.text = text["result"]["value"]
        if screenshot is not None:
            metrics = cdp.call("Page.getLayoutMetrics", {}, session)
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            height = int(min(size["height"], 16000))
            cdp.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
            shot = cdp.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        # Events arrive interleaved with replies; one last round trip flushes what is pending.
        cdp.call("Runtime.evaluate", {"expression": "1"}, session)
        result.requests = [e["params"]["request"]["url"] for e in cdp.drain("Network.requestWillBeSent")
                           if e.get("sessionId") == session]
        result.exceptions = [json.dumps(e["params"]["exceptionDetails"])[:500] for e in cdp.drain("Runtime.exceptionThrown")]
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return result


def assert_offline_and_drawn(result: PageResult, expected_charts: int | None = None) -> None:
    """Fail unless the page made only file:/data: requests, threw nothing and drew every chart."""
    assert result.foreign_requests() == [], "requests that left the file"
    assert result.exceptions == []
    assert result.ready, f"charts did not finish: {result.charts}"
    assert result.charts, "no chart on the page"
    if expected_charts is not None:
        assert len(result.charts) == expected_charts
    for chart in result.charts:
        assert not chart["error"], chart
        assert chart["width"] > 0 and chart["height"] > 0, chart
        if chart["svg"]:
            assert chart["marks"] > 0, chart
        else:
            assert chart["canvas"] and chart["painted"] > 0, chart


if __name__ == "__main__":  # manual use: python -m tests.browser page.html shot.png
    import sys

    r = open_page(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print(json.dumps({"ready": r.ready, "foreign": r.foreign_requests(), "requests": len(r.requests),
                      "exceptions": r.exceptions, "charts": r.charts, "sections": r.section_ids}, indent=1))
    os._exit(0)
