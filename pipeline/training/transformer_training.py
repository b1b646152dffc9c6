"""Training the next-detail transformer (paper §3.3) with the shared loop of ``pipeline.training.train``.

Teacher forcing reads the stored tokens of an image, rebuilds with the frozen tokenizer the input of every map
(f̂ after the maps before it, exactly as sampling will) and predicts all maps at once; the loss is the
cross-entropy over all tokens (continuous tokens: the diffusion loss of every token). Loss and accuracy (softmax
only) are also logged per map, so the difficulty of base scales and detail maps can be told apart.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline import atomic
from pipeline.config import ConfigError, Field, section
from pipeline.data.decomposed import split_shards
from pipeline.data.loader import ShardLoader
from pipeline.data.tokens import decode_token_sample, split_maps
from pipeline.models.coarse import CoarseConfig, codebook_clusters
from pipeline.models.diffusion import DiffusionConfig
from pipeline.models.tokenizer import Tokenizer, TokenLayout, load_tokenizer
from pipeline.models.transformer import (
    CART,
    SamplingConfig,
    TransformerModelConfig,
    build_model,
    ema_stem,
    forward_flops,
    save_transformer,
    teacher_forcing_inputs,
)
from pipeline.models.weights import config_path, init_fingerprint, load_init_source, weights_path
from pipeline.progress import Progress
from pipeline.runtime import dist_from_env
from pipeline.training.self_correction import SelfCorrectionConfig, self_correct
from pipeline.training.train import (
    Phase,
    RunPaths,
    TrainConfig,
    adamw,
    decay_groups,
    ema_copy,
    ema_update,
    shard_training_loader,
    train,
)


@section
class TransformerTrainConfig(TrainConfig):
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Keep an exponential moving average of the weights, updated after every optimiser step with this "
        "decay (e.g. 0.9999), checkpointed and saved beside the weights as <stem>_ema; sampling and evaluate use it "
        "unless transformer.sampling.weights is raw. 0: no average.",
    )
    checkpoint_activations: bool = Field(
        False,
        description="Recompute each block's activations in the backward pass instead of storing them (activation "
        "checkpointing): about a third more compute for the memory of one block's activations (deep models, large "
        "batches). Same gradients.",
    )
    self_correction: SelfCorrectionConfig = Field(
        default_factory=SelfCorrectionConfig,
        description="Self-correction (DetailFlow): perturb a map, train the later maps to steer back.",
    )


@section
class TransformerConfig:
    model: TransformerModelConfig = Field(default_factory=TransformerModelConfig, description="Architecture.")
    head: Literal["softmax", "diffusion"] = Field(
        "softmax",
        description="softmax: logits over the codebook (VAR, CART); diffusion: MAR's per-token diffusion head over "
        "continuous tokens (needs tokenizer.quantize continuous).",
    )
    diffusion: DiffusionConfig = Field(
        default_factory=DiffusionConfig, description="The diffusion head's size and training (head diffusion only)."
    )
    train: TransformerTrainConfig = Field(
        default_factory=lambda: TransformerTrainConfig(weight_decay=0.05, beta1=0.9, beta2=0.95),
        description="Optimisation (AdamW β = (0.9, 0.95), weight decay 0.05 as in VAR), EMA, activation "
        "checkpointing, self-correction.",
    )
    coarse: CoarseConfig = Field(
        default_factory=CoarseConfig, description="Coarse-to-fine prediction over k-means clusters of the codebook."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="How `cart sample` and `evaluate` draw images by default."
    )
    init_from: str | None = Field(
        None,
        description="Stem of a saved transformer (e.g. VAR's, imported by `cart import-var`) to start from: every "
        "tensor whose name and shape fit is copied, position and level embeddings for the maps both layouts "
        "share, the rest starts fresh (both lists are printed). The width must match.",
    )

    def __post_init__(self):
        if self.train.self_correction.p > 0 and self.model.prediction != "next_map":
            raise ValueError(
                f"train.self_correction.p = {self.train.self_correction.p} needs model.prediction: next_map (the "
                f"perturbation is of a whole map, corrected by the maps after it; next_token has one token per step)"
            )
        if self.head == "diffusion" and self.model.prediction != "next_map":
            raise ValueError(
                "transformer.head diffusion draws whole maps: transformer.model.prediction must be next_map "
                f"(it is {self.model.prediction})"
            )
        # Both perturb or cluster codes of a codebook, which continuous tokens do not have.
        if self.head == "diffusion" and self.coarse.clusters:
            raise ValueError(
                f"coarse.clusters = {self.coarse.clusters} clusters a codebook: set it to 0 with head diffusion"
            )
        if self.head == "diffusion" and self.train.self_correction.p > 0:
            raise ValueError(
                f"train.self_correction.p = {self.train.self_correction.p} replaces codes of a codebook: set it to 0 "
                "with head diffusion"
            )

    @property
    def diffusion_head(self) -> DiffusionConfig | None:
        """The diffusion head's config, or None for the softmax head."""
        return self.diffusion if self.head == "diffusion" else None


