"""Label-aware captions for planned synthetic images.

One caption per row of the allocation plan (``id, seed`` and the four labels), from one of three
backends:

``template`` (offline default)
    A scene grammar (:mod:`medicsynth.caption_templates`): every label contributes phrases and
    diversity slots (camera angle, time of day, region, weather; content type and style for
    ``not_informative``) are drawn with ``random.Random(seed)``, so the same seed always gives
    the same caption. :func:`template_caption` is also how the demo diffusion model's *real*
    training images are captioned, so training and generation share one caption language.

``openai`` / ``anthropic``
    Through :mod:`medicsynth.llm`, in the study's two modes. A share ``proportion_real`` of the
    images (the study: 75%) is captioned **grounded**: the LLM sees a real training image with
    exactly the same four labels (picked by seed) and *describes that image* with its labels
    (temperature ``temperature_grounded``, the study's 0.4). The rest are **hypothetical**: a
    scene from the labels alone plus random keyword seeds (``keywords``: time of day, region,
    hemisphere, camera angle, weather...; :func:`keyword_seeds`, drawn from the image's seed, so
    reruns are identical), temperature ``temperature_hypothetical`` (0.8). When several planned
    images ground on one photograph, the second and later ask for another wording of its
    description (``$variation``), so they do not share one cached answer. With ``analysis``
    the model first writes a short analysis (what is visible, which elements carry each label),
    then the caption, in one structured answer; only the caption is kept as the caption, the
    analysis goes to the ``analysis`` column. The model is ``llm.<provider>.model``. Both
    temperatures are passed to the client for both providers; whether they reach the API is the
    provider adapter's ``temperature_sent`` (Anthropic's current API version takes none, see
    :mod:`medicsynth.llm.providers`), which is what the fingerprint and ``metrics`` record.
    Prompts are version-controlled files under ``prompts/``. Refusals are retried by the client
    with the prompt's ``[fallback_preface]`` (the study's "academic humanitarian research"
    preface); answers are cached by the client. A caption that still fails is recorded and
    replaced by the template caption, with ``provenance`` saying so: no row is ever left without
    a caption. LLM tables have two more columns than template ones: ``keywords`` and
    ``analysis`` (:data:`LLM_COLUMNS`); a template table is unchanged byte for byte.

Length. Captions must fit the diffusion model's text encoder (77 CLIP tokens for SD 1.x/2.x,
begin and end tokens included). With ``caption.tokenizer`` set and available locally, the
tokenizer counts. Otherwise a word limit is used (default 50 words). That is an estimate, not a
guarantee: CLIP's BPE keeps common English words whole and splits rarer ones, roughly 1.2-1.4
tokens per word for plain descriptive text, plus one token per comma or full stop, so 50 words
land around 65-75 of the 75 tokens left after the begin/end tokens; the template grammar's
captions are at most 42 words. Set ``caption.tokenizer`` whenever the model's tokenizer is on
disk. An over-long caption is shortened by dropping whole trailing clauses or sentences (at
``,;:.!?`` boundaries); only if the first clause alone is too long are trailing whole words
dropped (and dangling function words such as "of a" with them). Shortened captions are flagged
in the ``shortened`` column.

Incremental. The stage passes its previous ``captions.tsv``; a row is reused when its id, seed,
labels, mode, grounding image and configuration fingerprint (backend, model, prompt text,
temperature, length limit; for the template, a hash of the grammar and its code) are unchanged,
so raising ``allocate.total`` captions only the new plan rows. Rows that fell back to the
template are not reused: they are asked again (a cached refusal costs nothing; a transient
error gets its retry).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from medicsynth import caption_templates as grammar
from medicsynth.labels import TASKS, LabelError, validate_label
from medicsynth.params import require

BACKENDS = ("template", "openai", "anthropic")
MODES = ("template", "grounded", "hypothetical")

CAPTION_COLUMNS: tuple[str, ...] = (
    "id",
    "seed",
    *TASKS,
    "caption",
    "negative_prompt",
    "backend",
    "mode",
    "grounded_on",
    "provenance",
    "shortened",
    "fingerprint",
)

#: Extra columns of an LLM backend's table: the keyword seeds sent (hypothetical rows) and the
#: model's analysis (``analysis: true``). Template tables do not have them.
LLM_COLUMNS: tuple[str, ...] = ("keywords", "analysis")

FALLBACK_PROVENANCE = "template-fallback"


class CaptionError(ValueError):
    """Unusable caption input or parameters; the message names the file/key/row and the value."""


# --------------------------------------------------------------------------------------------
# Template backend


def template_caption(labels: dict[str, str], seed: int) -> str:
    """Deterministic caption for one label per task (``labels[task]``), varied by ``seed``.

    See :mod:`medicsynth.caption_templates` for the grammar. Labels are validated, so a
    misspelled class raises :class:`medicsynth.labels.LabelError` instead of a silent default.
    """
    canon = {task: validate_label(task, labels[task]) for task in TASKS}
    rng = random.Random(int(seed))
    # Draw every slot in a fixed order whatever the labels, so one seed's diversity choices
    # (camera, time...) do not shift when a single label changes.
    informative = canon["informative"] == "informative"
    frame = rng.choice(grammar.PHOTO_FRAMES if informative else grammar.CONTENT_FRAMES)
    scene = rng.choice(grammar.SCENES[canon["disaster_types"]])
    damage = rng.choice(grammar.DAMAGE[canon["damage_severity"]])
    people = rng.choice(grammar.PEOPLE[canon["humanitarian"]])
    camera = rng.choice(grammar.CAMERA)
    time_of_day = rng.choice(grammar.TIME_OF_DAY)
    region = rng.choice(grammar.REGION)
    weather = rng.choice(grammar.WEATHER.get(canon["disaster_types"], grammar.WEATHER_DEFAULT))
    style = rng.choice(grammar.CONTENT_STYLE)
    slots = [camera, time_of_day, region, weather] if informative else [style, region, time_of_day]
    rng.shuffle(slots)

    first = [f"{frame} {scene}", damage] + ([people] if people else [])
    second = ", ".join(slots)
    return f"{', '.join(first)}. {second[0].upper()}{second[1:]}."


def grammar_hash() -> str:
    """Hash of the grammar data and of :func:`template_caption`'s code.

    Part of the template fingerprint, so any edit to a phrase or to the assembly re-captions
    template rows even if :data:`~medicsynth.caption_templates.TEMPLATE_VERSION` was not bumped.
    """
    import inspect

    source = Path(grammar.__file__).read_text(encoding="utf-8") + inspect.getsource(template_caption)
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


#: Keyword seeds of hypothetical captions, per slot (``caption.keywords`` lists the slots used).
#: ``weather`` depends on the disaster type (no rain over a wildfire); the ``content_*`` slots
#: replace the photographic ones for ``not_informative`` images (memes, posters...).
KEYWORD_SLOTS: dict[str, tuple[str, ...]] = {
    "time_of_day": ("at dawn", "in the early morning", "at midday", "in the late afternoon", "at dusk", "at night"),
    "region": (
        "in South Asia", "in Southeast Asia", "in East Asia", "in the Middle East", "in Europe",
        "in North Africa", "in sub-Saharan Africa", "in North America", "in Central America",
        "in the Caribbean", "in South America", "in Oceania",
    ),
    "hemisphere": ("in the northern hemisphere", "in the southern hemisphere", "near the equator"),
    "season": ("in spring", "in summer", "in autumn", "in winter", "in the rainy season", "in the dry season"),
    "camera_angle": (
        "at eye level", "from a low angle", "from a high vantage point", "as an aerial drone view",
        "as a wide shot", "as a close-up", "from across the street", "from a moving vehicle",
    ),
    "setting": ("in a dense city centre", "in a suburb", "in a rural village", "on the coast", "in the mountains", "in an informal settlement"),
    "photographer": (
        "taken by a resident on a phone", "taken by a news photographer", "taken by a rescue worker",
        "taken by a passer-by", "taken from a window",
    ),
}
#: Slots that only apply to photographs (``informative``), and what replaces them otherwise.
PHOTO_SLOTS = frozenset({"time_of_day", "camera_angle", "season", "weather", "photographer", "setting"})
CONTENT_SLOTS: tuple[str, ...] = ("content_type", "content_style")
KEYWORD_SLOT_NAMES: tuple[str, ...] = (*KEYWORD_SLOTS, "weather")


def keyword_seeds(labels: dict[str, str], seed: int, slots: tuple[str, ...]) -> list[str]:
    """Random keyword seeds of one hypothetical caption: one phrase per slot in ``slots``.

    Args:
        labels: one label per task (validated).
        seed: the planned image's seed; each slot draws from its own stream
            ``random.Random(f"keywords:{seed}:{slot}")``, so adding or removing a slot leaves the
            others' draws unchanged, and a rerun draws the same keywords.
        slots: names from :data:`KEYWORD_SLOT_NAMES` (``weather`` is drawn from the template
            grammar's weather of the row's disaster type).

    Returns the phrases in slot order. For a ``not_informative`` row the photographic slots
    (:data:`PHOTO_SLOTS`) are replaced by a content type and style (a meme, a poster...), as the
    template grammar does.
    """
    disaster = validate_label("disaster_types", labels["disaster_types"])
    informative = validate_label("informative", labels["informative"]) == "informative"
    pools: dict[str, tuple[str, ...]] = {
        **KEYWORD_SLOTS,
        "weather": grammar.WEATHER.get(disaster, grammar.WEATHER_DEFAULT),
        "content_type": grammar.CONTENT_TYPES,
        "content_style": grammar.CONTENT_STYLE,
    }
    chosen = [slot for slot in slots if informative or slot not in PHOTO_SLOTS]
    if not informative:
        chosen = list(CONTENT_SLOTS) + chosen
    return [random.Random(f"keywords:{int(seed)}:{slot}").choice(pools[slot]) for slot in chosen]


def keyword_pools_hash() -> str:
    """Hash of the keyword pools (part of the hypothetical fingerprint)."""
    pools = {**KEYWORD_SLOTS, "weather": grammar.WEATHER, "weather_default": grammar.WEATHER_DEFAULT,
             "content_type": grammar.CONTENT_TYPES, "content_style": grammar.CONTENT_STYLE}
    return _hash({k: list(v) if not isinstance(v, dict) else {a: list(b) for a, b in v.items()} for k, v in pools.items()})


# --------------------------------------------------------------------------------------------
# Length


@dataclass
class LengthLimit:
    """How caption length is measured and the largest allowed value.

    ``unit`` is ``"tokens"`` (``count`` is the tokenizer's id count, begin/end tokens included)
    or ``"words"`` (whitespace-separated words). ``description`` goes into the fingerprint, so a
    different limit re-captions.
    """

    unit: str
    limit: int
    count: Callable[[str], int]
    description: str
    note: str = ""

    def fits(self, text: str) -> bool:
        """True when ``text`` is within the limit (``count(text) <= limit``)."""
        return self.count(text) <= self.limit


def word_limit(max_words: int) -> LengthLimit:
    """Limit by whitespace-separated words (the offline fallback; see the module docstring)."""
    if max_words < 1:
        raise CaptionError(f"caption.max_words = {max_words}: must be >= 1")
    return LengthLimit("words", max_words, lambda text: len(text.split()), f"words<={max_words}")


def load_length_limit(tokenizer: str | None, max_tokens: int = 77, max_words: int = 50) -> LengthLimit:
    """Token limit from a local CLIP tokenizer, else the word limit.

    ``tokenizer`` is a model id or path; it is loaded with ``local_files_only=True`` from
    ``<tokenizer>/tokenizer`` (a diffusers pipeline layout) or ``<tokenizer>`` itself. Nothing is
    downloaded. The token limit is ``min(max_tokens, tokenizer.model_max_length)``. When the
    tokenizer is not available, the word limit is returned with ``note`` saying why.
    """
    if not tokenizer:
        return word_limit(max_words)
    from transformers import CLIPTokenizer

    errors = []
    tok = None
    for kwargs in ({"subfolder": "tokenizer"}, {}):
        try:
            candidate = CLIPTokenizer.from_pretrained(tokenizer, local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        # transformers 5 returns an *empty* tokenizer (special tokens only) instead of raising
        # when no vocabulary files are found; counting with it would be meaningless.
        probe = candidate(_PROBE, add_special_tokens=False)["input_ids"]
        if len(candidate) <= 2 or not probe or candidate.unk_token_id in probe:
            errors.append(f"{kwargs.get('subfolder', '.')}: no usable vocabulary")
            continue
        tok = candidate
        break
    if tok is None:
        limit = word_limit(max_words)
        limit.note = f"tokenizer {tokenizer!r} not available locally ({'; '.join(errors)}); using {limit.description}"
        return limit
    # A tokenizer saved without a context size reports a huge sentinel: use max_tokens then.
    limit = min(int(max_tokens), int(tok.model_max_length))

    backend = getattr(tok, "backend_tokenizer", None)

    def count(text: str) -> int:
        # The true, untruncated length (the model would cut at `limit`). The fast backend
        # does not log transformers' "longer than the maximum" warning for every long caption.
        if backend is not None:
            return len(backend.encode(text, add_special_tokens=True).ids)
        return len(tok(text, truncation=False, add_special_tokens=True)["input_ids"])

    return LengthLimit("tokens", limit, count, f"clip-tokens<={limit}:{tokenizer}")


_PROBE = "a photo of a flooded street"

_DANGLING = frozenset("a an the of in on at to for by from with and or but under over into".split())

_CUT = re.compile(r"[,;:.!?](?=\s)")


def shorten(text: str, limit: LengthLimit) -> tuple[str, bool]:
    """``text`` if it fits, else the longest prefix that ends at a clause boundary and fits.

    Boundaries are ``, ; : . ! ?`` followed by whitespace; the kept prefix gets a full stop. If
    not even the first clause fits, whole trailing words are dropped. Returns the text and
    whether it was shortened. Never cuts inside a word.
    """
    text = " ".join(text.split())
    if limit.fits(text):
        return text, False
    cuts = [m.start() for m in _CUT.finditer(text)]
    for cut in reversed(cuts):
        candidate = _close(text[:cut])
        if candidate and limit.fits(candidate):
            return candidate, True
    words = text.split()
    for n in range(len(words) - 1, 0, -1):
        kept = words[:n]
        # "... photo of a" reads as broken: drop dangling function words too.
        while len(kept) > 1 and kept[-1].lower().strip(",;:") in _DANGLING:
            kept = kept[:-1]
        candidate = _close(" ".join(kept))
        if candidate and limit.fits(candidate):
            return candidate, True
    raise CaptionError(f"cannot fit caption within {limit.description}: {text!r}")


def _close(prefix: str) -> str:
    prefix = prefix.rstrip(" ,;:-")
    if not prefix:
        return ""
    return prefix if prefix[-1] in ".!?" else prefix + "."


# --------------------------------------------------------------------------------------------
# Negative prompts


def negative_prompt(labels: dict[str, str], negative_prompts: dict[str, dict[str, str]], common: str = "") -> str:
    """``common`` plus the per-class negative prompts of the row's labels, joined by ``", "``.

    Phrases repeated across classes appear once; order is ``common`` then ``TASKS`` order.
    """
    parts: list[str] = []
    for chunk in [common] + [negative_prompts.get(task, {}).get(labels[task], "") for task in TASKS]:
        for phrase in (p.strip() for p in str(chunk or "").split(",")):
            if phrase and phrase not in parts:
                parts.append(phrase)
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class CaptionConfig:
    """The ``caption`` section of ``params.yaml`` (see :meth:`from_params` for the keys)."""

    # No defaults: params.yaml is the one source of values (build with :meth:`from_params`).
    backend: str
    proportion_real: float
    temperature_grounded: float
    temperature_hypothetical: float
    min_words: int
    max_words: int
    max_tokens: int
    tokenizer: str | None
    negative_prompts: dict[str, dict[str, str]]
    negative_prompt_common: str
    prompt_grounded: str
    prompt_hypothetical: str
    analysis: bool
    keywords: tuple[str, ...]
    llm: dict[str, Any]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "CaptionConfig":
        """Build from the ``caption`` section.

        Keys: ``backend``, ``proportion_real``, ``temperature_grounded``,
        ``temperature_hypothetical``, ``min_words``, ``max_words``, ``max_tokens``, ``tokenizer``,
        ``negative_prompts`` (``{task: {class: text}}``), ``negative_prompt_common``,
        ``prompt_grounded``, ``prompt_hypothetical``, ``analysis`` (analysis-then-caption),
        ``keywords`` (slot names of :func:`keyword_seeds`), ``llm`` (client settings shared by
        both providers, e.g. ``concurrency``, ``max_calls``, ``cache_dir``, plus one mapping per
        provider, ``llm.openai`` / ``llm.anthropic``, with at least its ``model``; see
        :func:`llm_params`). Every key is required (a missing one raises ``KeyError`` naming
        ``caption.<key>``); ``train_manifest`` is a path the stage reads.
        """
        p = dict(params)

        def get(key: str) -> Any:
            return require(p, "caption", key)

        backend = str(get("backend"))
        if backend not in BACKENDS:
            raise CaptionError(f"caption.backend {backend!r} not in {BACKENDS}")
        proportion = float(get("proportion_real"))
        if not 0.0 <= proportion <= 1.0:
            raise CaptionError(f"caption.proportion_real = {proportion}: must be in [0, 1]")
        negatives = get("negative_prompts") or {}
        if not isinstance(negatives, dict):
            raise CaptionError("caption.negative_prompts: expected {task: {class: text}}")
        checked: dict[str, dict[str, str]] = {}
        for task, per_class in negatives.items():
            if not isinstance(per_class, dict):
                raise CaptionError(f"caption.negative_prompts.{task}: expected {{class: text}}")
            try:
                checked[task] = {validate_label(task, cls): str(text) for cls, text in per_class.items()}
            except LabelError as exc:
                raise CaptionError(f"caption.negative_prompts: {exc}") from None
        min_words, max_words = int(get("min_words")), int(get("max_words"))
        if not 1 <= min_words <= max_words:
            raise CaptionError(f"caption.min_words = {min_words}, max_words = {max_words}: need 1 <= min <= max")
        keywords = get("keywords")
        if not isinstance(keywords, (list, tuple)) or not all(isinstance(k, str) for k in keywords):
            raise CaptionError(f"caption.keywords = {keywords!r}: expected a list of slot names, e.g. [time_of_day, region]")
        unknown = [k for k in keywords if k not in KEYWORD_SLOT_NAMES]
        if unknown:
            raise CaptionError(f"caption.keywords: unknown slot(s) {', '.join(unknown)}; expected some of {', '.join(KEYWORD_SLOT_NAMES)}")
        if "region" in keywords and "hemisphere" in keywords:
            raise CaptionError(
                "caption.keywords lists region and hemisphere: they are drawn independently and can contradict "
                "each other (in Europe, in the southern hemisphere); keep one of them"
            )
        if len(set(keywords)) != len(keywords):
            raise CaptionError(f"caption.keywords = {list(keywords)}: a slot is listed twice")
        analysis = get("analysis")
        if not isinstance(analysis, bool):
            raise CaptionError(f"caption.analysis = {analysis!r}: expected true or false")
        llm = dict(get("llm") or {})
        if "model" in llm or "provider" in llm or "temperature" in llm:
            raise CaptionError(
                "caption.llm: model, provider and temperature are not shared settings: set the model per provider "
                "(caption.llm.openai.model, caption.llm.anthropic.model), the provider with caption.backend and the "
                "temperatures with caption.temperature_grounded/temperature_hypothetical"
            )
        for provider in ("openai", "anthropic"):
            if not isinstance(llm.get(provider, {}), dict):
                raise CaptionError(f"caption.llm.{provider}: expected a mapping such as {{model: ...}}")
        if backend != "template" and not (llm.get(backend) or {}).get("model"):
            raise CaptionError(f"caption.backend is {backend}: set caption.llm.{backend}.model (the captioning model id)")
        return cls(
            backend=backend,
            proportion_real=proportion,
            temperature_grounded=float(get("temperature_grounded")),
            temperature_hypothetical=float(get("temperature_hypothetical")),
            min_words=min_words,
            max_words=max_words,
            max_tokens=int(get("max_tokens")),
            tokenizer=get("tokenizer") or None,
            negative_prompts=checked,
            negative_prompt_common=str(get("negative_prompt_common") or ""),
            prompt_grounded=str(get("prompt_grounded")),
            prompt_hypothetical=str(get("prompt_hypothetical")),
            analysis=analysis,
            keywords=tuple(keywords),
            llm=llm,
        )


# --------------------------------------------------------------------------------------------
# Prompt files


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt file: sections ``[system]``, ``[user]`` and ``[fallback_preface]``.

    Each section runs from its header line to the next header. ``$name`` placeholders (Python
    ``string.Template``) are filled per image: ``$damage_severity``, ``$informative``,
    ``$humanitarian``, ``$disaster_types`` (labels with spaces), ``$keywords`` (hypothetical
    keyword seeds), ``$min_words``, ``$max_words``, ``$answer_format`` (:data:`ANSWER_FORMAT`:
    caption only, or analysis then caption) and ``$variation`` (grounded: empty for the first
    image grounded on a photograph, :data:`VARIATION` for later ones). A file may leave any of
    them out. The fallback prompt (used by the client after a refusal) is the preface followed by
    the user prompt.
    """

    path: str
    system: str
    user: str
    fallback_preface: str
    sha256: str

    @classmethod
    def load(cls, path: str | Path) -> "PromptTemplate":
        """Parse the prompt file at ``path`` into its sections; ``sha256`` fingerprints its text."""
        text = Path(path).read_text(encoding="utf-8")
        sections: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            header = re.fullmatch(r"\[(system|user|fallback_preface)\]\s*", line)
            if header:
                current = header.group(1)
                sections[current] = []
            elif current is not None:
                sections[current].append(line)
        if "user" not in sections:
            raise CaptionError(f"{path}: no [user] section")
        body = {k: "\n".join(v).strip() for k, v in sections.items()}
        return cls(
            path=str(path),
            system=body.get("system", ""),
            user=body["user"],
            fallback_preface=body.get("fallback_preface", ""),
            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        )

    def render(self, values: dict[str, Any]) -> tuple[str, str, str | None]:
        """``(system, user, fallback or None)`` with placeholders filled."""
        try:
            system = string.Template(self.system).substitute(values)
            user = string.Template(self.user).substitute(values)
        except (KeyError, ValueError) as exc:
            raise CaptionError(f"{self.path}: bad placeholder {exc}") from None
        fallback = f"{self.fallback_preface}\n\n{user}" if self.fallback_preface else None
        return system, user, fallback


# --------------------------------------------------------------------------------------------
# Captioning a plan

CAPTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"caption": {"type": "string", "description": "The image caption, plain text."}},
    "required": ["caption"],
    "additionalProperties": False,
}

