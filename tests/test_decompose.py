"""The Ambrosio–Tortorelli decomposition (paper eq. 8): what it computes, how exactly, and how it fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, build
from pipeline.data.decompose import (
    DecomposeConfig,
    DecompositionError,
    at_energy,
    decompose,
    details,
    solve_at,
    solve_at_scipy,
)
from pipeline.data.sources import demo_photograph, resize_square
from pipeline.evaluation.figures import decomposition_figure

PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket")


def photograph_crops(size: int, names=PHOTOGRAPHS) -> torch.Tensor:
    """Crops of real photographs (a quarter of the shorter side) downsampled to size × size, as the demo does."""
    crops = []
    for name in names:
        photo = demo_photograph(name)
        side = min(photo.shape[:2]) // 4
        top, left = photo.shape[0] // 3, photo.shape[1] // 3
        crops.append(resize_square(photo[top : top + side, left : left + side], size))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255


def config(**overrides) -> DecomposeConfig:
    return DecomposeConfig(**{"device": "cpu", **overrides})


def test_the_base_plus_the_details_is_the_image():
    images = photograph_crops(24)
    decomposition = decompose(images, config(order=3, batch_size=3))
    layers = details(images, decomposition.bases_NKCHW)
    assert decomposition.bases_NKCHW.shape == (4, 3, 3, 24, 24)
    assert decomposition.edges_NKHW.shape == (4, 3, 24, 24)
    assert layers.shape == (4, 3, 3, 24, 24)
    assert (decomposition.bases_NKCHW[:, -1] + layers.sum(1) - images).abs().max() < 1e-6
    assert (layers[:, 0].flatten(1).std(1) > 0.005).all(), "the first detail layer should carry texture"


def test_order_zero_holds_no_bases():
    images = photograph_crops(16)
    decomposition = decompose(images, config(order=0))
    assert decomposition.bases_NKCHW.shape == (4, 0, 3, 16, 16)
    assert decomposition.edges_NKHW.shape == (4, 0, 16, 16)
    assert details(images, decomposition.bases_NKCHW).shape == (4, 0, 3, 16, 16)


@pytest.mark.parametrize(
    "inner",
    [{}, {"cg_tol": 0.1, "outer_tol": 0.0, "outer_iterations": 10}],
    ids=["default-tolerance", "very-loose-cg-tolerance"],
)
def test_energy_never_increases_on_real_photographs(inner):
    images = photograph_crops(32)
    result = solve_at(images, config(**inner), track_energy=True)
    history = result.energy_history_NT
    assert history.shape == (4, 1 + 2 * int(result.outer_iterations_N.max()))
    # Each half-step is a CG solve of the exact quadratic in one variable, warm-started: it cannot go uphill.
    # Tolerance: rounding of the energy's float32 terms.
    assert (history[:, 1:] <= history[:, :-1] * (1 + 1e-9)).all()
    assert (history[:, -1] < 0.5 * history[:, 0]).all()
    assert torch.allclose(result.energy_N, at_energy(images, result.u_NCHW, result.s_NHW, config(**inner)))


def test_converged_solution_matches_the_sparse_direct_reference():
    tight = config(cg_tol=1e-6, outer_tol=1e-6, outer_iterations=100)
    images = photograph_crops(12, names=("astronaut", "coffee"))
    result = solve_at(images, tight)
    assert result.converged_N.all()
    for image, u, s in zip(images, result.u_NCHW, result.s_NHW, strict=True):
        u_ref, s_ref = solve_at_scipy(image.numpy(), tight)
        assert np.abs(u.numpy() - u_ref).max() < 1e-4
        assert np.abs(s.numpy() - s_ref).max() < 1e-4


def test_a_flat_image_stays_flat():
    flat = torch.full((1, 3, 16, 16), 0.3)
    result = solve_at(flat, config())
    assert torch.equal(result.u_NCHW, flat)
    assert torch.equal(result.s_NHW, torch.zeros(1, 16, 16))
    assert result.outer_iterations_N.item() == 1 and result.converged_N.item()


def test_a_sharp_edge_is_kept_while_noise_is_smoothed_away():
    clean = torch.full((1, 3, 32, 32), 0.2)
    clean[..., 16:] = 0.8
    noisy = clean + 0.02 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    result = solve_at(noisy, config())
    u, s = result.u_NCHW, result.s_NHW[0]
    # Column 15's forward difference spans the jump: that is where the edge field lives.
    assert s[:, 15].min() > 0.9
    assert s[:, :14].max() < 0.05 and s[:, 17:].max() < 0.05
    for flat in (slice(2, 13), slice(19, 30)):  # away from the edge
        assert (u - clean)[..., flat].std() < (noisy - clean)[..., flat].std() / 5
        assert (u - clean)[..., flat].mean().abs() < 0.005


def test_a_batch_gives_the_same_result_as_each_image_alone():
    images = photograph_crops(32)
    batch = solve_at(images, config())
    for i, image in enumerate(images):
        alone = solve_at(image[None], config())
        assert torch.allclose(batch.u_NCHW[i], alone.u_NCHW[0], atol=1e-5)
        assert torch.allclose(batch.s_NHW[i], alone.s_NHW[0], atol=1e-5)
        assert batch.outer_iterations_N[i] == alone.outer_iterations_N[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_and_cuda_agree(compiled):
    # Converged tightly, both land on the same minimiser whatever their float32 reduction order.
    tight = {"order": 2, "cg_tol": 1e-6, "outer_tol": 1e-6, "outer_iterations": 100}
    images = photograph_crops(32)
    on_cpu = decompose(images, config(**tight))
    on_cuda = decompose(images.cuda(), config(**tight, device="cuda", compile=compiled))
    assert on_cuda.bases_NKCHW.is_cuda
    assert torch.allclose(on_cpu.bases_NKCHW, on_cuda.bases_NKCHW.cpu(), atol=1e-4)
    assert torch.allclose(on_cpu.edges_NKHW, on_cuda.edges_NKHW.cpu(), atol=1e-4)


def test_non_finite_inputs_are_refused_by_index():
    images = photograph_crops(16)
    images[1, 0, 3, 3] = float("nan")
    images[3, 2, 0, 0] = float("inf")
    for run in (lambda: solve_at(images, config()), lambda: decompose(images, config(batch_size=2))):
        with pytest.raises(DecompositionError, match="NaN or Inf") as caught:
            run()
        assert caught.value.indices == [1, 3]


def test_a_solve_that_overflows_float32_is_reported_by_index():
    # Finite but absurd intensities: |∇u|² overflows float32, so the solve turns to Inf/NaN for that image only.
    images = photograph_crops(16)
    images[2] *= 1e30
    with pytest.raises(DecompositionError, match="non-finite") as caught:
        solve_at(images, config())
    assert caught.value.indices == [2]
    with pytest.raises(DecompositionError) as caught:
        decompose(images, config(batch_size=3))
    assert caught.value.indices == [2]


def test_an_absurd_intensity_scale_breaks_every_image_and_says_so():
    with pytest.raises(DecompositionError) as caught:
        solve_at(photograph_crops(16), config(intensity_scale=1e25))
    assert caught.value.indices == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"order": 9}, "decompose.order = 9: Input should be less than or equal to 8"),
        ({"epsilon": 0.0}, "decompose.epsilon = 0.0: Input should be greater than 0"),
        ({"alpha": "10"}, "decompose.alpha = '10'"),
        ({"device": "gpu"}, "decompose.device = 'gpu'"),
        ({"preview_count": -1}, "decompose.preview_count = -1"),
        ({"cg_tol": 1e-2}, "cg_tol = 0.01 must not exceed outer_tol = 0.0001"),
        ({"smoothness": 1}, "decompose.smoothness: unknown key"),
    ],
)
def test_out_of_range_parameters_are_config_errors(values, expected):
    with pytest.raises(ConfigError) as caught:
        build(DecomposeConfig, values, source="params.yaml", prefix="decompose")
    assert expected in str(caught.value)


def test_every_parameter_is_documented_and_the_defaults_are_valid():
    assert build(DecomposeConfig, {}, source="params.yaml", prefix="decompose") == DecomposeConfig()
    assert all(info.description for info in DecomposeConfig.__pydantic_fields__.values())


def test_decomposition_figure_writes_a_png(tmp_path):
    images = photograph_crops(16, names=("coffee",))
    decomposition = decompose(images, config(order=2))
    path = tmp_path / "figure3.png"
    decomposition_figure(images[0], decomposition.bases_NKCHW[0], decomposition.edges_NKHW[0], path, title="coffee")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["figure3.png"]