def map_names(layout: TokenLayout) -> list[str]:
    """A readable name per map for the logs: ``m0_base1x1`` … ``m6_D1_8x8``."""
    return [
        f"m{i}_base{m.side}x{m.side}" if m.is_base else f"m{i}_D{m.level}_{m.side}x{m.side}"
        for i, m in enumerate(layout.maps)
    ]


class TransformerTask:
    """The transformer as the training loop sees it; the tokenizer is a frozen tool that builds the inputs.

    With ``ema_decay`` > 0 it also keeps the moving average of the weights (``self.ema``), a module of the task,
    so that checkpoints hold it and a resumed run continues it exactly.
    """

    def __init__(
        self,
        model: CART,
        tokenizer: Tokenizer,
        val_batches: Callable[[], Iterator],
        ema_decay: float = 0.0,
        self_correction: SelfCorrectionConfig | None = None,
    ):
        self.model, self.tokenizer, self.val_batches = model, tokenizer.requires_grad_(False).eval(), val_batches
        self.ema_decay = ema_decay
        self.self_correction = self_correction or SelfCorrectionConfig()
        if self.self_correction.p > 0 and model.layout.num_maps < 2:
            raise ConfigError(
                "transformer.train.self_correction",
                [f"transformer.train.self_correction.p = {self.self_correction.p}: one token map has no later map"],
            )
        self.ema: CART | None = ema_copy(model) if ema_decay > 0 else None
        self.net: torch.nn.Module = model
        self.names = map_names(model.layout)
        # Which map each token belongs to: the per-map sums of the loss are one scatter, not a loop over maps.
        ids = [m for m, length in enumerate(model.layout.lengths) for _ in range(length)]
        self.map_of_token_L = torch.tensor(ids)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.model} | ({"transformer_ema": self.ema} if self.ema is not None else {})

    def wrap(self, wrapped: dict[str, torch.nn.Module]) -> None:
        self.net = wrapped["transformer"]
        device = next(self.model.parameters()).device
        self.tokenizer.to(device)
        self.map_of_token_L = self.map_of_token_L.to(device)

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        self.model.checkpoint_activations = getattr(cfg, "checkpoint_activations", False)
        optimizer = adamw(decay_groups(self.model, cfg.weight_decay, self.model.decayed_embeddings()), cfg)
        return [Phase("transformer", optimizer, self.loss, list(self.model.parameters()))]

    def to_device(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_BL, label_B = batch
        return tokens_BL.to(device, non_blocking=True), label_B.to(device, non_blocking=True)

    def inputs(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return teacher_forcing_inputs(self.model, self.tokenizer, split_maps(tokens_BL, self.model.layout))

    def loss(self, batch, step: int):
        tokens_BL, label_B = batch
        if self.self_correction.p > 0:
            inputs, targets = self_correct(
                self.tokenizer, split_maps(tokens_BL, self.model.layout), self.self_correction
            )
            x_BlC = teacher_forcing_inputs(self.model, self.tokenizer, inputs)
            tokens_BL = torch.cat([idx.flatten(1) for idx in targets], dim=1)
        else:
            x_BlC = self.inputs(tokens_BL)
        loss_BL, correct_BL, parts = self.net(label_B, x_BlC, tokens_BL)
        logs = {"loss": loss_BL.mean().item()} | {k: v.item() for k, v in parts.items()}
        with torch.no_grad():
            logs |= self._per_map(loss_BL, correct_BL)
        return loss_BL.mean(), logs

    def _per_map(self, loss_BL: torch.Tensor, correct_BL: torch.Tensor | None = None) -> dict[str, float]:
        """Per-map means of the loss and (softmax) the accuracy."""
        sums = torch.zeros(2, len(self.names), device=loss_BL.device, dtype=torch.float64)
        sums[0].index_add_(0, self.map_of_token_L, loss_BL.sum(0).double())
        if correct_BL is not None:
            sums[1].index_add_(0, self.map_of_token_L, correct_BL.sum(0).double())
        sums /= torch.tensor(self.model.layout.lengths, device=sums.device) * loss_BL.shape[0]
        loss_M, acc_M = sums.tolist()
        accuracy = {} if correct_BL is None else {f"acc_{n}": v for n, v in zip(self.names, acc_M, strict=True)}
        return {f"loss_{n}": v for n, v in zip(self.names, loss_M, strict=True)} | accuracy

    def after_step(self, step: int, batch) -> dict[str, float]:
        if self.ema is not None:
            ema_update(self.ema, self.model, self.ema_decay)
        return {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return {f"val/{k}": v for k, v in evaluate_transformer(self.model, self.tokenizer, self.val_batches()).items()}


@torch.no_grad()
def evaluate_transformer(
    model: CART, tokenizer: Tokenizer, batches: Iterator, unconditional: bool = False
) -> dict[str, float]:
    """Teacher-forced val loss and token accuracy, overall and per map, with the true labels (no dropout), or with
    ``unconditional`` the null class that classifier-free guidance samples with.

    The diffusion loss draws noise levels and noise: from a fixed seed, so that every evaluation of the same
    weights gives the same number (the training stream is left where it was)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    task = TransformerTask(model, tokenizer, lambda: iter(()))
    task.map_of_token_L = task.map_of_token_L.to(device)
    sums: dict[str, float] = {}
    count = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for tokens_BL, label_B in batches:
            tokens_BL, label_B = tokens_BL.to(device), label_B.to(device)
            if unconditional:
                label_B = torch.full_like(label_B, model.num_classes)
            loss_BL, correct_BL, parts = model(label_B, task.inputs(tokens_BL), tokens_BL)
            batch = {"loss": loss_BL.mean().item()}
            if correct_BL is not None:
                batch["acc"] = correct_BL.float().mean().item()
            batch |= {k: v.item() for k, v in parts.items()} | task._per_map(loss_BL, correct_BL)
            for k, v in batch.items():
                sums[k] = sums.get(k, 0.0) + v * len(label_B)
            count += len(label_B)
    model.train(was_training)
    return {k: v / max(count, 1) for k, v in sums.items()}


@dataclass
class InitReport:
    copied: list[str]
    partly: list[str]  # embedding tables of which the rows of the shared maps were copied
    fresh: list[str]


def _shared_maps(source: dict[str, Any], layout: TokenLayout) -> int:
    """How many leading maps the saved layout and ``layout`` have in common (same side, same kind and level)."""
    ours = layout.to_json()["maps"]
    shared = 0
    for a, b in zip(source["maps"], ours, strict=False):
        if (a["h"], a["w"], a["kind"], a["level"]) != (b["h"], b["w"], b["kind"], b["level"]):
            break
        shared += 1
    return shared


# The diffusion head's output layer: v (C rows), then with the learned variance log Var (C rows more).
VELOCITY_ROWS = ("diffusion.output.weight", "diffusion.output.bias")


def _velocity_rows_fit(source: torch.Tensor, target: torch.Tensor) -> bool:
    return 2 * source.shape[0] == target.shape[0] and source.shape[1:] == target.shape[1:]


def init_transformer_from(model: CART, stem: str | Path) -> InitReport:
    """Start ``model`` from the transformer saved at ``stem``: copy what fits, keep the rest as initialised.

    Tensors of the same name and shape are copied whole. The position and level tables are copied for the maps
    both layouts begin with: VAR's base maps open every CART layout, so a CART transformer keeps VAR's embeddings
    of the base and learns those of its detail maps. A different width leaves nothing to copy: ``ConfigError``.
    """
    config, state = load_init_source(stem, "transformer.init_from")
    ours = model.state_dict()
    width = model.cfg.resolved_width
    source_width = state["class_embed.weight"].shape[1] if "class_embed.weight" in state else None
    if source_width != width:
        raise ConfigError(
            "transformer.init_from",
            [f"{stem}: key 'class_embed.weight' gives width {source_width}, transformer.model gives {width}"],
        )
    source_layout = TokenLayout.from_json(config["layout"])
    shared = _shared_maps(config["layout"], model.layout)
    report = InitReport([], [], [])
    same_layout = shared == model.layout.num_maps == source_layout.num_maps
    with torch.no_grad():
        for key, tensor in ours.items():
            by_map = key in ("pos_embed.weight", "level_embed.weight") and not same_layout
            if key in state and state[key].shape == tensor.shape and not by_map:
                tensor.copy_(state[key])
                report.copied.append(key)
            elif by_map and key in state and shared:
                # Rows belong to maps: copy those of the maps both layouts share, even where the table sizes
                # agree by chance (a VAR base map's row must not become a detail map's).
                if key == "pos_embed.weight":
                    rows = model.layout.offsets[shared]
                    tensor[:rows] = state[key][:rows]
                else:
                    ids, source_ids = model.layout.map_level_ids()[:shared], source_layout.map_level_ids()[:shared]
                    tensor[ids] = state[key][source_ids]
                report.partly.append(f"{key} (the {shared} shared maps)")
            elif key in VELOCITY_ROWS and key in state and _velocity_rows_fit(state[key], tensor):
                # A fixed-variance head's output is the velocity alone; the learned-variance head's starts with
                # the same velocity rows, then the log-variance rows, which keep their unit-variance start.
                tensor[: len(state[key])] = state[key]
                report.partly.append(f"{key} (the velocity rows; the variance rows start at unit variance)")
            else:
                report.fresh.append(key)
    return report


@dataclass(frozen=True)
class TransformerPaths:
    tokens: Path  # data/tokens
    tokenizer: Path  # models/tokenizer/tokenizer (stem)
    model: Path  # models/transformer/transformer (stem)
    checkpoints: Path  # persist
    live: Path  # persist: dvclive
    metrics: Path  # metrics/transformer.json


def run_settings(cfg: TransformerConfig) -> dict[str, Any]:
    """The params a run's checkpoint fingerprint hashes. The settings of options that are off are left out: a
    change to a setting the run does not use (self_correction.ratio at p 0, the diffusion head's with the softmax
    head) keeps its checkpoints. Kept for users' files too: a run without these options has the fingerprint it had
    before they existed, so checkpoints written then (a user's, in models/checkpoints) still resume."""
    settings = {"model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train)}
    if not cfg.train.self_correction.p:
        del settings["train"]["self_correction"]
    if cfg.coarse.clusters:
        settings["coarse"] = dataclasses.asdict(cfg.coarse)
    if cfg.diffusion_head is not None:
        settings["diffusion"] = dataclasses.asdict(cfg.diffusion_head)
    return settings


def train_transformer(
    cfg: TransformerConfig,
    paths: TransformerPaths,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Train (resuming from a matching checkpoint), save the weights, return val metrics before and after.

    With ``cfg.init_from`` the model starts from that transformer; ``log`` hears what was copied and what not."""
    manifest = json.loads((paths.tokens / "manifest.json").read_text())
    tokenizer, tokenizer_config = load_tokenizer(paths.tokenizer)
    if tokenizer_config["layout"] != manifest["layout"]:
        raise ValueError(
            f"{paths.tokens} was tokenized with another layout than {paths.tokenizer}.json: rerun extract_tokens"
        )
    continuous = manifest.get("quantize") == "continuous"
    if continuous != (cfg.head == "diffusion"):
        raise ValueError(
            f"{paths.tokens} holds {'continuous' if continuous else 'vq'} tokens but transformer.head is {cfg.head}: "
            "rerun extract_tokens after train_tokenizer with the tokenizer.quantize that transformer.head needs"
        )
    train_urls, val_urls = split_shards(paths.tokens / "train"), split_shards(paths.tokens / "val")
    if not train_urls or not val_urls:
        raise FileNotFoundError(f"{paths.tokens}: the transformer needs train and val token shards")
    count = manifest["splits"]["train"]["count"]
    train_loader, per_epoch = shard_training_loader(train_urls, decode_token_sample, count, cfg.train)
    val_loader = ShardLoader(val_urls, decode_token_sample, batch_size=128, shuffle=False)
    # Coarse-to-fine: the clusters of the codebook this tokenizer trained, computed once (deterministic by seed).
    coarse_V = None
    if cfg.coarse.clusters:
        coarse_V = codebook_clusters(tokenizer.codebook.weight, cfg.coarse.clusters, cfg.train.seed)
    model = build_model(cfg.model, manifest, cfg.train.seed, coarse_V=coarse_V, diffusion=cfg.diffusion_head)
    if cfg.init_from:
        report = init_transformer_from(model, cfg.init_from)
        log(f"copied from {cfg.init_from}: {', '.join(report.copied + report.partly) or 'nothing'}")
        log(f"initialised fresh: {', '.join(report.fresh) or 'nothing'}")
    # The untrained model's val loss is the reference for "val loss falls on every map".
    before = evaluate_transformer(model, tokenizer, iter(val_loader.epoch(0))) if dist_from_env().is_main else {}
    task = TransformerTask(
        model, tokenizer, lambda: iter(val_loader.epoch(0)), cfg.train.ema_decay, cfg.train.self_correction
    )
    fingerprint = atomic.fingerprint(
        run_settings(cfg),
        atomic.files_fingerprint(paths.tokens),
        atomic.files_fingerprint(paths.tokenizer.parent),
        init_fingerprint(cfg.init_from),
    )
    run = RunPaths(paths.checkpoints, paths.live)
    after = train(task, cfg.train, train_loader.epoch, run, fingerprint, batches_per_epoch=per_epoch, progress=progress)
    if not dist_from_env().is_main:
        return {}
    extra = {"tokenizer": str(paths.tokenizer), "classes": manifest["classes"]}
    save_transformer(paths.model, model.eval(), extra)
    if task.ema is not None:
        save_transformer(ema_stem(paths.model), task.ema, extra | {"ema_decay": cfg.train.ema_decay})
    else:  # an average left by an earlier run would be sampled in place of these weights
        for path in (weights_path(ema_stem(paths.model)), config_path(ema_stem(paths.model))):
            path.unlink(missing_ok=True)
    names = map_names(model.layout)
    # What the class is worth to the model: the val loss without it, minus with it, is what guidance can amplify.
    null = evaluate_transformer(model, tokenizer, iter(val_loader.epoch(0)), unconditional=True)
    result = {
        "val_loss": after["val/loss"],
        "val_acc": after.get("val/acc"),
        "val_loss_untrained": before["loss"],
        "val_loss_per_map": {n: after[f"val/loss_{n}"] for n in names},
        "val_loss_per_map_untrained": {n: before[f"loss_{n}"] for n in names},
        "val_loss_unconditional": null["loss"],
        "val_loss_per_map_unconditional": {n: null[f"loss_{n}"] for n in names},
        "val_acc_per_map": {n: after.get(f"val/acc_{n}") for n in names},
        **(
            {"val_loss_ema": evaluate_transformer(task.ema, tokenizer, iter(val_loader.epoch(0)))["loss"]}
            if task.ema
            else {}
        ),
        "parameters": sum(p.numel() for p in model.parameters()),
        # Cost beside quality: what `cart experiments` and `dvc exp show` list next to FID.
        "tokens": model.layout.num_tokens,
        "maps": model.layout.num_maps,
        "train_flops_per_image": 3 * forward_flops(model, 1, 1),
        **model.head.metrics(),
    }
    if "val/acc" not in after:  # continuous tokens have no accuracy; their val loss is the diffusion loss
        del result["val_acc"], result["val_acc_per_map"]
    atomic.write_json(paths.metrics, result)
    return result
