"""params.yaml is the one source of defaults: typed configs build from it and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from medicsynth.allocation import AllocateConfig
from medicsynth.captions import CaptionConfig
from medicsynth.evaluation import EvaluateConfig
from medicsynth.filtering import FilterConfig
from medicsynth.params import from_section, load_params, require, section

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Toy:
    size: int
    name: str


def test_require_names_section_key_and_file():
    assert require({"total": 3}, "allocate", "total") == 3
    with pytest.raises(KeyError, match=r"params.yaml: missing key allocate.total"):
        require({}, "allocate", "total")


def test_from_section_takes_every_field_from_params():
    assert from_section(Toy, {"toy": {"size": 2, "name": "a"}}, "toy") == Toy(2, "a")
    with pytest.raises(KeyError, match=r"missing key toy.name"):
        from_section(Toy, {"toy": {"size": 2}}, "toy")
    with pytest.raises(ValueError, match=r"params.yaml toy: unknown key\(s\) colour"):
        from_section(Toy, {"toy": {"size": 2, "name": "a", "colour": "red"}}, "toy")
    # Keys the stage reads itself (input paths) can be declared as not being fields.
    assert from_section(Toy, {"toy": {"size": 2, "name": "a", "path": "x"}}, "toy", ignore=["path"]).size == 2
    with pytest.raises(KeyError, match=r"no section 'toy'"):
        from_section(Toy, {}, "toy")


def test_the_repository_params_build_every_config():
    params = load_params(REPO / "params.yaml")
    allocate = AllocateConfig.from_params(section(params, "allocate"))
    assert allocate.total == params["allocate"]["total"]  # the value in params.yaml, no copy in code
    caption = CaptionConfig.from_params(section(params, "caption"))
    assert caption.backend == params["caption"]["backend"]
    filt = FilterConfig.from_params(section(params, "filter"))
    assert list(filt.tasks) == params["filter"]["tasks"]
    evaluate = from_section(EvaluateConfig, params, "evaluate")
    assert evaluate.batch_size == params["evaluate"]["batch_size"]


@pytest.mark.parametrize("name,build", [
    ("allocate", AllocateConfig.from_params),
    ("caption", CaptionConfig.from_params),
    ("filter", FilterConfig.from_params),
])
def test_a_key_removed_from_params_is_an_error_naming_it(name, build):
    values = dict(load_params(REPO / "params.yaml")[name])
    key = next(iter(values))
    del values[key]
    with pytest.raises(KeyError, match=rf"params.yaml: missing key {name}.{key}"):
        build(values)
