"""Where images come from: the offline demo photographs, or an ImageFolder tree, as RGB uint8 at one resolution.

Both sources produce ``Item``s (what to read) in a deterministic order; ``load_item`` turns one into a
``Loaded`` image or a ``Skipped`` reason. Loading is a pure function of the item and the config, so the
shard stage can run it in worker processes and still write byte-identical output.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

from pipeline.config import Field, section

# The colour photographs that scikit-image ships inside its wheel (no download): one demo class each.
DEMO_PHOTOGRAPHS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".jp2", ".pbm", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# Why a file of an ImageFolder tree is not read, by extension (recorded in the manifest).
_NOT_READ = {
    ".gif": "GIF is not read (an animation is no single image): convert it to PNG to use it",
    "": "not an image file extension",
}


@section
class DataConfig:
    source: str = Field(
        "demo",
        min_length=1,
        description="'demo' (offline crops of scikit-image's photographs, class = photograph), 'cifar10' (CIFAR-10's "
        "training split, from `archive` or downloaded; docs/cifar10.md) or the path of an ImageFolder tree: one "
        "sub-folder per class, class index by sorted folder name.",
    )
    archive: str | None = Field(
        None,
        min_length=1,
        description="source cifar10: the CIFAR-10 archive to read (cifar-10-binary.tar.gz, cifar-10-python.tar.gz or "
        "an ImageFolder tar with train/<class>/<image>), unpacked once to cifar10/ beside the shards; null: "
        "torchvision's downloader fetches cifar-10-python.tar.gz (MD5-checked) to downloads/ beside them.",
    )
    val_source: str | None = Field(
        None,
        description="Optional ImageFolder tree used whole as the val split (then val_fraction is not used). "
        "Its class folders must be those of `source`.",
    )
    resolution: int = Field(32, ge=8, le=4096, description="Side of the square images written to the shards (px).")
    highres_scale: int = Field(
        2,
        ge=0,
        le=8,
        description="Also store each image at this multiple of the resolution (`hr.png`) when the source has the "
        "pixels for it (demo crops of at least that side, files whose shorter side allows it; the others are "
        "counted): the real references of generation above the trained size. 0 or 1: none.",
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of each class held out for val (ImageFolder source without val_source)."
    )
    seed: int = Field(0, ge=0, description="Seed of the val split and of the demo crops.")
    min_side: int = Field(8, ge=1, description="Images whose shorter side is smaller than this are skipped.")
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Images with more pixels are skipped unread (decompression-bomb guard; Pillow's default limit).",
    )
    shard_size: int = Field(1000, ge=1, description="Maximum samples per WebDataset shard.")
    workers: int = Field(2, ge=1, le=256, description="Processes that decode, resize and encode images.")
    demo_train_per_class: int = Field(256, ge=1, description="Demo: train crops per photograph.")
    demo_val_per_class: int = Field(64, ge=1, description="Demo: val crops per photograph.")
    demo_crop_min: float = Field(
        0.1, gt=0.0, le=1.0, description="Demo: smallest crop side, as a fraction of the photograph's shorter side."
    )
    demo_crop_max: float = Field(
        0.3, gt=0.0, le=1.0, description="Demo: largest crop side, as a fraction of the photograph's shorter side."
    )
    demo_val_band: float = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        description="Demo: val crops come from this end fraction of each photograph's longer side, train crops "
        "from the rest, so no val crop overlaps a train crop.",
    )

    def __post_init__(self):
        if self.demo_crop_min > self.demo_crop_max:
            raise ValueError(
                f"demo_crop_min = {self.demo_crop_min} must not exceed demo_crop_max = {self.demo_crop_max}"
            )
        # The val band spans demo_val_band of the longer side, hence at least that much of the shorter one.
        if self.demo_crop_max > self.demo_val_band:
            raise ValueError(
                f"demo_crop_max = {self.demo_crop_max} must not exceed demo_val_band = {self.demo_val_band}, "
                "or the largest crops would not fit in the val band"
            )


class SourceError(ValueError):
    """The source as a whole is unusable (missing, empty, no classes): the stage stops."""


@dataclass(frozen=True)
class Item:
    """One image to load: a file of an ImageFolder tree, or a crop box of a demo photograph."""

    key: str
    cls: int
    source: str  # file path relative to its root, or the demo photograph's name
    path: Path | None = None  # ImageFolder file
    box: tuple[int, int, int] | None = None  # demo crop (top, left, side)


@dataclass(frozen=True)
class Loaded:
    item: Item
    rgb: np.ndarray  # (resolution, resolution, 3) uint8
    original_size: tuple[int, int]  # (height, width) before resizing
    rgb_highres: np.ndarray | None = None  # the same region at highres_scale × resolution, from real pixels


def highres_of(rgb: np.ndarray, cfg: DataConfig) -> np.ndarray | None:
    """``rgb`` (the source region) at highres_scale × the resolution, if it has that many pixels: never upsampled,
    or the 2× reference would reward blur."""
    side = cfg.highres_scale * cfg.resolution
    if cfg.highres_scale < 2 or min(rgb.shape[:2]) < side:
        return None
    return resize_square(rgb, side)


@dataclass(frozen=True)
class Skipped:
    item: Item
    reason: str


# ---------------------------------------------------------------------------------------------------------------
# Demo source


@functools.cache
def demo_photograph(name: str) -> np.ndarray:
    """An RGB uint8 photograph shipped with scikit-image (cached: every crop of a class reads the same one)."""
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    return np.ascontiguousarray(image[..., :3])


def demo_items(cfg: DataConfig) -> tuple[list[str], dict[str, list[Item]]]:
    """Class names and the crop boxes of each split, drawn deterministically from ``cfg.seed``."""
    splits: dict[str, list[Item]] = {"train": [], "val": []}
    for cls, name in enumerate(DEMO_PHOTOGRAPHS):
        height, width = demo_photograph(name).shape[:2]
        rng = np.random.default_rng([cfg.seed, cls])
        for split, count in (("train", cfg.demo_train_per_class), ("val", cfg.demo_val_per_class)):
            region = _demo_region(height, width, cfg.demo_val_band, split)
            for i in range(count):
                box = _random_box(rng, region, min(height, width), cfg)
                splits[split].append(Item(key=f"{name}_{split}_{i:05d}", cls=cls, source=name, box=box))
    return list(DEMO_PHOTOGRAPHS), splits


def _demo_region(height: int, width: int, val_band: float, split: str) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the split's part of a photograph: val is the far band of the longer side."""
    if width >= height:
        cut = round(width * (1 - val_band))
        return (0, 0, height, cut) if split == "train" else (0, cut, height, width)
    cut = round(height * (1 - val_band))
    return (0, 0, cut, width) if split == "train" else (cut, 0, height, width)


