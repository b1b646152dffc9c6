"""Coarse-to-fine token prediction (Guo, Zhang, Shieh 2025), adapted to map-by-map generation.

Codes whose vectors are close have close effects on f̂, so the transformer need not tell them apart itself: the
codebook is clustered once (k-means on the trained code vectors) into K coarse labels, the transformer's head
predicts each token's coarse label, and a small fine head predicts the code within that label's cluster.

The fine head reads the token's final hidden state h (which has already seen the token's own input, every other
token of its map and every earlier map) and the embedding of its coarse label: p(v | h, k) over the codes of
cluster k. It does not read the other coarse labels of the map, as the paper's bidirectional fine model does:
those are drawn in the same parallel step, so reading them would take a second trunk pass per map; h already
carries the map's context. p(k | h)·p(v | h, k) is then a distribution over the whole codebook, so the loss,
coarse CE + fine CE with the true label (teacher forcing), is the plain head's NLL of the code, map for map.

Sampling draws the label (guidance, temperature, top-k, top-p on the K label logits), then the code given the
drawn label, with guidance mixing the fine logits of the conditional and unconditional rows (the fine head is not
affine in h, so mixing its input would not be guidance of its logits).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2
from torch import nn

from pipeline.config import ConfigError, Field, section


@section
class CoarseConfig:
    clusters: int = Field(
        0,
        ge=0,
        description="Coarse-to-fine prediction: K coarse labels, k-means clusters of the trained codebook's vectors "
        "(seeded by transformer.train.seed); the transformer predicts each token's label, a small fine head the "
        "code within it. 0: off (one head over the codebook). Must be below the codebook size.",
    )

    def __post_init__(self):
        if self.clusters == 1:
            raise ValueError("clusters = 1: one cluster is the plain head with extra work; use 0 (off) or ≥ 2")


def codebook_clusters(codes_VC: torch.Tensor, clusters: int, seed: int, iterations: int = 50) -> torch.Tensor:
    """The coarse label of every code, cluster_V: k-means (k-means++ start, Lloyd's iterations) on the code
    vectors, deterministic by ``seed``. A cluster that ends empty is dropped and the labels renumbered 0 … K'−1,
    so that every label the head can predict has codes to choose from (K' ≤ ``clusters``)."""
    V = codes_VC.shape[0]
    if not 2 <= clusters < V:
        raise ConfigError(
            "transformer.coarse", [f"transformer.coarse.clusters = {clusters}: must be in 2 … {V - 1} (codebook {V})"]
        )
    data_VC = codes_VC.detach().double().cpu().numpy()
    with warnings.catch_warnings():  # an emptied cluster is handled below
        warnings.filterwarnings("ignore", message="One of the clusters is empty")
        _, labels_V = kmeans2(data_VC, clusters, iter=iterations, minit="++", rng=np.random.default_rng(seed))
    _, compact_V = np.unique(labels_V, return_inverse=True)
    return torch.from_numpy(compact_V.astype(np.int64))


class FineHead(nn.Module):
    """p(code | h, coarse label): an MLP on h + the label's embedding, its logits kept to the label's codes.

    ``cluster_V`` (the label of every code) starts round-robin, a valid clustering whatever the device (``cart
    plan`` builds models on the meta device); training sets k-means' labels with ``set_clusters`` and the saved
    model carries them in its JSON, not its weights, so that copying weights (``init_from``, the moving average)
    never mixes one tokenizer's clusters with another's.
    """

    def __init__(self, width: int, codebook_size: int, clusters: int):
        super().__init__()
        self.clusters = clusters
        self.label_embed = nn.Embedding(clusters, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, codebook_size)
        self.register_buffer("cluster_V", torch.arange(codebook_size, device="cpu") % clusters, persistent=False)

    def set_clusters(self, cluster_V: torch.Tensor) -> None:
        counts_K = torch.bincount(cluster_V.cpu(), minlength=self.clusters)
        if cluster_V.shape != self.cluster_V.shape or len(counts_K) != self.clusters or not counts_K.all():
            raise ValueError(f"labels of {tuple(cluster_V.shape)} codes do not fill {self.clusters} clusters")
        self.cluster_V.copy_(cluster_V)

    def forward(self, h_BLC: torch.Tensor, coarse_BL: torch.Tensor) -> torch.Tensor:
        """Fine logits over the whole codebook, fine_BLV, not yet kept to the cluster (``restrict``): guidance mixes
        them first, where −∞ − (−∞) would be NaN."""
        return self.fc2(F.gelu(self.fc1(h_BLC + self.label_embed(coarse_BL)), approximate="tanh"))

    def restrict(self, fine_BLV: torch.Tensor, coarse_BL: torch.Tensor) -> torch.Tensor:
        """The logits of codes outside each token's cluster set to −∞."""
        return fine_BLV.masked_fill(self.cluster_V != coarse_BL[..., None], -torch.inf)
