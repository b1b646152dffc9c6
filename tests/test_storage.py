"""Compact storage of the decomposed bases: float16, lossless, well under half the raw size on real images."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import decomposed, shards
from pipeline.data.decompose import DecomposeConfig, decompose
from tests.test_decompose import photograph_crops


def every_float16() -> np.ndarray:
    """All 65 536 float16 bit patterns (NaNs, infinities, subnormals, −0 included), shuffled into an image stack."""
    bits = np.random.default_rng(0).permutation(np.arange(2**16, dtype=np.uint32)).astype(np.uint16)
    return bits.view(np.float16).reshape(4, 4, 64, 64)


@pytest.mark.parametrize(
    "array",
    [every_float16(), every_float16()[0, 0, 0], np.zeros((0, 3, 16, 16), np.float16), np.float16(0.5).reshape(())],
    ids=["every-bit-pattern", "one-row", "order-0-empty", "scalar"],
)
def test_every_float16_bit_pattern_reads_back_exactly(array):
    back = shards.decode_npy_f16z(shards.encode_npy_f16z(array))
    assert back.dtype == np.float16 and back.shape == array.shape
    assert np.array_equal(back.view(np.uint16), array.view(np.uint16))


def test_bases_of_real_photographs_take_at_most_40_percent_of_raw_float16_and_read_back_bit_exact():
    images = photograph_crops(64)
    bases_NKCHW = decompose(images, DecomposeConfig(order=3, device="cpu", outer_tol=1e-3, cg_tol=1e-4)).bases_NKCHW
    raw = stored = 0
    for bases in bases_NKCHW.numpy().astype(np.float16):
        data = shards.encode_npy_f16z(bases)
        assert np.array_equal(shards.decode_npy_f16z(data).view(np.uint16), bases.view(np.uint16))
        raw, stored = raw + bases.nbytes, stored + len(data)
    assert stored <= 0.40 * raw, f"{stored / raw:.1%} of the raw float16 size"


def test_the_stage_stores_compressed_bases_and_the_loader_reads_them_as_it_read_raw_npy(workspace):
    raw = next(iter(shards.read_samples(decomposed.split_shards(workspace / "data" / "decomposed" / "val"))))
    assert "bases.f16z" in raw and "bases.npy" not in raw
    bases = shards.decode_npy_f16z(raw["bases.f16z"])
    older = {k: v for k, v in raw.items() if k != "bases.f16z"} | {"bases.npy": shards.encode_npy(bases)}
    image, bases_K3HW, cls = decomposed.decode_training_sample(raw)
    image_old, bases_old, cls_old = decomposed.decode_training_sample(older)
    assert (image == image_old).all() and (bases_K3HW == bases_old).all() and cls == cls_old
    assert shards.decode_sample(raw)["bases.f16z"].dtype == np.float16


@pytest.mark.parametrize("damage", ["payload", "header", "cut"])
def test_damaged_bases_are_a_shard_error_naming_the_sample(damage):
    data = bytearray(shards.encode_npy_f16z(every_float16()[:1]))
    if damage == "payload":
        data[20:40] = bytes(20)
    elif damage == "header":
        data[:4] = b"NOPE"
    else:
        data = data[: len(data) // 2]
    raw = {"__key__": "k1", "__url__": "shard-000000.tar", "bases.f16z": bytes(data)}
    with pytest.raises(shards.ShardError, match="shard-000000.tar: sample k1"):
        shards.decoded(raw, decomposed.decode_bases)
