"""params.yaml as one typed object: a section per stage, each declared beside the code it configures."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.config import ConfigError, Field, build, section
from pipeline.data.decompose import DecomposeConfig
from pipeline.data.sources import DataConfig
from pipeline.data.tokens import ExtractTokensConfig
from pipeline.evaluation.evaluation import EvaluateConfig
from pipeline.evaluation.sample_fid import SampleFidConfig
from pipeline.plan import PlanConfig
from pipeline.training.evaluator_training import EvaluatorConfig
from pipeline.training.tokenizer_stage import TokenizerConfig
from pipeline.training.transformer_training import TransformerConfig

DEFAULT_PATH = Path("params.yaml")


@section
class Params:
    data: DataConfig = Field(default_factory=DataConfig, description="The `shard` stage: where images come from.")
    decompose: DecomposeConfig = Field(
        default_factory=DecomposeConfig, description="The `decompose` stage: the Ambrosio–Tortorelli split."
    )
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="The `train_tokenizer` stage: the base–detail VQ-VAE."
    )
    tokens: ExtractTokensConfig = Field(
        default_factory=ExtractTokensConfig, description="The `extract_tokens` stage: tokenizing the dataset."
    )
    transformer: TransformerConfig = Field(
        default_factory=TransformerConfig, description="The `train_transformer` stage and sampling defaults."
    )
    evaluator: EvaluatorConfig = Field(
        default_factory=EvaluatorConfig, description="The `train_evaluator` stage: the reference classifier."
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="The `evaluate` stage: samples, metrics and figures."
    )
    sample_fid: SampleFidConfig = Field(
        default_factory=SampleFidConfig,
        description="The `sample_fid` stage: N images per class, ADM's samples.npz, FID against reference statistics.",
    )
    plan: PlanConfig = Field(
        default_factory=PlanConfig,
        description="`cart plan`: the GPUs, utilisation and data size it prices the runs with (no stage reads it).",
    )

    def __post_init__(self):
        model, order = self.tokenizer.model, self.decompose.order
        latent, rem = divmod(self.data.resolution, model.downsampling)
        if rem or model.scales[-1] != latent:
            raise ValueError(
                f"tokenizer.model.scales ends at {model.scales[-1]} but data.resolution {self.data.resolution} / "
                f"2^(len(channel_multipliers) − 1) = {self.data.resolution / model.downsampling:g}: the last scale "
                "must be the latent side"
            )
        if (self.tokenizer.quantize == "continuous") != (self.transformer.head == "diffusion"):
            raise ValueError(
                f"tokenizer.quantize {self.tokenizer.quantize} and transformer.head {self.transformer.head} do not "
                "fit: codes need the softmax head (vq with softmax), continuous tokens the diffusion head "
                "(continuous with diffusion)"
            )
        if self.evaluate.highres_scale > 1 and self.evaluate.highres_scale != self.data.highres_scale:
            raise ValueError(
                f"evaluate.highres_scale {self.evaluate.highres_scale} needs real references at that scale: set "
                f"data.highres_scale to {self.evaluate.highres_scale} too (it is {self.data.highres_scale})"
            )
        if model.layout == "replace" and len(model.scales) - order * model.detail_depth < 1:
            raise ValueError(
                f"decompose.order {order} × tokenizer.model.detail_depth {model.detail_depth} leaves no base scale "
                f"among the {len(model.scales)} tokenizer.model.scales"
            )


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
