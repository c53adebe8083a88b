"""Offline Vega-Lite: one JavaScript bundle, the ``dvc plots`` page template and chart embedding.

Vega, Vega-Lite and Vega-Embed come from ``vl-convert-python``'s bundled JavaScript
(:func:`vl_convert.javascript_bundle`), so a page built here needs no network: no CDN script, no
font, no schema fetch. Two consumers:

- :func:`plots_template` is the HTML template ``dvc plots show`` / ``dvc plots diff`` fill in
  (``.dvc/config``: ``plots.html_template``). DVC inserts its CDN ``<script src=...>`` tags only
  where a template has a ``{scripts}`` placeholder; this template has none and carries the bundle
  inline instead, so the plain commands render offline.
- :func:`chart_div` and :func:`embed_script` put Vega-Lite specs into the report page
  (:mod:`medicsynth.report`); every chart div gets ``data-rendered="1"`` once Vega drew it (or
  ``data-error`` with the message), which the browser tests wait for.

Regenerate the committed template after upgrading ``vl-convert-python``:
``python -m medicsynth.vega template .dvc/plots_offline.html`` (a test fails while it is stale).
"""

from __future__ import annotations

import argparse
import html
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from medicsynth.io import write_text

#: Vega-Lite major.minor bundled: DVC's own plot templates declare the v5 schema, and the report's
#: specs use it too, so one bundle serves both without version warnings.
VEGA_LITE_VERSION = "5.21"
SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"  # an identifier only: never fetched

LICENCE_NOTE = (
    "Inline JavaScript: Vega, Vega-Lite and Vega-Embed (BSD-3-Clause, University of Washington "
    "Interactive Data Lab) with their dependencies (d3 modules: ISC; lodash.debounce, fast-json-"
    "stable-stringify, json-stringify-pretty-compact: MIT), bundled by vl-convert-python {vlc} "
    "(BSD-3-Clause, Jon Mease). Vega {vega}, Vega-Lite {vl}, Vega-Embed {embed}."
)


@lru_cache(maxsize=1)
def javascript_bundle() -> str:
    """The Vega + Vega-Lite + Vega-Embed bundle (≈0.9 MB of JavaScript) that defines the globals
    ``vega``, ``vegaLite`` and ``vegaEmbed``; safe to inline in a ``<script>`` element.

    Raises ``ImportError`` with the fix when ``vl-convert-python`` is not installed.
    """
    try:
        import vl_convert as vlc
    except ImportError as exc:  # pragma: no cover - the pinned requirement installs it
        raise ImportError(
            "vl-convert-python is not installed: pip install -r requirements.txt "
            "(it provides the offline Vega JavaScript)"
        ) from exc
    js = vlc.javascript_bundle(vl_version=VEGA_LITE_VERSION)
    # A literal "</script" inside the code would end the inline element early.
    return js.replace("</script", "<\\/script")


def versions() -> dict[str, str]:
    """Versions of the bundled libraries: ``{"vl-convert", "vega", "vega-lite", "vega-embed"}``."""
    import vl_convert as vlc

    return {
        "vl-convert": getattr(vlc, "__version__", "unknown"),
        "vega": vlc.get_vega_version(),
        "vega-lite": VEGA_LITE_VERSION,
        "vega-embed": vlc.get_vega_embed_version(),
    }


def licence_comment() -> str:
    """An HTML comment naming the inlined libraries, their licences and versions."""
    v = versions()
    note = LICENCE_NOTE.format(vlc=v["vl-convert"], vega=v["vega"], vl=v["vega-lite"], embed=v["vega-embed"])
    return f"<!-- {note} -->"


def script_tag() -> str:
    """``<script>`` element with the whole bundle inline."""
    return f"<script>\n{javascript_bundle()}\n</script>"


def plots_template() -> str:
    """HTML template for ``dvc plots show/diff --html-template`` that needs no network.

    It keeps DVC's ``{plot_divs}`` (required) and ``{refresh_tag}`` placeholders and leaves out
    ``{scripts}``, so DVC's CDN script tags are never inserted; the bundle is inline instead.
    """
    return f"""<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {{refresh_tag}}
    <title>DVC Plot (offline)</title>
    {licence_comment()}
    {script_tag()}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def write_plots_template(path: str | Path) -> Path:
    """Write :func:`plots_template` to ``path`` atomically and return the path."""
    write_text(plots_template(), path)
    return Path(path)


def chart_div(spec: dict[str, Any], chart_id: str, title: str = "") -> str:
    """A ``<figure>`` holding one Vega-Lite chart: a div for Vega and the spec as inline JSON.

    ``spec`` is a Vega-Lite spec with inline data (``data.values``), no URLs; ``$schema`` is set
    to the v5 identifier when missing. ``chart_id`` must be unique in the page. The chart draws
    when :func:`embed_script` runs.
    """
    spec = {"$schema": SCHEMA, **spec}
    # JSON inside a <script> element: only "</" could end it early.
    payload = json.dumps(spec, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    caption = f"<figcaption>{html.escape(title)}</figcaption>" if title else ""
    return (
        f'<figure class="chart">{caption}<div class="vl-chart" id="{html.escape(chart_id)}"></div>'
        f'<script type="application/json" data-spec-for="{html.escape(chart_id)}">{payload}</script></figure>'
    )


#: Renders every ``.vl-chart`` from its inline spec; marks the div rendered or failed.
EMBED_JS = """
(function () {
  var specs = document.querySelectorAll('script[data-spec-for]');
  specs.forEach(function (node) {
    var el = document.getElementById(node.getAttribute('data-spec-for'));
    var spec;
    try { spec = JSON.parse(node.textContent); } catch (e) { el.setAttribute('data-error', String(e)); return; }
    vegaEmbed(el, spec, {actions: false, renderer: 'svg'})
      .then(function () { el.setAttribute('data-rendered', '1'); })
      .catch(function (e) { el.setAttribute('data-error', String(e)); el.textContent = 'chart failed: ' + e; });
  });
})();
"""


def embed_script() -> str:
    """The bundle plus :data:`EMBED_JS`, to place once at the end of the page body."""
    return f"{script_tag()}\n<script>{EMBED_JS}</script>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Offline Vega helpers")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("template", help="write the offline `dvc plots` HTML template")
    t.add_argument("path", nargs="?", default=".dvc/plots_offline.html")
    args = parser.parse_args(argv)
    if args.cmd == "template":
        print(write_plots_template(args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
