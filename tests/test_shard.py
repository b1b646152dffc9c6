"""The shard stage: real images in, reproducible WebDataset shards and an honest manifest out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data import ingest, shards
from pipeline.data.sources import DataConfig, SourceError, decode_rgb, demo_items

SMALL_DEMO = DataConfig(demo_train_per_class=6, demo_val_per_class=3, workers=1, shard_size=10)


def tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def samples_of(split_dir: Path) -> list[dict]:
    return [shards.decode_sample(raw) for raw in shards.read_samples(shards.list_shards(split_dir))]


def test_demo_writes_shards_and_manifest(tmp_path):
    manifest = ingest.build_shards(SMALL_DEMO, tmp_path / "shards")
    train, val = samples_of(tmp_path / "shards" / "train"), samples_of(tmp_path / "shards" / "val")
    assert len(train) == 8 * 6 and len(val) == 8 * 3
    assert manifest["splits"]["train"]["count"] == 48 and manifest["splits"]["val"]["count"] == 24
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text()) == manifest
    assert manifest["splits"]["train"]["shards"] == 5  # 48 samples at most 10 a shard
    for sample in train + val:
        assert sample["png"].shape == (32, 32, 3) and sample["png"].dtype == np.uint8
        assert "." not in sample["__key__"]
        assert set(sample) - {"hr.png"} == {"__key__", "png", "cls", "json"}
        assert sample["json"]["source"] == manifest["classes"][sample["cls"]]


def test_the_2x_reference_is_the_same_region_at_twice_the_pixels_never_upsampled(tmp_path):
    from pipeline.data.sources import demo_photograph

    manifest = ingest.build_shards(SMALL_DEMO, tmp_path / "shards")
    samples = samples_of(tmp_path / "shards" / "train") + samples_of(tmp_path / "shards" / "val")
    with_hr = [s for s in samples if "hr.png" in s]
    assert manifest["highres_scale"] == 2
    assert manifest["splits"]["train"]["highres_count"] + manifest["splits"]["val"]["highres_count"] == len(with_hr)
    assert 0 < len(with_hr) < len(samples)  # crops under 64 px of their photograph have none
    for sample in samples:
        y, x, side = sample["json"]["crop_box"]
        assert ("hr.png" in sample) == (side >= 64)
        if "hr.png" in sample:
            hr = sample["hr.png"]
            assert hr.shape == (64, 64, 3)
            # Area-averaging 2×2 blocks of the 2× image gives (nearly) the 1× image: the same pixels, twice the
            # detail; and it is the photograph's own crop, not an upsampling of the 32 px image.
            down = hr.reshape(32, 2, 32, 2, 3).mean((1, 3))
            assert np.abs(down - sample["png"].astype(float)).mean() < 3
            crop = demo_photograph(sample["json"]["source"])[y : y + side, x : x + side]
            assert np.abs(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA).astype(float) - hr).mean() < 1


def test_files_get_a_2x_reference_when_their_shorter_side_allows(salted_tree, tmp_path):
    cfg = DataConfig(source=str(salted_tree["root"]), resolution=16, val_fraction=0.0, workers=1)
    manifest = ingest.build_shards(cfg, tmp_path / "shards")
    samples = samples_of(tmp_path / "shards" / "train")
    sides = {s["json"]["source"]: min(s["json"]["original_size"]) for s in samples}
    assert {s["json"]["source"] for s in samples if "hr.png" in s} == {k for k, v in sides.items() if v >= 32}
    assert manifest["splits"]["train"]["highres_count"] == sum(v >= 32 for v in sides.values())
    none = ingest.build_shards(DataConfig(**{**cfg.__dict__, "highres_scale": 0}), tmp_path / "plain")
    assert none["highres_scale"] == 0 and not any("hr.png" in s for s in samples_of(tmp_path / "plain" / "train"))


def test_demo_crops_are_not_all_at_one_zoom():
    _, items = demo_items(DataConfig(demo_train_per_class=50))
    sides = {item.box[2] for item in items["train"] if item.source == "astronaut"}
    assert max(sides) > 2 * min(sides)


def test_no_demo_val_crop_overlaps_a_train_crop():
    _, items = demo_items(DataConfig(demo_train_per_class=200, demo_val_per_class=50))

    def overlap(a, b):
        (ya, xa, sa), (yb, xb, sb) = a, b
        return ya < yb + sb and yb < ya + sa and xa < xb + sb and xb < xa + sa

    for photo in {item.source for item in items["train"]}:
        train = [i.box for i in items["train"] if i.source == photo]
        val = [i.box for i in items["val"] if i.source == photo]
        assert not any(overlap(t, v) for t in train for v in val), photo


def test_same_input_and_params_give_byte_identical_shards(tmp_path, salted_tree):
    cfg = dataclasses.replace(SMALL_DEMO, source=str(salted_tree["root"]), resolution=16, val_fraction=0.25)
    ingest.build_shards(cfg, tmp_path / "a")
    ingest.build_shards(dataclasses.replace(cfg, workers=2), tmp_path / "b")
    ingest.build_shards(SMALL_DEMO, tmp_path / "c")
    ingest.build_shards(SMALL_DEMO, tmp_path / "d")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")  # also independent of the worker count
    assert tree_digest(tmp_path / "c") == tree_digest(tmp_path / "d")


def test_salted_tree_keeps_every_good_image_and_reports_each_bad_one(tmp_path, salted_tree):
    root = salted_tree["root"]
    cfg = dataclasses.replace(SMALL_DEMO, source=str(root), resolution=24, val_fraction=0.2)
    manifest = ingest.build_shards(cfg, tmp_path / "shards")
    written = samples_of(tmp_path / "shards" / "train") + samples_of(tmp_path / "shards" / "val")
    sources = sorted(s["json"]["source"] for s in written)
    assert sources == sorted(str(p.relative_to(root)) for p in salted_tree["good"])
    reasons = {r["source"]: r["reason"] for r in manifest["skipped"]}
    assert set(reasons) == {str(p.relative_to(root)) for p in salted_tree["bad"] + salted_tree["not_images"]}
    assert "pixels exceeds data.max_pixels" in reasons["cat/bomb.png"]
    assert "empty" in reasons["dog/empty.png"]
    assert "not a decodable image" in reasons["cat/truncated.jpg"]
    assert "not a decodable image" in reasons["eel/notes.jpg"]
    assert "min_side" in reasons["dog/tiny.png"]
    assert manifest["kept"] == len(salted_tree["good"]) and manifest["skipped_count"] == 6
    assert manifest["classes"] == salted_tree["classes"]
    for sample in written:
        assert sample["png"].shape == (24, 24, 3)
        assert sample["cls"] == salted_tree["classes"].index(sample["json"]["source"].split("/")[0])


def test_odd_formats_are_converted_to_rgb(salted_tree):
    root = salted_tree["root"]
    gray = decode_rgb((root / "cat" / "gray.png").read_bytes())
    assert gray.shape == (48, 48, 3) and (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    sixteen = decode_rgb((root / "eel" / "sixteen.png").read_bytes())
    assert sixteen.dtype == np.uint8 and sixteen.shape == (36, 36, 3) and sixteen.max() > 128
    rgba = decode_rgb((root / "dog" / "alpha.png").read_bytes())
    assert rgba.shape == (40, 40, 3) and rgba.min() >= 127  # half-transparent over white
    palette = decode_rgb((root / "eel" / "pal.png").read_bytes())
    assert palette.shape == (33, 45, 3) and palette.std() > 0


def test_val_split_is_stratified_and_deterministic(tmp_path, salted_tree):
    cfg = dataclasses.replace(SMALL_DEMO, source=str(salted_tree["root"]), resolution=16, val_fraction=0.34, seed=3)
    first = ingest.build_shards(cfg, tmp_path / "a")
    again = ingest.build_shards(cfg, tmp_path / "b")
    ingest.build_shards(dataclasses.replace(cfg, seed=4), tmp_path / "c")
    assert first == again
    val_a = {s["json"]["source"] for s in samples_of(tmp_path / "a" / "val")}
    val_c = {s["json"]["source"] for s in samples_of(tmp_path / "c" / "val")}
    assert val_a != val_c
    # Every class has files in val: the split is drawn per class, not over the pool.
    assert all(n > 0 for n in first["splits"]["val"]["per_class"].values())


def test_separate_val_folder_is_used_whole(tmp_path, salted_tree):
    from tests.conftest import smooth_rgb, write_rgb

    val_root = tmp_path / "val"
    rng = np.random.default_rng(1)
    for cls in ("dog", "eel"):
        write_rgb(val_root / cls / "v.png", smooth_rgb(rng, 30, 30))
    cfg = dataclasses.replace(SMALL_DEMO, source=str(salted_tree["root"]), val_source=str(val_root), resolution=16)
    manifest = ingest.build_shards(cfg, tmp_path / "shards")
    val = samples_of(tmp_path / "shards" / "val")
    assert sorted(s["cls"] for s in val) == [1, 2]  # class indices of the train tree
    assert manifest["splits"]["train"]["count"] == len(salted_tree["good"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class sub-folders"),
        (lambda root: (root / "a").mkdir(parents=True), "contains no image files"),
        (lambda root: ((root / "a").mkdir(parents=True), (root / "a" / "x.png").write_bytes(b"")), "no usable image"),
    ],
)
def test_unusable_source_stops_with_a_clear_message(tmp_path, make, message):
    root = tmp_path / "source"
    make(root)
    with pytest.raises(SourceError, match=message):
        ingest.build_shards(dataclasses.replace(SMALL_DEMO, source=str(root)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_previous_shards_intact(tmp_path, monkeypatch):
    out = tmp_path / "shards"
    ingest.build_shards(SMALL_DEMO, out)
    before = tree_digest(out)
    calls = {"n": 0}
    real = ingest._load_and_encode

    def dies_midway(item, cfg):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real(item, cfg)

    monkeypatch.setattr(ingest, "_load_and_encode", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ingest.build_shards(dataclasses.replace(SMALL_DEMO, seed=9), out)
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # no temporary directory left behind


def test_a_broken_symlink_and_a_gif_are_reported_in_the_manifest(tmp_path, salted_tree):
    from PIL import Image

    root = salted_tree["root"]
    (root / "cat" / "moved.jpg").symlink_to(root / "cat" / "no-longer-here.jpg")
    frames = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue")]
    frames[0].save(root / "dog" / "blink.gif", save_all=True, append_images=frames[1:], duration=100)
    cfg = dataclasses.replace(SMALL_DEMO, source=str(root), resolution=16)
    manifest = ingest.build_shards(cfg, tmp_path / "shards")
    reasons = {r["source"]: r["reason"] for r in manifest["skipped"]}
    assert reasons["cat/moved.jpg"].startswith("broken symbolic link")
    assert reasons["dog/blink.gif"].startswith("GIF is not read")
    assert manifest["kept"] == len(salted_tree["good"])


@pytest.mark.parametrize(
    ("fill", "message"),
    [
        (lambda folder: None, "class folder(s) without an image file: fox"),
        (lambda folder: (folder / "notes.txt").write_text("to do\n"), "class folder(s) without an image file: fox"),
        (lambda folder: (folder / "x.png").write_bytes(b"not a png"), "no usable train image in class folder(s) fox"),
    ],
    ids=["empty", "no image file", "no readable image"],
)
def test_a_class_folder_without_usable_images_stops_the_stage_naming_it(tmp_path, salted_tree, fill, message):
    # Kept, it would still take a class index: every later class and the model's class count would shift.
    (salted_tree["root"] / "fox").mkdir()
    fill(salted_tree["root"] / "fox")
    cfg = dataclasses.replace(SMALL_DEMO, source=str(salted_tree["root"]), resolution=16)
    with pytest.raises(SourceError, match=re.escape(message)):
        ingest.build_shards(cfg, tmp_path / "shards")
    assert not (tmp_path / "shards").exists()
