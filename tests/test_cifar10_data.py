"""CIFAR-10 as a user gets it: the binary, python and ImageFolder archives (tiny ones made here), the downloader's
path, the `cifar10` source of the shard stage, and damaged, wrong or hostile archives (exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.data import cifar10
from pipeline.data.shards import decode_png
from stages.cli import app

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["airplane", "cat", "ship"]
PER_BATCH = 4
runner = CliRunner()


def _batches(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per batch: rgb_NHW3 uint8 and labels, cycling through the classes."""
    rng = np.random.default_rng(seed)
    out = {}
    for b, name in enumerate(cifar10.BATCHES):
        rgb = rng.integers(0, 256, (PER_BATCH, 32, 32, 3), dtype=np.uint8)
        out[name] = rgb, (np.arange(PER_BATCH) + b) % len(NAMES)
    return out


def _tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _planes(rgb: np.ndarray) -> np.ndarray:
    return rgb.transpose(0, 3, 1, 2).reshape(len(rgb), -1)  # CIFAR's rows: the R, G, B planes


def binary_archive(path: Path, batches=None) -> Path:
    batches = batches or _batches()
    members = {"cifar-10-batches-bin/batches.meta.txt": ("\n".join(NAMES) + "\n\n").encode()}
    for name, (rgb, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], _planes(rgb)], axis=1)
        members[f"cifar-10-batches-bin/{name}.bin"] = records.tobytes()
    return _tar(path, members)


def python_archive(path: Path, batches=None, extra: dict[str, bytes] | None = None) -> Path:
    """As CIFAR's own: protocol-2 pickles of dicts with bytes keys, the pixels a uint8 array, labels a list."""
    batches = batches or _batches()
    members = {"cifar-10-batches-py/batches.meta": pickle.dumps({b"label_names": [n.encode() for n in NAMES]}, 2)}
    for name, (rgb, labels) in batches.items():
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": _planes(rgb)}
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, 2)
    return _tar(path, members | (extra or {}))


def _py2_str(data: bytes) -> bytes:
    """A Python 2 ``str`` in a pickle (what CIFAR's own batches hold): SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data


def _py2_int(n: int) -> bytes:
    return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)


def _py2_pickle(value) -> bytes:
    """``value`` (dicts, lists, ints, bytes, uint8 arrays) pickled at protocol 2 as Python 2 and numpy 1 wrote
    CIFAR-10's batches: strings as BINSTRING, arrays through numpy.core.multiarray._reconstruct."""

    def dump(v) -> bytes:
        if isinstance(v, dict):
            return b"}(" + b"".join(dump(k) + dump(x) for k, x in v.items()) + b"u"
        if isinstance(v, list):
            return b"](" + b"".join(dump(x) for x in v) + b"e"
        if isinstance(v, int):
            return _py2_int(v)
        if isinstance(v, bytes):
            return _py2_str(v)
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8
        shape = b"(" + b"".join(_py2_int(d) for d in v.shape) + b"t"
        dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
        dtype += b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb"
        empty = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
        return empty + b"\x87R(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(v.tobytes()) + b"tb"

    return b"\x80\x02" + dump(value) + b"."


def python2_archive(path: Path, batches=None) -> Path:
    """CIFAR's python version byte for byte in kind: Python 2 pickles, as the downloaded file holds."""
    batches = batches or _batches()
    members = {"cifar-10-batches-py/batches.meta": _py2_pickle({b"label_names": [n.encode() for n in NAMES]})}
    for name, (rgb, labels) in batches.items():
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": _planes(rgb)}
        members[f"cifar-10-batches-py/{name}"] = _py2_pickle(batch)
    return _tar(path, members)


def imagefolder_archive(path: Path, with_test: bool = True) -> Path:
    from pipeline.data.shards import encode_png

    members = {}
    for split, count in {"train": 3, "test": 1 if with_test else 0}.items():
        for name in NAMES:
            for i in range(count):
                members[f"{split}/{name}/{i:04d}.png"] = encode_png(np.full((32, 32, 3), 40 * i, np.uint8))
    members["train/README.txt"] = b"not an image"
    return _tar(path, members)


def _tree_images(root: Path) -> dict[str, dict[str, int]]:
    return {
        split.name: {c.name: len(list(c.iterdir())) for c in sorted(split.iterdir())}
        for split in sorted(root.iterdir())
        if split.is_dir()
    }


@pytest.mark.parametrize("make", [binary_archive, python_archive, python2_archive])
def test_the_array_archives_become_imagefolder_trees_with_every_pixel_and_label(tmp_path, make):
    batches = _batches()
    manifest = cifar10.prepare(make(tmp_path / "c10.tar.gz", batches), tmp_path / "out")
    assert manifest["format"] == make.__name__.split("_")[0].rstrip("2")
    trains = [labels for name, (_, labels) in batches.items() if name != "test_batch"]
    expected = {n: int(sum((labels == i).sum() for labels in trains)) for i, n in enumerate(NAMES)}
    assert _tree_images(tmp_path / "out")["train"] == expected == manifest["splits"]["train"]
    assert sum(_tree_images(tmp_path / "out")["test"].values()) == PER_BATCH
    # The pixels survive exactly (PNG), in the class of their label.
    rgb, labels = batches["data_batch_2"]
    for i in range(PER_BATCH):
        image = decode_png((tmp_path / "out" / "train" / NAMES[labels[i]] / f"data_batch_2-{i:05d}.png").read_bytes())
        np.testing.assert_array_equal(image, rgb[i])