#: Analysis-then-caption (``caption.analysis: true``): the analysis comes first in the answer, so
#: the model writes it before the caption (both APIs generate the properties in schema order).
ANALYSIS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "analysis": {"type": "string", "description": "Short analysis written before the caption."},
        "caption": {"type": "string", "description": "The image caption, plain text."},
    },
    "required": ["analysis", "caption"],
    "additionalProperties": False,
}

#: ``$answer_format`` of the prompt files, by ``caption.analysis``.
ANSWER_FORMAT: dict[bool, str] = {
    False: 'Answer with a JSON object whose field "caption" holds the caption.',
    True: (
        'First write a short analysis (two to four sentences) in the field "analysis": what the '
        "picture shows, which visible elements carry each of the four labels, and what the caption "
        'must therefore show. Then write the caption in the field "caption".'
    ),
}

#: ``$variation`` of a grounded prompt for the n-th (n >= 2) planned image grounded on one photo.
VARIATION = (
    " This photograph has been described before for another synthetic image: write description"
    " number $n, of the same scene and labels, worded differently and noticing other visible details."
)

# Fewer words than this is not a usable caption (e.g. "text", "A flood.").
MIN_LLM_WORDS = 5


def clean_llm_caption(value: Any) -> str:
    """The caption text of a structured answer, whitespace-normalised and unquoted.

    Raises ``ValueError`` (the client records ``invalid_answer``) for a missing, too short or
    refusal-like caption, so a bad answer is never written as a caption.
    """
    return _clean_caption_text(value.get("caption") if isinstance(value, dict) else None, value)