def _random_box(rng: np.random.Generator, region, short_side: int, cfg: DataConfig) -> tuple[int, int, int]:
    top, left, bottom, right = region
    # Log-uniform crop size so that zoom levels are spread evenly by scale rather than by pixel count.
    fraction = math.exp(rng.uniform(math.log(cfg.demo_crop_min), math.log(cfg.demo_crop_max)))
    side = max(1, min(round(fraction * short_side), bottom - top, right - left))
    y = int(rng.integers(top, bottom - side + 1))
    x = int(rng.integers(left, right - side + 1))
    return (y, x, side)


def load_demo_item(item: Item, cfg: DataConfig) -> Loaded:
    photo = demo_photograph(item.source)
    y, x, side = item.box
    crop = photo[y : y + side, x : x + side]
    return Loaded(item, resize_square(crop, cfg.resolution), (side, side), highres_of(crop, cfg))


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder source


def image_folder_items(
    cfg: DataConfig,
) -> tuple[list[str], dict[str, list[Item]], list[Skipped]]:
    """Class names, the items of each split, and files skipped without reading (not an image extension)."""
    root = Path(cfg.source)
    classes, files, skipped = _scan_tree(root, label="data.source")
    present = {cls for _, cls in files}
    empty = [name for cls, name in enumerate(classes) if cls not in present]
    if empty:
        raise SourceError(
            f"data.source {root}: class folder(s) without an image file: {', '.join(empty)}. Every sub-folder is a "
            "class and would still take a class index: add images to it or remove it"
        )
    if cfg.val_source is None:
        train, val = _stratified_split(files, len(classes), cfg.val_fraction, cfg.seed)
        items = {"train": _to_items(train, root, prefix=""), "val": _to_items(val, root, prefix="")}
    else:
        val_root = Path(cfg.val_source)
        val_classes, val_files, val_skipped = _scan_tree(val_root, label="data.val_source")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise SourceError(f"data.val_source {val_root}: class folders not in data.source: {', '.join(unknown)}")
        # Class indices follow the train tree, so a val tree missing a class still labels the rest correctly.
        index = {name: i for i, name in enumerate(classes)}
        val_files = [(path, index[val_classes[c]]) for path, c in val_files]
        skipped += val_skipped
        items = {
            "train": _to_items(files, root, prefix=""),
            "val": _to_items(sorted(val_files), val_root, prefix="val-"),
        }
    return classes, items, skipped


