"""`cart plan`: what a parameter file will cost before anything runs, computed from the params alone.

The networks are built on PyTorch's meta device (shapes, no memory, no data read), so a 2-billion-parameter d30
plans in a second on a laptop. FLOPs are model FLOPs: the transformer's come from ``forward_flops`` (the count
``train_transformer`` reports and ``bench/transformer.py`` divides by), the tokenizer's from PyTorch's
``FlopCounterMode`` run over its encoder and decoder on the meta device. GPU-hours are FLOPs divided by
(``plan.mfu`` × ``plan.peak_tflops``): an assumed utilisation, stated beside every figure, not a measurement.

Memory per GPU for training the transformer is an estimate from counted parts: fp32 weights, gradients, AdamW's
two moments, DDP's gradient buckets (several processes), the EMA copy, the frozen tokenizer, the activations
autograd keeps (``ACTIVATION_BYTES`` per token and channel per block, counted on the block itself under bf16
autocast: ``tests/test_plan.py`` checks the constant), the logits of the loss, and a fixed CUDA allowance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Field, section
from pipeline.data.sources import DEMO_PHOTOGRAPHS
from pipeline.models.tokenizer import Tokenizer
from pipeline.models.transformer import CART, forward_flops, sampling_flops

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k's train split
IMAGENET_CLASSES = 1000
GIB = 2**30

# Bytes autograd keeps for the backward pass per token and channel in one transformer block under bf16 autocast:
# the fp32 residual stream at both layer norms and their fp32 outputs (the AdaLN scale's gradient needs them),
# bf16 copies of the qkv, projection and MLP inputs, q and k before and after their normalisation, v and the
# attention output (memory-efficient attention keeps no L×L matrix), the MLP's 4C hidden state before and after
# the GELU. Counted with saved-tensor hooks on ``Block`` (tests/test_plan.py).
ACTIVATION_BYTES = 54
# Activation checkpointing keeps only each block's fp32 input and recomputes one block at a time in the backward.
CHECKPOINTED_BYTES = 4
# The loss: bf16 logits, the fp32 copy the cross-entropy reads (and keeps), and the gradients of both, per token
# and codebook entry.
LOGIT_BYTES = 2 + 4 + 4 + 2
# fp32 weights, fp32 gradients, AdamW's two fp32 moments.
STATE_BYTES = 4 + 4 + 8
# The CUDA context, cuBLAS and attention workspaces, and the caching allocator's slack: an allowance, not a count.
CUDA_ALLOWANCE_GIB = 2.0


@section
class PlanConfig:
    gpus: int = Field(8, ge=1, description="GPUs of every run that `cart plan` prices (per-GPU batch: the stage's).")
    peak_tflops: float = Field(
        989.0, gt=0, description="Peak dense bf16 TFLOP/s of one GPU (H100 SXM: 989; A100: 312)."
    )
    mfu: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Model-FLOPs utilisation assumed for the GPU-hour estimates (a fraction of peak_tflops).",
    )
    gpu_memory_gib: float = Field(80.0, gt=0, description="Memory of one GPU (GiB), to say whether training fits.")
    train_images: int = Field(
        0,
        ge=0,
        description="Training images (for epochs and the cost of extract_tokens); 0: the demo's count with "
        "data.source demo, else ImageNet-1k's 1 281 167.",
    )
    classes: int = Field(0, ge=0, description="Classes; 0: the demo's 8 with data.source demo, else ImageNet's 1000.")


@dataclass(frozen=True)
class Run:
    """One stage's run: images it processes, FLOPs per image, and what that costs at the assumed utilisation."""

    stage: str
    images: int
    flops_per_image: float
    note: str

    @property
    def flops(self) -> float:
        return self.images * self.flops_per_image


@dataclass(frozen=True)
class Plan:
    classes: int
    train_images: int
    maps: list[str]  # one label per token map, in generation order
    tokens: int
    tokenizer_parameters: int
    transformer_parameters: int
    encode_flops: float  # one image (or base) through the encoder
    decode_flops: float  # one latent through the decoder
    transformer_train_flops: float  # per image: forward and backward, model FLOPs (3 × forward)
    sample_flops: float  # per image: the transformer's forward(s) under guidance, and one decode
    global_batch: int
    epochs: float
    runs: list[Run]
    memory: dict[str, float]  # bytes per GPU, by part, for training the transformer
    config: PlanConfig

    def gpu_hours(self, run: Run) -> float:
        return run.flops / (self.config.mfu * self.config.peak_tflops * 1e12) / 3600

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


def dataset_size(params) -> tuple[int, int]:
    """(classes, train images) without reading data: plan's values, else the demo's counts or ImageNet-1k's."""
    cfg, data = params.plan, params.data
    demo = data.source == "demo"
    classes = cfg.classes or (len(DEMO_PHOTOGRAPHS) if demo else IMAGENET_CLASSES)
    train = cfg.train_images or (data.demo_train_per_class * classes if demo else IMAGENET_TRAIN_IMAGES)
    return classes, train


def build_on_meta(params, classes: int):
    """The tokenizer and transformer the params describe, on the meta device: every shape, no memory."""
    model = params.tokenizer.model
    with torch.device("meta"):
        tokenizer = Tokenizer(model, params.decompose.order, params.tokenizer.quantize)
        transformer = CART(
            params.transformer.model,
            tokenizer.layout,
            classes,
            model.codebook_size,
            model.latent_channels,
            clusters=params.transformer.coarse.clusters,
            diffusion=params.transformer.diffusion_head,
        )
    return tokenizer, transformer