def clean_llm_analysis_caption(value: Any) -> dict[str, str]:
    """``{"caption", "analysis"}`` of an analysis-then-caption answer, each whitespace-normalised.

    The caption is checked as in :func:`clean_llm_caption`; a missing or empty analysis is an
    invalid answer too (the model skipped the step it was asked for).
    """
    caption = clean_llm_caption(value)
    analysis = value.get("analysis") if isinstance(value, dict) else None
    if not isinstance(analysis, str) or not analysis.strip():
        raise ValueError(f"no analysis string in answer {value!r}"[:200])
    return {"caption": caption, "analysis": " ".join(analysis.split())}


def _clean_caption_text(text: Any, value: Any) -> str:
    from medicsynth.llm.client import looks_like_refusal

    if not isinstance(text, str):
        raise ValueError(f"no caption string in answer {value!r}"[:200])
    text = " ".join(text.split()).strip("\"'\u201c\u201d ")
    if len(text.split()) < MIN_LLM_WORDS:
        raise ValueError(f"caption too short ({len(text.split())} words): {text!r}")
    if looks_like_refusal(text):
        raise ValueError(f"caption reads like a refusal: {text[:120]!r}")
    return text


def validate_plan(plan: pd.DataFrame, path: str | Path = "<plan>") -> pd.DataFrame:
    """Check the plan's columns, ids, seeds and labels; return it with canonical labels."""
    missing = [c for c in ("id", "seed", *TASKS) if c not in plan.columns]
    if missing:
        raise CaptionError(f"{path}: missing column(s) {', '.join(missing)}")
    out = plan.copy()
    for i, row in enumerate(out.itertuples(index=False)):
        line = i + 2  # header is line 1
        try:
            seed = int(getattr(row, "seed"))
        except (TypeError, ValueError):
            raise CaptionError(f"{path}: row {line}: seed {getattr(row, 'seed')!r} is not an integer") from None
        if seed < 0:
            raise CaptionError(f"{path}: row {line}: seed {seed} is negative")
        for task in TASKS:
            try:
                validate_label(task, getattr(row, task))
            except LabelError as exc:
                raise CaptionError(f"{path}: row {line}: {exc}") from None
    for task in TASKS:
        out[task] = [validate_label(task, v) for v in out[task]]
    out["seed"] = out["seed"].astype(int)
    out["id"] = out["id"].astype(str)
    dup = out["id"].duplicated()
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        raise CaptionError(f"{path}: row {i + 2}: duplicate id {out['id'].iloc[i]!r}")
    return out


