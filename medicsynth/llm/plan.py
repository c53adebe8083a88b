"""The whole pipeline's paid-API cost before anything runs (``make estimate``), calling nothing.

For each paid stage (relabel voters, caption, filter judge, zeroshot, hosted generation) a
:class:`StageCost` row: how many requests the stage would send, its input tokens (the stage's own
prompt files and JSON schema at ``llm.prices.chars_per_token``, plus each image by its provider's
documented rule after the client's downscaling to ``image_max_side``), its output tokens at most
(``max_tokens`` per request) and USD at the sync and the batch price of ``llm.prices``.

Two plans:

- ``demo``: params.yaml as it is. A stage whose paid part is off (``relabel.voters`` without a VLM,
  ``caption.backend: template``, ``filter.method`` not ``vlm``, ``zeroshot.provider: none``,
  ``generate.backend: diffusers``) costs nothing and says why. Request counts are upper bounds
  from params (every relabel pool image could be flagged, every planned image captioned/judged).
- ``medic``: MEDIC at full size, as the study ran it (:data:`MEDIC_PLAN`): 71,198 images, 24,270
  flagged images asked of two voters, ~10,000 captions (75% grounded on a real image), a few
  hundred judge calls; the stages' models and settings are those of params.yaml with the paid
  parts switched on.

Estimates are what :func:`medicsynth.llm.cost.estimate_requests` would say for requests of that
shape with an empty cache; a real run's estimate (in its metrics, beside the actual usage) also
skips cached calls.

Command line: ``python -m medicsynth.llm.plan [--params params.yaml] [--plan demo|medic|both]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medicsynth.llm.cost import PriceTable, price_table_from_params, request_tokens

#: MEDIC at the study's scale (issue 14). Image sizes are typical MEDIC photo sizes (an
#: assumption: MEDIC's images vary; the client downscales to image_max_side anyway).
MEDIC_PLAN: dict[str, Any] = {
    "images": 71_198,            # MEDIC train+dev+test
    "test_images": 15_688,       # MEDIC test split (zeroshot asks min(zeroshot.max_images, this))
    "relabel_flagged": 24_270,   # images the study flagged and sent to both voters
    "voters": ["openai", "anthropic"],
    "captions": 9_988,           # the study's planned synthetic images, one caption each
    "proportion_real": 0.75,     # the study's grounded share (captions with a real image attached)
    "judge": 500,                # "hundreds" of judge calls (the filter asks only about candidates)
    "real_image": (1024, 768),   # typical MEDIC photo (before the client's downscaling)
    "synthetic_image": (512, 512),  # the study rendered 512×512
    "caption_analysis": True,    # the study: analysis first, then the caption (longer answers)
}


@dataclass
class StageCost:
    """One paid stage (or one voter/mode of it) of a plan; ``usd_*`` ``None`` without a price."""

    stage: str
    part: str
    provider: str
    model: str
    requests: int
    input_tokens: int
    image_tokens: int
    output_tokens_max: int
    usd_sync: float | None
    usd_batch: float | None
    mode: str
    budget_key: str
    budget_usd: float | None
    note: str = ""

    @property
    def usd(self) -> float | None:
        """USD at the price of the stage's ``mode``."""
        return self.usd_batch if self.mode == "batch" else self.usd_sync

    @property
    def over_budget(self) -> bool:
        return self.budget_usd is not None and self.usd is not None and self.usd > self.budget_usd


def _off(stage: str, part: str, why: str) -> StageCost:
    return StageCost(stage, part, "-", "-", 0, 0, 0, 0, 0.0, 0.0, "-", "-", None, note=f"off: {why}")


def _sent_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    if max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _prompt(prompt_dir: Path, name: str) -> str:
    path = prompt_dir / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt file needed for the estimate")
    return path.read_text(encoding="utf-8")


def _row(stage: str, part: str, settings: Mapping[str, Any], where: str, prices: PriceTable | None, *,
         requests: int, text: str, schema: Mapping[str, Any] | None, image: tuple[int, int] | None,
         with_image: int | None = None, note: str = "") -> StageCost:
    """Cost of ``requests`` calls of ``text`` (+ ``schema``), ``with_image`` of them with ``image``."""
    provider, model = str(settings["provider"]), str(settings["model"])
    price = prices.price(model) if prices else None
    cpt = prices.chars_per_token if prices else 4.0
    rule = price.image if price else None
    with_image = requests if with_image is None else with_image
    sent = _sent_size(image, int(settings["image_max_side"])) if image else None
    tok_img, img = request_tokens(provider, "", text, dict(schema) if schema else None, sent, cpt, rule)
    tok_txt, _ = request_tokens(provider, "", text, dict(schema) if schema else None, None, cpt, rule)
    input_tokens = with_image * tok_img + (requests - with_image) * tok_txt
    image_tokens = with_image * img
    output = requests * int(settings["max_tokens"])
    usd_sync = price.usd(input_tokens, output) if price else None
    usd_batch = price.usd(input_tokens, output, batch=True) if price else None
    mode = str(settings["mode"])
    return StageCost(stage, part, provider, model, requests, input_tokens, image_tokens, output, usd_sync, usd_batch,
                     mode, f"{where}.budget_usd", settings.get("budget_usd"), note)