def convnet_flops(tokenizer, resolution: int) -> tuple[float, float]:
    """FLOPs of one image through the encoder and of its latent through the decoder (``FlopCounterMode``: 2 per
    multiply-add of convolutions, matrix products and attention)."""
    image = torch.empty(1, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as encoding:
        latent = tokenizer.encode(image)
    with FlopCounterMode(display=False) as decoding:
        tokenizer.decode(latent)
    return float(encoding.get_total_flops()), float(decoding.get_total_flops())


def map_labels(layout) -> list[str]:
    return [f"{m.side}²" if m.is_base else f"D{m.level} {m.side}²" for m in layout.maps]


def make_plan(params) -> Plan:
    """Sizes, FLOPs, GPU-hours and training memory of the runs ``params`` describe."""
    cfg = params.plan
    classes, train_images = dataset_size(params)
    tokenizer, transformer = build_on_meta(params, classes)
    layout, order = transformer.layout, params.decompose.order
    encode, decode = convnet_flops(tokenizer, params.data.resolution)

    # The transformer: model FLOPs are 3 forward passes (forward, backward twice that); checkpointing recomputes
    # the forward, which costs time but is not model FLOPs, so it is charged to the run, not to the model.
    t = params.transformer.train
    transformer_train = 3 * forward_flops(transformer, 1, 1)
    recompute = 4 / 3 if t.checkpoint_activations else 1.0
    sampling = params.transformer.sampling.resolved()
    guided = sampling.guidance != 1.0
    sample = sampling_flops(transformer, guided, sampling.diffusion_steps) + decode

    # The tokenizer: every level encoded (the image and its n bases), the image decoded and the sampled prefixes.
    k = params.tokenizer
    prefixes = min(k.loss.prefix_samples, order) if k.loss.lambda_prefix > 0 else 0
    tokenizer_train = 3 * ((order + 1) * encode + (1 + prefixes) * decode)
    variants = 1 + (k.compare and order > 0) + k.compare  # VAR's and the one-map VQ-VAE beside, with compare
    tokenizer_train += (variants - 1) * 3 * (encode + decode)

    def seen(train_cfg) -> int:
        return train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accumulation * cfg.gpus

    global_batch = t.batch_size * t.grad_accumulation * cfg.gpus
    sampling_note = "guided: 2 rows" if guided else "unguided"
    runs = [
        Run("train_tokenizer", seen(k.train), tokenizer_train, f"{variants} tokenizer(s); LPIPS and GAN not counted"),
        Run("extract_tokens", train_images, (order + 1) * encode, f"{order + 1} encoder pass(es) per image"),
        Run(
            "train_transformer",
            seen(t),
            transformer_train * recompute,
            "3 forward passes" + (" + 1 recomputed (checkpoint_activations)" if recompute > 1 else ""),
        ),
        Run(
            "evaluate",
            2 * params.evaluate.samples_per_class * classes,
            sample,
            f"trained and untrained, {params.evaluate.samples_per_class}/class, {sampling_note}, decode",
        ),
        Run(
            "sample_fid",
            params.sample_fid.per_class * classes,
            sample,
            f"{params.sample_fid.per_class}/class, {sampling_note}, decode; Inception not counted",
        ),
    ]
    return Plan(
        classes=classes,
        train_images=train_images,
        maps=map_labels(layout),
        tokens=layout.num_tokens,
        tokenizer_parameters=sum(p.numel() for p in tokenizer.parameters()),
        transformer_parameters=sum(p.numel() for p in transformer.parameters()),
        encode_flops=encode,
        decode_flops=decode,
        transformer_train_flops=transformer_train,
        sample_flops=sample,
        global_batch=global_batch,
        epochs=seen(t) / train_images,
        runs=runs,
        memory=training_memory(params, transformer, tokenizer),
        config=cfg,
    )


def activation_bytes(batch: int, tokens: int, width: int, depth: int, checkpointed: bool) -> float:
    """Activations autograd keeps for one micro-batch: every block's, or with checkpointing every block's input
    and one block recomputed at a time."""
    per_block = batch * tokens * width
    if checkpointed:
        return per_block * (CHECKPOINTED_BYTES * depth + ACTIVATION_BYTES)
    return per_block * ACTIVATION_BYTES * depth


def training_memory(params, transformer, tokenizer) -> dict[str, float]:
    """Bytes per GPU for training the transformer at ``transformer.train.batch_size`` per micro-batch."""
    t, cfg = params.transformer.train, params.plan
    n = sum(p.numel() for p in transformer.parameters())
    layout, model = transformer.layout, transformer.cfg
    B, L = t.batch_size, layout.num_tokens
    return {
        "weights, gradients, AdamW moments (fp32)": STATE_BYTES * n,
        "DDP gradient buckets": 4 * n if cfg.gpus > 1 else 0,
        "EMA copy": 4 * n if t.ema_decay > 0 else 0,
        "frozen tokenizer (fp32)": 4 * sum(p.numel() for p in tokenizer.parameters()),
        "activations": activation_bytes(B, L, model.resolved_width, model.depth, t.checkpoint_activations),
        "logits and loss": LOGIT_BYTES * B * L * transformer.codebook_size,
        "CUDA context, workspaces, allocator slack": CUDA_ALLOWANCE_GIB * GIB,
    }


def as_dict(plan: Plan) -> dict[str, Any]:
    """The plan as plain values (what `cart plan --json` prints)."""
    out = dataclasses.asdict(plan)
    out["config"] = dataclasses.asdict(plan.config)
    out["runs"] = [
        dataclasses.asdict(run) | {"flops": run.flops, "gpu_hours": plan.gpu_hours(run)} for run in plan.runs
    ]
    out["memory_total"] = plan.memory_total
    return out