@dataclass(frozen=True)
class Assignment:
    """How one planned image is captioned: mode and, when grounded, the real image."""

    mode: str
    grounded_on: str = ""
    grounded_file: str = ""


def grounding_index(train: pd.DataFrame | None) -> dict[tuple[str, ...], list[tuple[str, str]]]:
    """Real training images per label combination: ``(image_path, file)`` sorted by image_path."""
    index: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    if train is None or train.empty:
        return index
    for row in train.sort_values("image_path").itertuples(index=False):
        combo = tuple(getattr(row, task) for task in TASKS)
        index.setdefault(combo, []).append((row.image_path, getattr(row, "file", "") or row.image_path))
    return index


def assign_mode(
    labels: dict[str, str],
    seed: int,
    config: CaptionConfig,
    index: dict[tuple[str, ...], list[tuple[str, str]]],
) -> Assignment:
    """Mode of one image, deterministic by seed.

    ``template`` backend: always ``template``. LLM backends: ``grounded`` with probability
    ``proportion_real`` when some real training image has exactly these labels (the image is
    picked by seed among them, in image_path order), else ``hypothetical``. Separate random
    streams per decision keep the choice of image independent of the grounded/hypothetical draw.
    """
    if config.backend == "template":
        return Assignment("template")
    candidates = index.get(tuple(labels[task] for task in TASKS), [])
    if candidates and random.Random(f"mode:{seed}").random() < config.proportion_real:
        image_path, file = candidates[random.Random(f"ground:{seed}").randrange(len(candidates))]
        return Assignment("grounded", image_path, file)
    return Assignment("hypothetical")


