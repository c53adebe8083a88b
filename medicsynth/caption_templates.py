"""Data of the label-aware scene grammar used by :func:`medicsynth.captions.template_caption`.

A caption has two sentences:

1. the **label sentence**: ``<frame> <scene>, <damage>, <people>.`` where the *frame* comes from
   ``informative`` (a photo for ``informative``; a content type such as a meme, screenshot,
   poster or selfie for ``not_informative``), the *scene* from ``disaster_types``, the *damage*
   clause from ``damage_severity`` and the *people* clause from ``humanitarian``
   (``not_humanitarian`` sometimes says so, sometimes adds nothing);
2. the **diversity sentence**: comma-separated slots drawn independently of the labels, in a
   shuffled order: camera angle, time of day, region, weather (weather depends on the disaster
   type so that, e.g., fire scenes are not "under heavy rain"); ``not_informative`` content uses
   a style slot instead of camera and weather.

Label phrases come first so that shortening, which drops whole trailing clauses, removes
diversity before label content, and so a text encoder with a short context still sees the
labels. Every phrase is plain, non-graphic English.

The caption stage fingerprints this file (and the assembly code), so any edit re-captions the
template rows instead of reusing them. :data:`TEMPLATE_VERSION` is the human-readable version
written into ``provenance``: bump it with every change of the phrases.
"""

from __future__ import annotations

TEMPLATE_VERSION = "1"

PHOTO_FRAMES: tuple[str, ...] = (
    "A photo of",
    "A news photo of",
    "A photograph of",
    "A smartphone photo of",
    "A press photo of",
    "A social media photo of",
)

# not_informative: the study's "content type" slot (memes, screenshots, posters, selfies...).
CONTENT_FRAMES: tuple[str, ...] = (
    "A meme about",
    "A screenshot of a social media post about",
    "A poster about",
    "A selfie in front of",
    "A cartoon drawing of",
    "A text graphic about",
    "An advertisement showing",
    "A collage of pictures of",
    "A blurry phone snapshot of",
)

# The same content types as plain nouns, for the LLM's diversity keywords.
CONTENT_TYPES: tuple[str, ...] = (
    "meme",
    "screenshot of a social media post",
    "poster",
    "selfie",
    "cartoon drawing",
    "text graphic",
    "advertisement",
    "collage",
    "blurry phone snapshot",
)

SCENES: dict[str, tuple[str, ...]] = {
    "earthquake": (
        "a town struck by an earthquake",
        "a city block after an earthquake",
        "a neighbourhood shaken by an earthquake",
        "a mountain village after an earthquake",
        "a market street after an earthquake",
    ),
    "fire": (
        "a wildfire burning across the hills",
        "a neighbourhood burned by a fire",
        "flames and thick smoke rising over houses",
        "a forest fire near a highway",
        "a building on fire",
    ),
    "flood": (
        "a flooded street",
        "floodwater covering farmland",
        "a town under muddy floodwater",
        "a river that has burst its banks into houses",
        "a flooded highway",
    ),
    "hurricane": (
        "a coastal town after a hurricane",
        "palm trees bent by hurricane winds",
        "a seaside street hit by a hurricane",
        "a storm surge after a hurricane",
        "a suburb swept by a hurricane",
    ),
    "landslide": (
        "a hillside village hit by a landslide",
        "mud and rocks sliding onto a mountain road",
        "a landslide scar on a steep slope",
        "houses buried by a mudslide",
        "a road cut by a landslide",
    ),
    "not_disaster": (
        "an ordinary city street",
        "a group of people at a public event",
        "a quiet countryside landscape",
        "a family gathering",
        "a city skyline",
        "a plate of food",
        "a political rally",
    ),
    "other_disaster": (
        "a neighbourhood hit by a tornado",
        "a drought-stricken field",
        "the site of an industrial explosion",
        "a village covered in volcanic ash",
        "a train derailment",
        "a snowstorm burying cars",
    ),
}

DAMAGE: dict[str, tuple[str, ...]] = {
    "little_or_none": (
        "with buildings left intact",
        "with no visible damage",
        "with undamaged houses",
        "with streets still in good condition",
    ),
    "mild": (
        "with cracked walls and broken windows",
        "with partly damaged roofs",
        "with minor debris on the ground",
        "with fallen branches and loose roof tiles",
        "with a few damaged cars and fences",
    ),
    "severe": (
        "with collapsed buildings",
        "with piles of rubble",
        "with houses destroyed to their foundations",
        "with roads torn apart",
        "with wrecked homes and vehicles",
    ),
}

# None: the clause is left out (not_humanitarian then says nothing about people).
PEOPLE: dict[str, tuple[str | None, ...]] = {
    "affected_injured_or_dead_people": (
        "injured people being carried on stretchers",
        "displaced families sitting beside their belongings",
        "survivors waiting outside their homes",
        "grieving relatives waiting outside",
        "evacuees crowded in a shelter",
    ),
    "infrastructure_and_utility_damage": (
        "damaged roads and bridges",
        "downed power lines and broken poles",
        "a damaged bridge closed to traffic",
        "broken water pipes and utility lines",
        "a cracked highway",
    ),
    "not_humanitarian": (
        "no people in sight",
        "an empty scene",
        None,
        None,
    ),
    "rescue_volunteering_or_donation_effort": (
        "rescue workers in high-visibility vests searching the site",
        "volunteers handing out food and water",
        "relief supplies being unloaded from a truck",
        "firefighters and soldiers helping residents",
        "a donation drive with boxes of supplies",
    ),
}

CAMERA: tuple[str, ...] = (
    "seen from a drone",
    "street-level view",
    "wide-angle shot",
    "close-up shot",
    "seen from a rooftop",
    "seen from a helicopter",
    "handheld phone photo",
)

TIME_OF_DAY: tuple[str, ...] = (
    "at dawn",
    "in the morning",
    "at midday",
    "in the afternoon",
    "at dusk",
    "at night",
)

REGION: tuple[str, ...] = (
    "in South Asia",
    "in Southeast Asia",
    "in East Asia",
    "in the Middle East",
    "in East Africa",
    "in West Africa",
    "in Southern Europe",
    "in the Caribbean",
    "in Central America",
    "in South America",
    "in North America",
    "in Oceania",
)

WEATHER_DEFAULT: tuple[str, ...] = (
    "under a clear sky",
    "under overcast skies",
    "in bright sunshine",
    "in light drizzle",
    "in hazy light",
)

WEATHER: dict[str, tuple[str, ...]] = {
    "fire": ("under a smoky sky", "under an orange haze", "in hot dry air", "with ash in the air"),
    "flood": ("under heavy rain", "under grey clouds", "after days of rain", "in light drizzle"),
    "hurricane": ("under dark storm clouds", "in strong wind", "under clearing skies after the storm", "in driving rain"),
    "landslide": ("under heavy rain", "in mist", "under grey clouds", "after days of rain"),
}

# not_informative content: style replaces camera and weather.
CONTENT_STYLE: tuple[str, ...] = (
    "with bold white text",
    "with a caption in large letters",
    "with emoji and hashtags",
    "in cartoon style",
    "with a logo in the corner",
    "low resolution and heavily compressed",
    "with a watermark",
)