def _scan_tree(root: Path, label: str) -> tuple[list[str], list[tuple[Path, int]], list[Skipped]]:
    if not root.exists():
        raise SourceError(f"{label}: {root} does not exist")
    if not root.is_dir():
        raise SourceError(f"{label}: {root} is not a directory (expected an ImageFolder tree: one folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"{label}: {root} has no class sub-folders (expected {root}/<class>/<image files>)")
    files: list[tuple[Path, int]] = []
    skipped: list[Skipped] = []
    for cls, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            rel = str(path.relative_to(root))
            if any(part.startswith(".") for part in Path(rel).parts):
                continue
            if path.is_symlink() and not path.exists():  # also a link in a loop
                reason = f"broken symbolic link (to {os.readlink(path)}, which cannot be reached)"
                skipped.append(Skipped(Item(key="", cls=cls, source=rel), reason))
            elif not path.is_file():
                continue
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((path, cls))
            else:
                skipped.append(
                    Skipped(Item(key="", cls=cls, source=rel), _NOT_READ.get(path.suffix.lower(), _NOT_READ[""]))
                )
    if not files:
        raise SourceError(f"{label}: {root} contains no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, files, skipped


def _stratified_split(files, num_classes: int, val_fraction: float, seed: int):
    train, val = [], []
    for cls in range(num_classes):
        members = [f for f in files if f[1] == cls]
        order = np.random.default_rng([seed, cls]).permutation(len(members))
        n_val = round(val_fraction * len(members))
        held_out = set(order[:n_val].tolist())
        for i, f in enumerate(members):
            (val if i in held_out else train).append(f)
    return train, val


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _to_items(files, root: Path, prefix: str) -> list[Item]:
    items = []
    for index, (path, cls) in enumerate(files):
        rel = str(path.relative_to(root))
        # WebDataset cuts the key at the first dot; the running index keeps sanitised keys unique.
        readable = _KEY_UNSAFE.sub("_", rel)[-80:]
        items.append(Item(key=f"{prefix}{index:08d}-{readable}", cls=cls, source=rel, path=path))
    return items


def load_file_item(item: Item, cfg: DataConfig) -> Loaded | Skipped:
    """Decode one file to RGB uint8, resize its shorter side to the resolution and centre-crop; or say why not."""
    try:
        data = item.path.read_bytes()
    except OSError as err:
        return Skipped(item, f"unreadable: {err.strerror or err}")
    if not data:
        return Skipped(item, "empty file (0 bytes)")
    size = _header_size(data)
    if size is not None and size[0] * size[1] > cfg.max_pixels:
        return Skipped(item, f"{size[1]}x{size[0]} = {size[0] * size[1]} pixels exceeds data.max_pixels")
    rgb = decode_rgb(data)
    if rgb is None:
        return Skipped(item, "not a decodable image (corrupt, truncated or not an image)")
    height, width = rgb.shape[:2]
    if height * width > cfg.max_pixels:
        return Skipped(item, f"{width}x{height} = {height * width} pixels exceeds data.max_pixels")
    if min(height, width) < cfg.min_side:
        return Skipped(item, f"{width}x{height} is smaller than data.min_side = {cfg.min_side}")
    return Loaded(item, resize_square(rgb, cfg.resolution), (height, width), highres_of(rgb, cfg))


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the header alone, so oversized images are refused before they are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        return height, width
    except Image.DecompressionBombError:
        return (1 << 31, 1)  # larger than any sensible max_pixels: Pillow refused to even read the header
    except Exception:  # not a format Pillow knows: OpenCV decides below
        return None


def decode_rgb(data: bytes) -> np.ndarray | None:
    """Bytes of any format OpenCV reads to an RGB uint8 array: grey, alpha, 16-bit, float and palette handled."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if data[:2] == b"\xff\xd8":
        # JPEG is 8-bit grey or colour; IMREAD_COLOR applies the EXIF orientation that UNCHANGED ignores.
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    else:
        image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        return None
    image = _to_uint8(image)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[..., 0], cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        # Composite on white: transparent regions of icons and cut-outs are meant to be background, not black.
        alpha = image[..., 3:4].astype(np.float32) / 255.0
        bgr = image[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        image = np.clip(np.rint(bgr), 0, 255).astype(np.uint8)
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return np.rint(image.astype(np.float32) / 257.0).astype(np.uint8)
    if image.dtype in (np.float32, np.float64):
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    info = np.iinfo(image.dtype)
    scaled = (image.astype(np.float64) - info.min) / (info.max - info.min)
    return np.rint(scaled * 255.0).astype(np.uint8)


def resize_square(rgb: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` (area averaging when shrinking) and centre-crop a square."""
    height, width = rgb.shape[:2]
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation) if scale != 1 else rgb
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    return np.ascontiguousarray(resized[top : top + resolution, left : left + resolution])
