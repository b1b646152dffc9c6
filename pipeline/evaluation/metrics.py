"""Sample-quality metrics through torch-fidelity: FID, KID, Inception Score, precision and recall.

Two feature networks can produce them: torch-fidelity's Inception-v3 (the published numbers' network, whose
weights are read from disk and never downloaded) or the reference classifier of ``pipeline.models.evaluator``, trained
here. Every metric name ends with the network it came from, ``_inception`` or ``_ref``, because the two scales
have nothing in common: a ``fid_ref`` is never to be compared with a ``fid_inception``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from pipeline.config import InvalidInput
from pipeline.models.evaluator import ReferenceNet, load_evaluator
from pipeline.training.tokenizer_training import MissingWeights

# torch-fidelity's Inception-v3 (converted from TensorFlow's 2015-12-05 graph) as torch.hub caches it.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_EXTRACTOR = "inception-v3-compat"
# Precision and recall count each sample's 3 nearest neighbours (torch-fidelity's default prc_neighborhood).
PRC_NEIGHBOURS = 3


@dataclass(frozen=True)
class Extractor:
    """A registered torch-fidelity feature extractor, the weights it reads and the suffix of its metric names."""

    name: str
    weights: Path
    suffix: Literal["ref", "inception"]


class ReferenceExtractor(FeatureExtractorBase):
    """The reference classifier as torch-fidelity sees it: ``features`` for FID/KID/PRC, ``logits`` for IS.

    torch-fidelity builds extractors itself, as ``cls(name, features_list, **calculate_metrics_kwargs)``: the
    network is read from ``feature_extractor_weights_path`` and must be the one the name was derived from.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **_):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None or reference_name(feature_extractor_weights_path) != name:
            raise ValueError(f"feature extractor {name} needs feature_extractor_weights_path of the weights it names")
        self.net = load_evaluator(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        # IS takes raw logits: torch-fidelity applies the softmax itself (metric_isc.isc_features_to_metric).
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, img_uint8_B3HW: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features_BD, logits_BK = self.net(img_uint8_B3HW)
        out = {"features": features_BD, "logits": logits_BK}
        return tuple(out[name].float() for name in self.features_list)


def reference_name(weights: str | Path) -> str:
    """``cart-ref-<hash of the weights and config>``: torch-fidelity keys its caches by extractor name only, so
    the name must change whenever the network does."""
    safetensors = Path(weights).with_suffix(".safetensors")
    digest = hashlib.sha256(safetensors.read_bytes() + safetensors.with_suffix(".json").read_bytes())
    return f"cart-ref-{digest.hexdigest()[:16]}"


def reference_extractor(stem: str | Path) -> Extractor:
    """Register the reference classifier saved at ``stem`` with torch-fidelity (once per weights)."""
    weights = Path(stem).with_suffix(".safetensors")
    if not weights.is_file():
        raise MissingWeights(f"{weights}: no reference classifier (run the train_evaluator stage first)")
    name = reference_name(weights)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, ReferenceExtractor)
    return Extractor(name, weights, "ref")