def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass
class CaptionResult:
    """Result of :func:`caption_plan`: the captions table and the counts for metrics."""

    table: pd.DataFrame
    metrics: dict[str, Any]


def _readable(label: str) -> str:
    return label.replace("_", " ")


def caption_plan(
    plan: pd.DataFrame,
    config: CaptionConfig,
    *,
    train: pd.DataFrame | None = None,
    previous: pd.DataFrame | None = None,
    limit: LengthLimit | None = None,
    clients: dict[str, Any] | None = None,
    prompts: dict[str, PromptTemplate] | None = None,
    progress: bool = True,
) -> CaptionResult:
    """Caption every row of ``plan``, reusing unchanged rows of ``previous``.

    Args:
        plan: the allocation plan (``id, seed`` + labels), validated with :func:`validate_plan`.
        config: the ``caption`` parameters.
        train: real training rows to ground on (LLM backends).
        previous: the last ``captions.tsv``, or ``None``.
        limit: length limit (default: :func:`load_length_limit` from ``config``).
        clients: LLM backends: ``{"grounded": client, "hypothetical": client}`` (each an
            :class:`medicsynth.llm.client.LLMClient`, they differ in temperature); see
            :func:`make_clients`.
        prompts: ``{"grounded": ..., "hypothetical": ...}`` prompt templates (default: the
            files named in ``config``).

    Guarantees: one row per plan row, in plan order, with :data:`CAPTION_COLUMNS` and a non-empty
    caption within ``limit``; a row of ``previous`` with the same id, labels, mode and fingerprint
    (backend, model, prompt, limit...) is reused verbatim; a failed LLM call falls back to the
    template caption, recorded in ``provenance`` and counted in the metrics.
    """
    plan = validate_plan(plan)
    limit = limit or load_length_limit(config.tokenizer, config.max_tokens, config.max_words)
    llm = config.backend != "template"
    if llm:
        prompts = _llm_prompts(config, clients, prompts)
    index = grounding_index(train) if llm else {}
    fingerprints = caption_fingerprints(config, limit, clients if llm else None, prompts)
    reusable, previous_note = reusable_captions(previous)
    rows, pending, counts = _plan_rows(plan, config, limit, index, fingerprints, reusable)
    failures: dict[str, int] = {}
    llm_usage: dict[str, Any] = {}
    if pending:
        failures, llm_usage = _llm_captions(rows, pending, config, clients, prompts, limit, counts, progress)
    table = pd.DataFrame(rows, columns=list(CAPTION_COLUMNS) + (list(LLM_COLUMNS) if llm else []))
    assert (table["caption"].str.strip() != "").all(), "every row must have a caption"
    metrics = _caption_metrics(table, rows, config, limit, counts, failures, len(pending), llm_usage)
    if previous_note:
        metrics["previous_note"] = previous_note
    if llm:
        metrics["llm_settings"] = llm_settings(config, clients)
        metrics["analysis"] = config.analysis
        metrics["grounded_share"] = round(float((table["mode"] == "grounded").mean()), 4) if len(table) else 0.0
    return CaptionResult(table=table, metrics=metrics)