def _client_settings(llm: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    return {**dict(llm.get("client") or {}), **{k: v for k, v in own.items() if not isinstance(v, Mapping)}}


def plan_costs(params: Mapping[str, Any], plan: str, prompt_dir: str | Path = "prompts") -> list[StageCost]:
    """The :class:`StageCost` rows of ``plan`` (``"demo"`` or ``"medic"``) for ``params`` (a
    loaded params.yaml). Reads prompt files only; sends nothing."""
    from medicsynth.labels import TASKS
    from medicsynth.llm.labels_answer import labels_json_schema

    if plan not in ("demo", "medic"):
        raise ValueError(f"plan {plan!r}: expected demo or medic")
    p = copy.deepcopy(dict(params))
    prompts = Path(prompt_dir)
    llm = p.get("llm") or {}
    prices = price_table_from_params(llm.get("prices"))
    classify_text = _prompt(prompts, "classify_system.txt") + _prompt(prompts, "classify_user.txt")
    labels_schema = labels_json_schema(TASKS)
    demo = (p.get("data") or {}).get("demo") or {}
    medic = plan == "medic"
    side = int(demo.get("image_size", 64))
    real_image = tuple(MEDIC_PLAN["real_image"]) if medic else (side, side)
    gen = p.get("generate") or {}
    synth_image = tuple(MEDIC_PLAN["synthetic_image"]) if medic else (int(gen.get("width") or side), int(gen.get("height") or side))
    rows: list[StageCost] = []

    # relabel: each VLM voter is asked about every flagged image.
    relabel = p.get("relabel") or {}
    voters = MEDIC_PLAN["voters"] if medic else [v for v in relabel.get("voters", []) if v in ("openai", "anthropic")]
    if medic:
        flagged, note = MEDIC_PLAN["relabel_flagged"], "the study's flagged images"
    else:
        pool = int(demo.get("n_train", 0)) + int(demo.get("n_dev", 0))
        cap = relabel.get("max_flagged")
        flagged = pool if cap is None else min(pool, int(cap))
        note = "upper bound: every pool image flagged" if cap is None else "relabel.max_flagged"
    if not voters:
        rows.append(_off("relabel", "voters", f"relabel.voters is {relabel.get('voters')} (no VLM voter)"))
    for voter in voters:
        settings = {**_client_settings(llm, relabel.get(voter) or {}), "provider": voter}
        rows.append(_row("relabel", f"voter {voter}", settings, f"relabel.{voter}", prices, requests=flagged,
                         text=classify_text, schema=labels_schema, image=real_image, note=note))

    # caption: one request per planned image; the grounded share carries a real image.
    caption = p.get("caption") or {}
    backend = "openai" if medic and caption.get("backend") == "template" else caption.get("backend")
    n_captions = MEDIC_PLAN["captions"] if medic else int((p.get("allocate") or {}).get("total", 0))
    if backend in ("openai", "anthropic"):
        from medicsynth.captions import ANALYSIS_SCHEMA, CAPTION_SCHEMA

        cl = caption.get("llm") or {}
        settings = {**_client_settings(llm, cl), **(cl.get(backend) or {}), "provider": backend}
        share = MEDIC_PLAN["proportion_real"] if medic else float(caption.get("proportion_real", 0.0))
        analysis = MEDIC_PLAN["caption_analysis"] if medic else bool(caption.get("analysis"))
        text = _prompt(prompts, "caption_grounded.txt")
        rows.append(_row("caption", f"{round(share * 100)}% grounded", settings, "caption.llm", prices,
                         requests=n_captions, text=text, schema=ANALYSIS_SCHEMA if analysis else CAPTION_SCHEMA,
                         image=real_image, with_image=round(n_captions * share),
                         note="one per planned image" + (", analysis first" if analysis else "")))
    else:
        rows.append(_off("caption", "captions", f"caption.backend is {backend!r}"))

    # filter judge: asked only about candidates (at most every generated image).
    filt = p.get("filter") or {}
    if medic or filt.get("method") == "vlm":
        settings = _client_settings(llm, filt.get("vlm") or {})
        n_judge = MEDIC_PLAN["judge"] if medic else int((p.get("allocate") or {}).get("total", 0))
        text = _prompt(prompts, "judge_system.txt") + _prompt(prompts, "judge_user.txt")
        rows.append(_row("filter", "judge", settings, "filter.vlm", prices, requests=n_judge, text=text,
                         schema=labels_schema, image=synth_image,
                         note="hundreds of candidates (the study)" if medic else "upper bound: every planned image"))
    else:
        rows.append(_off("filter", "judge", f"filter.method is {filt.get('method')!r}"))

    # zeroshot: a capped subset of the test split.
    zs = p.get("zeroshot") or {}
    provider = "openai" if medic and zs.get("provider") == "none" else zs.get("provider")
    if provider in ("openai", "anthropic"):
        n_test = MEDIC_PLAN["test_images"] if medic else int(demo.get("n_test", 0))
        cap = zs.get("max_images")
        n = n_test if cap is None else min(n_test, int(cap))
        settings = {**_client_settings(llm, zs), "provider": provider}
        rows.append(_row("zeroshot", "test images", settings, "zeroshot", prices, requests=n, text=classify_text,
                         schema=labels_schema, image=real_image, note="zeroshot.max_images of the test split"))
    else:
        rows.append(_off("zeroshot", "test images", "zeroshot.provider is 'none'"))

    # hosted generation: priced per image (llm.prices.images), only with generate.backend openai.
    if gen.get("backend") == "openai":
        hosted = gen.get("hosted") or {}
        n = MEDIC_PLAN["captions"] if medic else int((p.get("allocate") or {}).get("total", 0))
        usd = hosted_usd(llm.get("prices"), hosted, n)
        rows.append(StageCost("generate", "hosted images", "openai", str(hosted.get("model")), n, 0, 0, 0, usd, None,
                              "sync", "generate.hosted.budget_usd", hosted.get("budget_usd"),
                              "per image (llm.prices.images)"))
    else:
        rows.append(_off("generate", "hosted images", f"generate.backend is {gen.get('backend')!r} (local rendering)"))
    return rows


def hosted_usd(prices: Mapping[str, Any] | None, hosted: Mapping[str, Any], images: int) -> float | None:
    """USD of ``images`` hosted images at ``llm.prices.images[<model>][<quality>]`` (USD per image
    at the table's size); ``None`` when the table has no such price."""
    table = ((prices or {}).get("images") or {}).get(str(hosted.get("model"))) or {}
    quality = hosted.get("quality") or "auto"
    per = table.get(quality)
    return None if per is None else images * float(per)


def _fmt_usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.2f}"


