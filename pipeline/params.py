"""params.yaml as one typed object: a section per stage, each declared beside the code it configures."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.config import ConfigError, Field, build, section
from pipeline.sources import DataConfig

DEFAULT_PATH = Path("params.yaml")


@section
class Params:
    data: DataConfig = Field(default_factory=DataConfig, description="The `shard` stage: where images come from.")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML reads ``1e-4`` as a string, DVC (ruamel) as a float; agree with DVC."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path: str | Path = DEFAULT_PATH) -> Params:
    """Read and validate a params file; any problem raises ConfigError before a stage writes anything."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), [f"cannot read the params file: {err.strerror or err}"]) from None
    try:
        values = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"not valid YAML: {err}"]) from None
    return build(Params, values, source=str(path))