def _llm_prompts(
    config: CaptionConfig, clients: dict[str, Any] | None, prompts: dict[str, PromptTemplate] | None
) -> dict[str, PromptTemplate]:
    # Phase 0 (LLM backends): the clients must be given; the prompts default to the files in config.
    if clients is None:
        raise CaptionError(f"caption.backend {config.backend!r} needs LLM clients (see make_clients)")
    if prompts is None:
        prompts = {
            "grounded": PromptTemplate.load(config.prompt_grounded),
            "hypothetical": PromptTemplate.load(config.prompt_hypothetical),
        }
    return prompts


def caption_fingerprints(
    config: CaptionConfig,
    limit: LengthLimit,
    clients: dict[str, Any] | None,
    prompts: dict[str, PromptTemplate] | None,
) -> dict[str, str]:
    """Phase 1: a hash per mode of everything that shapes its captions (``{mode: sha}``).

    ``template`` covers the grammar and the length limit; with ``clients`` (LLM backends) the
    ``grounded``/``hypothetical`` entries cover backend, model, temperature actually sent,
    max_tokens, image size, prompt file, word range, limit, analysis-then-caption and its answer
    format; the hypothetical one also the keyword slots and pools. A row is reused only if its
    fingerprint is unchanged.
    """
    fingerprints = {"template": _hash({"backend": "template", "grammar": grammar_hash(), "limit": limit.description})}
    if clients is not None:
        for mode in ("grounded", "hypothetical"):
            client = clients[mode]
            fingerprints[mode] = _hash(
                {
                    "backend": config.backend,
                    "model": client.config.model,
                    "temperature": client.provider.temperature_sent,
                    "max_tokens": client.config.max_tokens,
                    "image_max_side": client.config.image_max_side,
                    "prompt": prompts[mode].sha256,
                    "words": [config.min_words, config.max_words],
                    "limit": limit.description,
                    "analysis": config.analysis,
                    "answer_format": ANSWER_FORMAT[config.analysis],
                    **({"variation": VARIATION} if mode == "grounded" else
                       {"keywords": list(config.keywords), "pools": keyword_pools_hash()}),
                }
            )
    return fingerprints