def format_table(rows: list[StageCost], title: str) -> str:
    """Fixed-width text table of ``rows`` with totals (sync, batch, and at each stage's mode)."""
    head = f"{'stage':9} {'part':16} {'provider:model':30} {'requests':>9} {'input tok':>12} {'image tok':>12} " \
           f"{'output max':>11} {'sync USD':>11} {'batch USD':>11}  {'mode':5}  budget"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        if r.note.startswith("off:"):
            lines.append(f"{r.stage:9} {r.part:16} {r.note}")
            continue
        budget = "none" if r.budget_usd is None else f"{_fmt_usd(r.budget_usd)}"
        if r.over_budget:
            budget += f"  OVER: the stage would refuse; raise {r.budget_key} to {math.ceil(r.usd * 100) / 100:.2f}"
        lines.append(
            f"{r.stage:9} {r.part:16} {(r.provider + ':' + r.model)[:30]:30} {r.requests:>9,} {r.input_tokens:>12,} "
            f"{r.image_tokens:>12,} {r.output_tokens_max:>11,} {_fmt_usd(r.usd_sync):>11} {_fmt_usd(r.usd_batch):>11}  "
            f"{r.mode:5}  {budget}  ({r.note})"
        )
    paid = [r for r in rows if not r.note.startswith("off:")]

    def total(values: list[float | None]) -> str:
        return "n/a" if any(v is None for v in values) else _fmt_usd(sum(values))

    lines.append("-" * len(head))
    lines.append(f"total: {sum(r.requests for r in paid):,} requests; sync {total([r.usd_sync for r in paid])}, "
                 f"batch {total([r.usd_batch for r in paid if r.stage != 'generate'] + [r.usd_sync for r in paid if r.stage == 'generate'])}, "
                 f"at the configured modes {total([r.usd for r in paid])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Print the paid-API cost of the pipeline before running it (calls nothing).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompts", default="prompts")
    ap.add_argument("--plan", choices=("demo", "medic", "both"), default="both")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    from medicsynth.params import load_params

    params = load_params(args.params)
    prices = (params.get("llm") or {}).get("prices") or {}
    plans = ("demo", "medic") if args.plan == "both" else (args.plan,)
    out: dict[str, Any] = {}
    for plan in plans:
        rows = plan_costs(params, plan, args.prompts)
        if args.json:
            out[plan] = [dict(r.__dict__, usd=r.usd) for r in rows]
            continue
        title = (f"== demo: {args.params} as it is ==" if plan == "demo" else
                 f"== MEDIC-sized plan: {MEDIC_PLAN['images']:,} images, {MEDIC_PLAN['relabel_flagged']:,} flagged for "
                 f"two voters, {MEDIC_PLAN['captions']:,} captions, {MEDIC_PLAN['judge']} judge calls "
                 f"(models and settings of {args.params}) ==")
        print(format_table(rows, title))
        print()
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"Prices of {prices.get('date')} ({prices.get('source')}); output tokens are upper bounds "
              f"(max_tokens per request); cached calls would cost nothing. Nothing was sent.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
