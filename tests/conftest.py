"""Shared fixtures: small image trees made by the tests themselves (good, odd and broken files)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Torch on one thread: hundreds of tiny steps run faster without thread hand-offs (40× on a loaded machine),
    and float results do not depend on how a product is split over threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random smooth colour image (not flat, not noise), uint8 RGB."""
    small = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture
def salted_tree(tmp_path: Path) -> dict:
    """An ImageFolder tree of 3 classes: 24 good images in various formats plus broken and odd files.

    Returns the root and what the shard stage must do with each file.
    """
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    good, bad, not_images = [], [], []
    for cls in ("cat", "dog", "eel"):
        for i in range(6):
            path = root / cls / f"img{i}.{'jpg' if i % 2 else 'png'}"
            write_rgb(path, smooth_rgb(rng, 40 + 7 * i, 50 + 3 * i))
            good.append(path)
    # Odd but valid: grayscale, RGBA, 16-bit, palette, and a nested sub-folder.
    gray = root / "cat" / "gray.png"
    cv2.imwrite(str(gray), rng.integers(0, 256, (48, 48), dtype=np.uint8))
    rgba = np.dstack([smooth_rgb(rng, 40, 40), np.full((40, 40), 128, np.uint8)])
    cv2.imwrite(str(root / "dog" / "alpha.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    deep = (smooth_rgb(rng, 36, 36).astype(np.uint16) * 257)[..., ::-1]
    cv2.imwrite(str(root / "eel" / "sixteen.png"), np.ascontiguousarray(deep))
    from PIL import Image

    Image.fromarray(smooth_rgb(rng, 33, 45)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "eel" / "pal.png")
    write_rgb(root / "dog" / "nested" / "deeper.jpg", smooth_rgb(rng, 64, 64))
    good += [gray, root / "dog" / "alpha.png", root / "eel" / "sixteen.png", root / "eel" / "pal.png"]
    good.append(root / "dog" / "nested" / "deeper.jpg")
    # Broken: truncated JPEG, zero bytes, text with an image extension, a bomb header, too small.
    full = cv2.imencode(".jpg", smooth_rgb(rng, 64, 64))[1].tobytes()
    (root / "cat" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "dog" / "empty.png").write_bytes(b"")
    (root / "eel" / "notes.jpg").write_text("this is not an image\n")
    (root / "cat" / "bomb.png").write_bytes(png_claiming_size(40_000, 40_000))
    write_rgb(root / "dog" / "tiny.png", smooth_rgb(rng, 4, 30))
    bad += [root / n for n in ("cat/truncated.jpg", "dog/empty.png", "eel/notes.jpg", "cat/bomb.png", "dog/tiny.png")]
    (root / "eel" / "README.txt").write_text("class notes\n")
    not_images.append(root / "eel" / "README.txt")
    return {"root": root, "good": good, "bad": bad, "not_images": not_images, "classes": ["cat", "dog", "eel"]}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Demo shards and their order-2 decomposition at 16 px, built once per test session (read-only)."""
    from tests.workspace import build_data

    return build_data(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def workspace(tiny_data, tmp_path, monkeypatch) -> Path:
    """A fresh working directory holding a copy of the tiny data and the tiny params, as the stages expect."""
    import shutil

    from tests.workspace import write_params

    shutil.copytree(tiny_data / "data", tmp_path / "data")
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def finished_chain(tmp_path_factory):
    """Every stage run once, in order and uninterrupted, in one workspace (read-only): see tests/faults.py."""
    from tests.faults import run_chain

    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_chain(tmp_path_factory.mktemp("finished"), monkeypatch)


@pytest.fixture(scope="session")
def _few_feature_inception(tmp_path_factory) -> tuple[Path, str]:
    """A random FID network file with 16 nonzero pool features (tests/test_inception.py's
    ``random_inception_file``), made once per session (read-only), and its hash."""
    from pipeline.evaluation import inception
    from tests.test_inception import random_inception_file

    with pytest.MonkeyPatch.context() as monkeypatch:
        path = random_inception_file(tmp_path_factory.mktemp("inception") / "inception.safetensors", monkeypatch, 16)
        return path, inception.WEIGHTS_SHA256


@pytest.fixture
def few_feature_inception(_few_feature_inception, monkeypatch) -> Path:
    """The FID network, random with 16 nonzero features (a FID in seconds), accepted as the real one is (its hash
    patched in), for the tests whose subject is what is done with the features, not the network."""
    from pipeline.evaluation import inception

    path, digest = _few_feature_inception
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", digest)
    return path
