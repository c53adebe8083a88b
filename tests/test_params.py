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


def _without(values: dict, key: str) -> dict:
    return {k: v for k, v in values.items() if k != key}


@pytest.mark.parametrize("key", ["steps", "device", "hosted"])
def test_generate_options_take_every_params_key_from_params_yaml(key):
    from medicsynth.diffusion.generate import GenerateOptions

    values = load_params(REPO / "params.yaml")["generate"]
    assert GenerateOptions.from_params(values).guidance == values["guidance"]  # no copy in code
    with pytest.raises(KeyError, match=rf"params.yaml: missing key generate.{key}"):
        GenerateOptions.from_params(_without(values, key))
    with pytest.raises(ValueError, match=r"params.yaml generate: unknown key\(s\) stepz"):
        GenerateOptions.from_params({**values, "stepz": 3})


def test_hosted_demo_lora_and_report_configs_name_a_missing_key():
    from medicsynth.diffusion.hosted import HostedConfig, HostedError
    from medicsynth.diffusion.lora import FLOW_KEYS
    from medicsynth.diffusion.train import DemoTrainConfig, LoraTrainConfig
    from medicsynth.report import ReportConfig

    params = load_params(REPO / "params.yaml")
    hosted = params["generate"]["hosted"]
    assert HostedConfig.from_params(hosted).max_calls == hosted["max_calls"]
    with pytest.raises(KeyError, match=r"missing key generate.hosted.concurrency"):
        HostedConfig.from_params(_without(hosted, "concurrency"))
    with pytest.raises(HostedError, match=r"generate.hosted: unknown key\(s\) sise"):
        HostedConfig.from_params({**hosted, "sise": "1x1"})

    adapt = params["adapt"]
    demo = {**adapt["demo"], "balance": adapt["balance"], "seed": adapt["seed"]}
    assert DemoTrainConfig.from_params(demo).unet_steps == adapt["demo"]["unet_steps"]
    with pytest.raises(KeyError, match=r"missing key adapt.demo.unet_steps"):
        DemoTrainConfig.from_params(_without(demo, "unet_steps"))

    lora = {k: v for k, v in adapt["lora"].items() if k not in ("captions", *FLOW_KEYS)}
    lora = {**lora, "balance": adapt["balance"], "seed": adapt["seed"]}
    assert LoraTrainConfig.from_params(lora).rank == adapt["lora"]["rank"]
    with pytest.raises(KeyError, match=r"missing key adapt.lora.rank"):
        LoraTrainConfig.from_params(_without(lora, "rank"))

    report = params["report"]
    with pytest.raises(KeyError, match=r"missing key report.title"):
        ReportConfig.from_params(_without(report, "title"), params["llm"]["prices"])