def test_an_imagefolder_archive_is_copied_as_it_is_with_or_without_a_test_split(tmp_path):
    archive = imagefolder_archive(tmp_path / "folder.tar.gz")
    manifest = cifar10.prepare(archive, tmp_path / "out")
    assert manifest["format"] == "imagefolder"
    assert _tree_images(tmp_path / "out") == {"train": dict.fromkeys(NAMES, 3), "test": dict.fromkeys(NAMES, 1)}
    with tarfile.open(archive) as tar:
        original = tar.extractfile("train/cat/0002.png").read()
    assert (tmp_path / "out" / "train" / "cat" / "0002.png").read_bytes() == original
    only_train = cifar10.prepare(imagefolder_archive(tmp_path / "t.tar.gz", with_test=False), tmp_path / "out2")
    assert list(only_train["splits"]) == ["train"]


def test_a_python_batch_naming_any_other_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    extra = {"cifar-10-batches-py/data_batch_3": pickle.dumps({b"data": Hostile(), b"labels": []}, 2)}
    archive = python_archive(tmp_path / "evil.tar.gz", extra=extra)
    with pytest.raises(cifar10.ArchiveError, match=r"data_batch_3.*refused to load the global io.open"):
        cifar10.prepare(archive, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_damaged_and_wrong_archives_exit_2_naming_the_archive_and_keep_the_previous_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = binary_archive(tmp_path / "good.tar.gz")
    assert runner.invoke(app, ["prepare-cifar10", "--archive", str(good), "--out", "out"]).exit_code == 0
    before = _tree_images(tmp_path / "out")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(data[: len(data) // 2])
    missing = _tar(tmp_path / "missing.tar.gz", {"cifar-10-batches-bin/data_batch_1.bin": bytes(3073)})
    wrong = _tar(tmp_path / "wrong.tar.gz", {"notes/readme.txt": b"hello"})
    ragged = _tar(tmp_path / "ragged.tar", {"b/data_batch_1.bin": bytes(3000)}, mode="w")
    not_tar = tmp_path / "photo.tar.gz"
    not_tar.write_bytes(b"\x89PNG not a tar")
    cases = {
        truncated: "damaged",
        missing: "missing",
        wrong: "no CIFAR-10 found",
        ragged: "not a whole number",
        not_tar: "damaged or not a tar",
        tmp_path / "absent.tar.gz": "no such file",
    }
    for archive, why in cases.items():
        result = runner.invoke(app, ["prepare-cifar10", "--archive", str(archive), "--out", "out"])
        assert result.exit_code == 2, (archive, result.output)
        assert archive.name in result.output and why in result.output, result.output
        assert _tree_images(tmp_path / "out") == before  # the finished tree is untouched
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary left


def test_the_downloader_path_reads_the_downloaded_archive_like_any_other(tmp_path, monkeypatch):
    """torchvision's download_url stands in here for the network: it 'downloads' a tiny python archive."""
    import torchvision.datasets
    import torchvision.datasets.utils as utils

    source = python_archive(tmp_path / "served.tar.gz")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    fetched = []

    def fake_download(url, root, filename, md5_expected, *args, **kwargs):
        fetched.append(url)
        assert md5_expected == md5
        (Path(root) / filename).parent.mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(source.read_bytes())

    monkeypatch.setattr(utils, "download_url", fake_download)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", md5)
    manifest = cifar10.ensure(None, tmp_path / "tree", tmp_path / "downloads")
    assert fetched == [torchvision.datasets.CIFAR10.url]
    assert manifest["format"] == "python" and Path(manifest["archive"]).name == "cifar-10-python.tar.gz"
    # A second call finds the tree made from that very file and does not unpack it again.
    stamp = (tmp_path / "tree" / cifar10.MANIFEST).stat().st_mtime_ns
    assert cifar10.ensure(tmp_path / "downloads" / "cifar-10-python.tar.gz", tmp_path / "tree", tmp_path) == manifest
    assert (tmp_path / "tree" / cifar10.MANIFEST).stat().st_mtime_ns == stamp


def test_the_shard_stage_with_source_cifar10_unpacks_the_archive_beside_its_shards(tmp_path, monkeypatch):
    values = yaml.safe_load((ROOT / "params/cifar10.yaml").read_text())
    values["data"] |= {"archive": str(binary_archive(tmp_path / "c10.tar.gz")), "workers": 1, "val_fraction": 0.25}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["shard", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data/shards/manifest.json").read_text())
    assert manifest["classes"] == NAMES
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 5 * PER_BATCH
    assert (tmp_path / "data/cifar10/test").is_dir()
    # A wrong archive named in the params stops the stage with exit 2.
    values["data"]["archive"] = str(_tar(tmp_path / "wrong.tar.gz", {"x.txt": b"x"}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    result = runner.invoke(app, ["shard", "--params", "params.yaml"])
    assert result.exit_code == 2 and "wrong.tar.gz" in result.output


def test_prepare_takes_the_archive_from_the_params_file_the_shard_stage_reads(tmp_path, monkeypatch):
    values = yaml.safe_load((ROOT / "params/cifar10.yaml").read_text())
    values["data"]["archive"] = str(python_archive(tmp_path / "c10.tar.gz"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["prepare-cifar10", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "data/cifar10" / cifar10.MANIFEST).read_text())["format"] == "python"
