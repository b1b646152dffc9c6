"""params.yaml is validated before any stage writes; the CLI reports problems by key and exit code."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import ConfigError
from pipeline.params import Params, load_params
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write_params(path: Path, **overrides) -> Path:
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        values[section][key] = value
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_shipped_params_file_is_valid():
    assert isinstance(load_params(ROOT / "params.yaml"), Params)


def every_section(cls) -> list:
    nested = [info.annotation for info in cls.__pydantic_fields__.values() if dataclasses.is_dataclass(info.annotation)]
    return [cls] + [s for n in nested for s in every_section(n)]


def test_every_parameter_is_documented():
    for section in every_section(Params):
        for name, info in section.__pydantic_fields__.items():
            assert info.description, f"{section.__name__}.{name} has no description"


def test_params_yaml_sets_every_key_explicitly():
    """A researcher reads params.yaml, not the code: every tunable must appear there."""
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, info in Params.__pydantic_fields__.items():
        assert set(values[name]) == set(info.annotation.__pydantic_fields__), name


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"data__resolution": 2}, "data.resolution = 2: Input should be greater than or equal to 8"),
        ({"data__resolution": "32"}, "data.resolution = '32': Input should be a valid integer"),
        ({"data__val_fraction": 1.5}, "data.val_fraction = 1.5"),
        ({"data__colour": "yes"}, "data.colour: unknown key"),
        ({"data__demo_crop_min": 0.5, "data__demo_crop_max": 0.2}, "demo_crop_min = 0.5 must not exceed"),
    ],
)
def test_invalid_value_exits_2_naming_the_key(tmp_path, monkeypatch, override, expected):
    params = write_params(tmp_path / "params.yaml", **override)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["shard", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert not (tmp_path / "data").exists()  # nothing written


@pytest.mark.parametrize(
    ("transformer", "expected"),
    [
        ({"coarse": {"clusters": 1}}, "clusters = 1: one cluster is the plain head"),
        ({"coarse": {"clusters": -2}}, "transformer.coarse.clusters = -2"),
        ({"train": {"self_correction": {"p": 1.5}}}, "transformer.train.self_correction.p = 1.5"),
        ({"train": {"self_correction": {"ratio": 0.0}}}, "transformer.train.self_correction.ratio = 0.0"),
        (
            {"train": {"self_correction": {"p": 0.5}}, "model": {"prediction": "next_token"}},
            "train.self_correction.p = 0.5 needs model.prediction: next_map",
        ),
    ],
)
def test_bad_coarse_to_fine_and_self_correction_values_exit_2_naming_the_key(
    tmp_path, monkeypatch, transformer, expected
):
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, keys in transformer.items():
        for key, value in keys.items():
            if isinstance(value, dict):
                values["transformer"][section][key].update(value)
            else:
                values["transformer"][section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train-transformer", "--params", "params.yaml"])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_scientific_notation_reads_as_a_float_like_dvc_does(tmp_path):
    from pipeline.params import _Loader

    assert yaml.load("x: 1e-4", Loader=_Loader) == {"x": 1e-4}


def test_unreadable_params_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_every_command_explains_its_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = [c.name for c in app.registered_commands]
    for name in commands:
        help_text = runner.invoke(app, [name, "--help"])
        assert help_text.exit_code == 0, name
        if name not in ("experiments", "tables", "import-var", "export-var"):  # read dvc exp, rows or checkpoint files
            assert "--params" in help_text.output, name


def test_info_names_device_and_params(tmp_path):
    result = runner.invoke(app, ["info", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0
    assert "torch" in result.output and "cpu" in result.output and "valid" in result.output


def test_shard_command_on_a_salted_tree_exits_0_with_a_summary(tmp_path, monkeypatch, salted_tree):
    params = write_params(tmp_path / "params.yaml", data__source=str(salted_tree["root"]), data__workers=1)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["shard", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert f"kept {len(salted_tree['good'])}, skipped 6" in result.output
    assert (tmp_path / "data" / "shards" / "manifest.json").exists()


def test_shard_command_with_missing_source_exits_1(tmp_path, monkeypatch):
    params = write_params(tmp_path / "params.yaml", data__source=str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["shard", "--params", str(params)])
    assert result.exit_code == 1
    assert "does not exist" in result.output


def _keys(values: dict, prefix: str = "") -> set[str]:
    nested = (_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"} for k, v in values.items())
    return set().union(*nested)


CIFAR10_PRESETS = ["params/cifar10.yaml", "params/cifar10-gpu.yaml"]  # the CPU's 2-hour row, one H100's 6-minute row


@pytest.mark.parametrize("preset", CIFAR10_PRESETS)
def test_a_cifar10_preset_sets_every_key_of_params_yaml_and_loads_as_issue_28_asks(preset):
    demo = yaml.safe_load((ROOT / "params.yaml").read_text())
    values = yaml.safe_load((ROOT / preset).read_text())
    assert _keys(values) == _keys(demo)  # complete: no key falls back to a default, none unknown
    p = load_params(ROOT / preset)
    assert p.data.source == "cifar10" and p.data.resolution == 32
    assert p.data.highres_scale == p.evaluate.highres_scale == 0  # no 2× originals
    assert p.evaluator.train.steps * p.evaluator.train.batch_size >= 10 * 45_000  # ~11 epochs of the train split
    # The demo keeps the GroupNorm rule its measured tables were made with; CIFAR-10 needs several channels per
    # group to keep the images' colour (docs/results.md).
    assert p.tokenizer.model.min_group_channels == 4 and demo["tokenizer"]["model"]["min_group_channels"] == 1
    # Issue 28: a tokenizer at least 64 channels wide with its adversarial term; the headline FID of 10 000 samples.
    assert p.tokenizer.model.channels >= 64 and p.tokenizer.loss.lambda_gan > 0
    assert p.tokenizer.loss.gan_start_step < p.tokenizer.train.steps  # the term is on for part of the training
    assert p.sample_fid.per_class * 10 == 10_000
    # evaluate's floor and ceiling are measured on as many images as its samples: their FIDs share the bias.
    val_images = round(50_000 * p.data.val_fraction)
    assert p.evaluate.samples_per_class * 10 == val_images == 1000
    assert p.tokenizer.eval_images <= val_images and p.tokenizer.rfid.images <= val_images


def test_the_cifar10_presets_differ_in_budget_and_machine_only():
    cpu, gpu = (load_params(ROOT / preset) for preset in CIFAR10_PRESETS)
    # Rows of the two presets compare: the same data split, tokenizer network, reference classifier, sampling and
    # evaluation sizes. The GPU spends its budget on batches, steps and the transformer's size.
    assert cpu.data.val_fraction == gpu.data.val_fraction and cpu.data.seed == gpu.data.seed
    assert cpu.tokenizer.model == gpu.tokenizer.model and cpu.evaluator == gpu.evaluator
    assert cpu.transformer.sampling == gpu.transformer.sampling
    assert cpu.evaluate.samples_per_class == gpu.evaluate.samples_per_class
    assert cpu.sample_fid.per_class == gpu.sample_fid.per_class
    assert gpu.transformer.model.depth > cpu.transformer.model.depth
    assert gpu.transformer.train.batch_size > cpu.transformer.train.batch_size
    # A bare GPU machine may lack the FID network: the GPU preset's tokenizer does not need it.
    assert gpu.tokenizer.rfid.every == 0 and cpu.tokenizer.rfid.every > 0