def inception_available(weights_path: str | Path | None = None) -> Path | None:
    """Where Inception-v3's weights are: ``weights_path`` if given, else torch-fidelity's torch hub cache.

    Looks only at disk, never downloads. A path that was named but is absent is an error, not a fallback.
    """
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise MissingWeights(f"{weights_path}: no such Inception-v3 weights file ({INCEPTION_FILE})")
        return Path(weights_path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def inception_extractor(weights_path: str | Path | None = None) -> Extractor:
    """torch-fidelity's Inception-v3 with its weights file, once the file is known to hold tensors only.

    torch-fidelity reads the file with ``torch.load(weights_only=False)``, i.e. it unpickles it. It is read here
    first with ``weights_only=True``, which refuses anything but tensors and plain containers, so the unpickling
    that follows cannot run code that a user file smuggled in. Done before any sampling, so a refused file costs
    seconds, not the hours of a 50 000-image run.
    """
    path = inception_available(weights_path)
    if path is None:
        raise MissingWeights(
            f"Inception-v3 weights cannot be downloaded here: put {INCEPTION_FILE} at "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} or name its path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects, a truncated or foreign file: not a tensors-only state dict
        raise InvalidInput(
            f"{path}: not a plain tensor state dict, refused unread ({type(err).__name__}); torch-fidelity's "
            f"{INCEPTION_FILE} is one"
        ) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InvalidInput(f"{path}: not a state dict of tensors (torch-fidelity's {INCEPTION_FILE} is one)")
    return Extractor(INCEPTION_EXTRACTOR, path, "inception")


def choose_extractor(reference_stem: str | Path, inception_weights: str | Path | None = None) -> Extractor:
    """Inception-v3 when its weights are on disk, else the reference classifier."""
    if inception_available(inception_weights) is not None:
        return inception_extractor(inception_weights)
    return reference_extractor(reference_stem)


class Images(Dataset):
    """uint8 images as torch-fidelity reads a Dataset: each item a bare 3×H×W uint8 tensor."""

    def __init__(self, img_uint8_N3HW: torch.Tensor):
        if img_uint8_N3HW.dtype != torch.uint8 or img_uint8_N3HW.ndim != 4 or img_uint8_N3HW.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W images, got {img_uint8_N3HW.dtype} {tuple(img_uint8_N3HW.shape)}")
        self.img_uint8_N3HW = img_uint8_N3HW.cpu()

    def __len__(self) -> int:
        return len(self.img_uint8_N3HW)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.img_uint8_N3HW[i]


def fidelity_metrics(
    generated_uint8_N3HW: torch.Tensor,
    reference_uint8_N3HW: torch.Tensor,
    extractor: Extractor,
    device: torch.device | str = "cpu",
    *,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID, KID, IS (of the generated set) and precision/recall, named ``<metric>_<extractor.suffix>``.

    KID subsets and IS splits shrink to fit small sets: KID subsets hold at most the smaller set, IS splits at
    least 10 images each (one split, and an IS std of 0, below 20 images).
    """
    n = min(len(generated_uint8_N3HW), len(reference_uint8_N3HW))
    if n <= PRC_NEIGHBOURS:
        raise ValueError(f"fidelity metrics need more than {PRC_NEIGHBOURS} images in each set, got {n}")
    raw = torch_fidelity.calculate_metrics(
        input1=Images(generated_uint8_N3HW),  # input1 is the generated set: IS is of it, precision is its share
        input2=Images(reference_uint8_N3HW),
        feature_extractor=extractor.name,
        feature_extractor_weights_path=str(extractor.weights),  # given, so torch-fidelity never downloads
        fid=True,
        kid=True,
        isc=True,
        prc=True,
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size,
        kid_subset_size=min(kid_subset_size, n),
        isc_splits=max(1, min(isc_splits, len(generated_uint8_N3HW) // 10)),
        prc_neighborhood=PRC_NEIGHBOURS,
        save_cpu_ram=True,  # no loader worker processes: the images are already in memory
        cache=False,  # its cache is keyed by input and extractor names, not by content
        verbose=False,
    )
    s = extractor.suffix
    return {
        f"fid_{s}": raw[torch_fidelity.KEY_METRIC_FID],
        f"kid_{s}": raw[torch_fidelity.KEY_METRIC_KID_MEAN],
        f"kid_std_{s}": raw[torch_fidelity.KEY_METRIC_KID_STD],
        f"isc_{s}": raw[torch_fidelity.KEY_METRIC_ISC_MEAN],
        f"isc_std_{s}": raw[torch_fidelity.KEY_METRIC_ISC_STD],
        f"precision_{s}": raw[torch_fidelity.KEY_METRIC_PRECISION],
        f"recall_{s}": raw[torch_fidelity.KEY_METRIC_RECALL],
    }


@torch.no_grad()
def class_consistency(
    ref_net: ReferenceNet, img_uint8_N3HW: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 256
) -> float:
    """The reference classifier's accuracy on class-conditional samples, against the class each was asked for.

    ``ref_net`` in eval mode, as ``load_evaluator`` returns it (in train mode BatchNorm would use batch statistics).
    """
    device = next(ref_net.parameters()).device
    correct = 0
    for start in range(0, len(img_uint8_N3HW), batch_size):
        _, logits_BK = ref_net(img_uint8_N3HW[start : start + batch_size].to(device))
        correct += int((logits_BK.argmax(1).cpu() == labels_N[start : start + batch_size].cpu()).sum())
    return correct / len(img_uint8_N3HW)