def reusable_captions(previous: pd.DataFrame | None) -> tuple[dict[str, dict[str, Any]], str]:
    """Phase 2: rows of the previous ``captions.tsv`` that may be reused, by id, and a note.

    Template fallbacks and empty captions are never reused (asked again; a cached refusal costs
    nothing). A previous table lacking a column is ignored entirely, and the note says so.
    """
    reusable: dict[str, dict[str, Any]] = {}
    if previous is None or not len(previous):
        return reusable, ""
    missing = [c for c in CAPTION_COLUMNS if c not in previous.columns]
    if missing:
        return reusable, f"previous captions ignored: missing column(s) {', '.join(missing)}"
    for row in previous.to_dict("records"):
        if str(row["provenance"]).startswith(FALLBACK_PROVENANCE) or not str(row["caption"]).strip():
            continue  # failed before: ask again (a cached refusal costs nothing)
        reusable[str(row["id"])] = row
    return reusable, ""


def _plan_rows(
    plan: pd.DataFrame,
    config: CaptionConfig,
    limit: LengthLimit,
    index: dict[tuple[str, ...], list[tuple[str, str]]],
    fingerprints: dict[str, str],
    reusable: dict[str, dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[int], dict[str, int]]:
    # Phase 3: one row per plan row: reused, template-captioned now, or pending an LLM caption.
    rows: list[dict[str, Any]] = []
    pending: list[int] = []  # indices of rows that need an LLM caption
    counts = {"reused": 0, "template_calls": 0}
    for rec in plan.to_dict("records"):
        labels = {task: rec[task] for task in TASKS}
        seed = int(rec["seed"])
        assignment = assign_mode(labels, seed, config, index)
        fingerprint = fingerprints[assignment.mode]
        row = {
            "id": rec["id"],
            "seed": seed,
            **labels,
            "caption": "",
            "negative_prompt": negative_prompt(labels, config.negative_prompts, config.negative_prompt_common),
            "backend": config.backend,
            "mode": assignment.mode,
            "grounded_on": assignment.grounded_on,
            "provenance": "",
            "shortened": 0,
            "fingerprint": fingerprint,
            "keywords": "; ".join(keyword_seeds(labels, seed, config.keywords)) if assignment.mode == "hypothetical" else "",
            "analysis": "",
            "_file": assignment.grounded_file,
            "_reused": False,
        }
        old = reusable.get(rec["id"])
        if old is not None and _same(old, row):
            row["caption"], row["provenance"], row["shortened"] = str(old["caption"]), str(old["provenance"]), int(old["shortened"])
            row["analysis"] = str(old.get("analysis", "") or "")
            row["_reused"] = True
            counts["reused"] += 1
        elif assignment.mode == "template":
            text, cut = shorten(template_caption(labels, seed), limit)
            counts["template_calls"] += 1
            row.update(caption=text, provenance=f"template v{grammar.TEMPLATE_VERSION}", shortened=int(cut))
        else:
            pending.append(len(rows))
        rows.append(row)
    _number_groundings(rows)
    return rows, pending, counts


def _number_groundings(rows: list[dict[str, Any]]) -> None:
    # The n-th planned image (in id order) grounded on one photograph gets `_variation` n: the
    # first describes it plainly, later ones ask for another wording (VARIATION). Ids of a
    # growing plan only add rows after the old ones of their combination, so n is stable.
    seen: dict[str, int] = {}
    for row in sorted(rows, key=lambda r: str(r["id"])):
        if row["mode"] == "grounded":
            seen[row["grounded_on"]] = row["_variation"] = seen.get(row["grounded_on"], 0) + 1


def _llm_captions(
    rows: list[dict[str, Any]],
    pending: list[int],
    config: CaptionConfig,
    clients: dict[str, Any],
    prompts: dict[str, PromptTemplate],
    limit: LengthLimit,
    counts: dict[str, int],
    progress: bool,
) -> tuple[dict[str, int], dict[str, Any]]:
    # Phase 4: ask the LLM for the pending rows, mode by mode; a failure falls back to the template.
    # Fills rows in place; returns failure counts by reason and each client's usage.
    from medicsynth.llm.client import raise_if_failing

    failures: dict[str, int] = {}
    requests = [_request(rows[i], config, prompts[rows[i]["mode"]]) for i in pending]
    for mode in ("grounded", "hypothetical"):
        chosen = [(i, req) for i, req in zip(pending, requests) if rows[i]["mode"] == mode]
        if not chosen:
            continue
        client = clients[mode]
        results = client.run([req for _, req in chosen], desc=f"caption {mode}", progress=progress)
        # Refused captions fall back to the template grammar by design (recorded per row); any
        # other failure counts towards the stage's failure share, which stops a broken run.
        raise_if_failing(results, client.config.max_failure_share, client.config.provider, client.config.model,
                         what=f"{mode} captions", ignore=("budget", "refusal"))
        for (i, _), result in zip(chosen, results):
            row = rows[i]
            model = f"{config.backend}:{client.config.model}"
            if result.ok:
                value = result.value if isinstance(result.value, dict) else {"caption": result.value}
                row["analysis"] = value.get("analysis", "")
                text, cut = shorten(value["caption"], limit)
                source = "cached" if result.cached else "api"
                fallback = " after refusal fallback" if result.used_fallback else ""
                row.update(caption=text, provenance=f"{model} {mode} ({source}{fallback})", shortened=int(cut))
            else:
                failures[result.failure] = failures.get(result.failure, 0) + 1
                text, cut = shorten(template_caption({t: row[t] for t in TASKS}, row["seed"]), limit)
                counts["template_calls"] += 1
                detail = f": {result.detail}" if result.detail else ""
                row.update(
                    caption=text,
                    provenance=f"{FALLBACK_PROVENANCE} ({model} {mode} failed: {result.failure}{detail})"[:300],
                    shortened=int(cut),
                )
    llm_usage = {mode: clients[mode].usage.as_dict() for mode in ("grounded", "hypothetical")}
    return failures, llm_usage


def llm_settings(config: CaptionConfig, clients: dict[str, Any]) -> dict[str, Any]:
    """Per mode: the model, the temperature asked for and the one the provider sends (``None``
    where the provider's API takes none), for ``metrics/caption.json``."""
    return {
        mode: {
            "model": clients[mode].config.model,
            "temperature_requested": clients[mode].config.temperature,
            "temperature_sent": clients[mode].provider.temperature_sent,
        }
        for mode in ("grounded", "hypothetical")
    }


def _caption_metrics(
    table: pd.DataFrame,
    rows: list[dict[str, Any]],
    config: CaptionConfig,
    limit: LengthLimit,
    counts: dict[str, int],
    failures: dict[str, int],
    llm_requests: int,
    llm_usage: dict[str, Any],
) -> dict[str, Any]:
    # Phase 5: metrics/caption.json.
    return {
        "backend": config.backend,
        "rows": len(table),
        "new": len(table) - counts["reused"],
        "reused": counts["reused"],
        "failed": sum(failures.values()),
        "failures": failures,
        "shortened": int(table["shortened"].sum()),
        "shortened_new": int(sum(r["shortened"] for r in rows if not r["_reused"])),
        "template_calls": counts["template_calls"],
        "llm_requests": llm_requests,
        "by_mode": {m: int((table["mode"] == m).sum()) for m in MODES},
        "length": {"unit": limit.unit, "limit": limit.limit, "note": limit.note},
        "llm_usage": llm_usage,
    }


def _same(old: dict[str, Any], row: dict[str, Any]) -> bool:
    """Whether a previous caption row was made for exactly this image, mode and configuration."""
    try:
        same_seed = int(old["seed"]) == int(row["seed"])
    except (TypeError, ValueError):
        return False
    return same_seed and all(
        str(old[k]) == str(row[k])
        for k in (*TASKS, "backend", "mode", "grounded_on", "fingerprint")
    )


def _request(row: dict[str, Any], config: CaptionConfig, prompt: PromptTemplate):
    from medicsynth.llm.client import LLMRequest

    labels = {task: row[task] for task in TASKS}
    values = {task: _readable(label) for task, label in labels.items()}
    n = row.get("_variation", 1)
    values.update(
        keywords=row["keywords"].replace("; ", ", "),
        min_words=config.min_words,
        max_words=config.max_words,
        answer_format=ANSWER_FORMAT[config.analysis],
        variation=string.Template(VARIATION).substitute(n=n) if n > 1 else "",
    )
    system, user, fallback = prompt.render(values)
    return LLMRequest(
        prompt=user,
        system=system,
        image_path=row["_file"] or None,
        schema=ANALYSIS_SCHEMA if config.analysis else CAPTION_SCHEMA,
        schema_name="caption",
        validate=clean_llm_analysis_caption if config.analysis else clean_llm_caption,
        fallback_prompt=fallback,
        key=row["id"],
    )


def llm_params(config: CaptionConfig, mode: str) -> dict[str, Any]:
    """:class:`medicsynth.llm.LLMConfig` fields of one mode's client.

    The shared ``caption.llm`` settings, overlaid with ``caption.llm.<backend>`` (its ``model``,
    and any other field such as ``base_url`` or ``max_tokens``), with ``provider`` = backend and
    ``temperature`` = ``temperature_<mode>``. The other provider's mapping is ignored, so
    switching ``backend`` switches the model too.
    """
    shared = {k: v for k, v in config.llm.items() if k not in ("openai", "anthropic")}
    temperature = config.temperature_grounded if mode == "grounded" else config.temperature_hypothetical
    return {**shared, **(config.llm.get(config.backend) or {}), "provider": config.backend, "temperature": temperature}


def make_clients(config: CaptionConfig, cache_dir: str | Path | None = None, sdk_client: Any | None = None,
                 llm: dict[str, Any] | None = None) -> dict[str, Any]:
    """One LLM client per mode (:func:`llm_params`), differing only in temperature; the provider
    is ``config.backend``. Both share the cache. ``{}`` for the template backend. ``llm`` is the
    params ``llm`` section (client defaults, prices); ``caption.llm.budget_usd`` caps each mode's
    client (grounded, hypothetical) before its first call."""
    from medicsynth.llm.client import client_from_params

    if config.backend == "template":
        return {}
    return {
        mode: client_from_params(llm_params(config, mode), cache_dir, sdk_client=sdk_client, llm=llm, where="caption.llm")
        for mode in ("grounded", "hypothetical")
    }
