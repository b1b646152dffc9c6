"""Base–detail decomposition by the Ambrosio–Tortorelli energy (CART paper, eq. 8).

Every image is split recursively, ``I = B_n + D_n + … + D_1`` with ``B_0 = I``, ``B_k = AT(B_{k-1})`` and
``D_k = B_{k-1} - B_k``, where ``AT(f)`` is the ``u`` that minimises

    E(u, s) = Σ |u - f|² + α Σ (1 - s)² |∇u|² + λ Σ ( ε |∇s|² + s² / (4ε) )

with one edge field ``s`` (≈ 1 on edges, ≈ 0 in flat regions) shared by the colour channels.

Discretisation. ``D`` is the forward difference with zero difference across the last row and column (Neumann),
divided by the pixel spacing ``h``; ``|∇u|²_p = Σ_c (Dx u)²_pc + (Dy u)²_pc`` lives on pixel ``p``, and so does
the weight ``(1 - s_p)²`` that multiplies it. Setting the gradient of E to zero in ``u`` and in ``s`` gives

    u-step:  (I + α Dᵀ W D) u = f                          W = diag((1 - s)²), one system per channel
    s-step:  (diag(α g + λ/(4ε)) + λε DᵀD) s = α g         g = |∇u|²

Both matrices are SPD and are exactly (half) the Hessians of E in ``u`` and in ``s``, so each half-step is the
exact minimiser of E over one variable. CG iterates started from the previous iterate never increase a convex
quadratic, hence E never increases over (half-)iterations even with a loose inner tolerance.

``solve_at`` runs this alternation batched in torch (the same code on CPU and CUDA): Jacobi-preconditioned CG
per system, warm-started, with per-image convergence. Jacobi suffices: the u-matrix has condition number at most
1 + 8α/h² (81 at the defaults), and with ε << h the s-matrix is nearly diagonal (one or two iterations).
``solve_at_scipy`` is the reference: the same alternation with every half-step solved by a sparse direct
factorisation, written in matrix form.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.config import Field, section
from pipeline.progress import Progress, Silent
from pipeline.runtime import resolve_device


@section
class DecomposeConfig:
    order: int = Field(
        3, ge=0, le=8, description="Decomposition levels n (bases B_1..B_n). 0 = no decomposition (VAR baseline)."
    )
    alpha: float = Field(10.0, gt=0.0, description="α of eq. 8: weight of the edge-gated smoothness term.")
    lam: float = Field(0.01, gt=0.0, description="λ of eq. 8: weight of the edge-field (length) term.")
    epsilon: float = Field(
        0.01,
        gt=0.0,
        description="ε of eq. 8, in pixel units of intensity_scale-scaled images. With ε << pixel_spacing, s is "
        "pixel-sharp and gradients above sqrt(λ / (4 α ε)) are kept as edges (0.16 at the defaults).",
    )
    intensity_scale: float = Field(
        1.0, gt=0.0, description="Images in [0, 1] are multiplied by this before solving and divided after."
    )
    pixel_spacing: float = Field(1.0, gt=0.0, description="h: the grid spacing of the finite differences.")
    outer_iterations: int = Field(50, ge=1, description="Maximum alternations (s-step, then u-step) per level.")
    outer_tol: float = Field(
        1e-4,
        ge=0.0,
        lt=1.0,
        description="An image has converged when one alternation lowers its energy by less than this fraction.",
    )
    cg_max_iterations: int = Field(200, ge=1, description="Maximum conjugate-gradient iterations per half-step.")
    cg_tol: float = Field(
        3e-6,
        ge=1e-6,
        lt=1.0,
        description="CG stops when |residual| <= cg_tol * |right-hand side|, per system (float32 resolves no "
        "less). 3e-6 keeps every base within 3e-4 of the float64 direct solve (256 px photographs, order 3).",
    )
    batch_size: int = Field(64, ge=1, description="Images solved together (one batched solve).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to solve: auto = CUDA if visible.")
    compile: bool = Field(
        False,
        description="torch.compile the CG iteration: fuses its elementwise work (speed: bench/RESULTS.md, decompose). "
        "Costs seconds of compilation per process and needs a C++ compiler (CPU) or Triton (CUDA).",
    )
    preview_count: int = Field(8, ge=0, description="Val images that get a Figure-3 style decomposition figure.")

    def __post_init__(self):
        # Half-steps solved more loosely than the outer test resolves barely lower E, so the alternation would
        # stop early and far from the minimum (seen on photographs with cg_tol = 10 * outer_tol).
        if self.outer_tol > 0 and self.cg_tol > self.outer_tol:
            raise ValueError(
                f"cg_tol = {self.cg_tol} must not exceed outer_tol = {self.outer_tol}: inexact half-steps would "
                "end the alternation early"
            )


class DecompositionError(ValueError):
    """Some images of a batch could not be decomposed; ``indices`` are their positions within the batch."""

    def __init__(self, indices: list[int], reason: str):
        self.indices = indices
        super().__init__(f"images {indices}: {reason}")


# ---------------------------------------------------------------------------------------------------------------
# Discrete operators and the energy


def grad_sq(x_NCHW: torch.Tensor, spacing: float) -> torch.Tensor:
    """|∇x|² on pixels, summed over channels: forward differences, zero across the last row and column."""
    g_NHW = x_NCHW.new_zeros(x_NCHW.shape[:1] + x_NCHW.shape[2:])
    g_NHW[:, :, :-1] += (x_NCHW[..., :, 1:] - x_NCHW[..., :, :-1]).square().sum(1)
    g_NHW[:, :-1, :] += (x_NCHW[..., 1:, :] - x_NCHW[..., :-1, :]).square().sum(1)
    return g_NHW / spacing**2


def _apply(x: torch.Tensor, diag: torch.Tensor | float, ax: torch.Tensor, ay: torch.Tensor) -> torch.Tensor:
    """A x = diag·x + Dᵀ diag(a) D x, with ``ax``/``ay`` the weights of the pixel pairs (p, p+x) and (p, p+y).

    ``a·Dx`` is the flux across each pair; ``Dᵀ`` of a flux is (flux in) - (flux out), zero beyond the border.
    """
    flux_x = torch.nn.functional.pad(ax * (x[..., :, 1:] - x[..., :, :-1]), (1, 1))
    flux_y = torch.nn.functional.pad(ay * (x[..., 1:, :] - x[..., :-1, :]), (0, 0, 1, 1))
    return diag * x + (flux_x[..., :, :-1] - flux_x[..., :, 1:]) + (flux_y[..., :-1, :] - flux_y[..., 1:, :])


def _diagonal(diag: torch.Tensor | float, ax: torch.Tensor, ay: torch.Tensor) -> torch.Tensor:
    """The diagonal of A: each pixel collects the weights of the (up to four) pairs it belongs to."""
    pad = torch.nn.functional.pad
    return diag + pad(ax, (1, 0)) + pad(ax, (0, 1)) + pad(ay, (0, 0, 1, 0)) + pad(ay, (0, 0, 0, 1))


def at_energy(f_NCHW: torch.Tensor, u_NCHW: torch.Tensor, s_NHW: torch.Tensor, cfg: DecomposeConfig) -> torch.Tensor:
    """E(u, s) of eq. 8 per image (float64), for f and u in [0, 1] intensities (scaled here as in the solver)."""
    f, u = f_NCHW * cfg.intensity_scale, u_NCHW * cfg.intensity_scale
    return _energy(f, u, s_NHW, grad_sq(u, cfg.pixel_spacing), cfg)


def _energy(f_NCHW, u_NCHW, s_NHW, g_NHW, cfg: DecomposeConfig) -> torch.Tensor:
    """E given g = |∇u|² (the solver has it anyway). Terms in float32, summed in float64."""

    def total(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1, dtype=torch.float64)

    fidelity = total((u_NCHW - f_NCHW).square())
    smoothness = total((1 - s_NHW).square() * g_NHW)
    edges = total(cfg.epsilon * grad_sq(s_NHW[:, None], cfg.pixel_spacing) + s_NHW.square() / (4 * cfg.epsilon))
    return fidelity + cfg.alpha * smoothness + cfg.lam * edges


# ---------------------------------------------------------------------------------------------------------------
# Jacobi-preconditioned conjugate gradients, one system per leading index (N, C), all in lockstep


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((-2, -1), keepdim=True)


def _pcg_step(x, r, p, rz, active, diag, ax, ay, inv_m, stop_sq):
    """One PCG iteration; systems that are no longer active take a zero step, so they stop changing."""
    Ap = _apply(p, diag, ax, ay)
    step = torch.where(active, rz / _dot(p, Ap), 0.0)
    x = torch.addcmul(x, step, p)  # x + step·p
    r = torch.addcmul(r, step, Ap, value=-1.0)
    active = active & (_dot(r, r) > stop_sq)
    z = r * inv_m
    rz_next = _dot(r, z)
    p = torch.addcmul(z, torch.where(active, rz_next / rz, 0.0), p)
    return x, r, p, rz_next, active


@functools.cache
def _compiled_pcg_step() -> Callable:
    # The batch shrinks as images converge: one graph with a dynamic batch size instead of one per size.
    return torch.compile(_pcg_step, dynamic=True)


def _pcg(x, b, diag, ax, ay, cfg: DecomposeConfig, step: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve A x = b from the warm start x; returns x and the iterations each system took (its (N, C) shape)."""
    inv_m = 1.0 / _diagonal(diag, ax, ay)
    r = b - _apply(x, diag, ax, ay)
    z = r * inv_m
    p = z
    rz = _dot(r, z)
    stop_sq = cfg.cg_tol**2 * _dot(b, b)
    active = _dot(r, r) > stop_sq
    iterations = torch.zeros(active.shape, dtype=torch.int32, device=x.device)
    # A host sync per check: every iteration on CPU (free), every few on CUDA to keep the queue full.
    check_every = 1 if x.device.type == "cpu" else 4
    for i in range(cfg.cg_max_iterations):
        if i % check_every == 0 and not bool(active.any()):
            break
        iterations += active
        x, r, p, rz, active = step(x, r, p, rz, active, diag, ax, ay, inv_m, stop_sq)
    return x, iterations.flatten(1).amax(1)


# ---------------------------------------------------------------------------------------------------------------
# The two half-steps and their alternation


def _s_step(g_NHW, s_NHW, cfg: DecomposeConfig, step: Callable):
    """argmin_s E(u, s), which sees u only through g = |∇u|²: (diag(α g + λ/(4ε)) + λε DᵀD) s = α g."""
    alpha_g = cfg.alpha * g_NHW[:, None]
    n, _, height, width = alpha_g.shape
    coupling = torch.tensor(cfg.lam * cfg.epsilon / cfg.pixel_spacing**2, device=g_NHW.device)
    ax, ay = coupling.expand(n, 1, height, width - 1), coupling.expand(n, 1, height - 1, width)
    s, iterations = _pcg(s_NHW[:, None], alpha_g, alpha_g + cfg.lam / (4 * cfg.epsilon), ax, ay, cfg, step)
    return s[:, 0], iterations


def _u_step(f_NCHW, u_NCHW, s_NHW, cfg: DecomposeConfig, step: Callable):
    """argmin_u E(u, s): (I + α Dᵀ W D) u = f, one system per channel sharing W = diag((1 - s)²)."""
    w_N1HW = (cfg.alpha / cfg.pixel_spacing**2) * (1 - s_NHW[:, None]).square()
    return _pcg(u_NCHW, f_NCHW, 1.0, w_N1HW[..., :, :-1], w_N1HW[..., :-1, :], cfg, step)


@dataclass(frozen=True)
class ATResult:
    """The minimiser of eq. 8 for a batch, in [0, 1] intensities, with per-image diagnostics."""

    u_NCHW: torch.Tensor
    s_NHW: torch.Tensor  # edge field in [0, 1]
    energy_N: torch.Tensor  # final E(u, s), float64
    outer_iterations_N: torch.Tensor  # alternations used
    converged_N: torch.Tensor  # met outer_tol before outer_iterations ran out
    u_cg_iterations_N: torch.Tensor  # CG iterations over all u-steps
    s_cg_iterations_N: torch.Tensor  # CG iterations over all s-steps
    energy_history_NT: torch.Tensor | None = None  # E after the start and after every half-step (track_energy)


def solve_at(f_NCHW: torch.Tensor, cfg: DecomposeConfig, track_energy: bool = False) -> ATResult:
    """Minimise eq. 8 for each image of a batch by alternating exact half-steps; results on f's device.

    Raises DecompositionError naming the images with a non-finite input or a solve that broke down.
    """
    _check_finite(f_NCHW)
    device = resolve_device(cfg.device)
    result, failed_N = _solve(_solver_layout(f_NCHW, device), cfg, track_energy)
    if failed_N.any():
        raise DecompositionError(failed_N.nonzero().flatten().tolist(), _BROKEN)
    return ATResult(**{name: None if t is None else t.to(f_NCHW.device) for name, t in vars(result).items()})


_BROKEN = "the solve produced non-finite values (float32 overflow: are the intensities in [0, 1]?)"


def _solver_layout(images_NCHW: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Images converted from HWC arrays arrive channels-last; the per-channel sums and stencils want NCHW order.
    return images_NCHW.to(device=device, dtype=torch.float32, memory_format=torch.contiguous_format)


def _check_finite(images: torch.Tensor) -> None:
    bad = (~torch.isfinite(images).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:
        raise DecompositionError(bad, "input contains NaN or Inf")


def _solve(f_NCHW: torch.Tensor, cfg: DecomposeConfig, track_energy: bool) -> tuple[ATResult, torch.Tensor]:
    """The alternation on f's device; also returns which images broke down (their results are meaningless)."""
    n, _, height, width = f_NCHW.shape
    device, h = f_NCHW.device, cfg.pixel_spacing
    step = _compiled_pcg_step() if cfg.compile else _pcg_step
    f = f_NCHW * cfg.intensity_scale
    # The working set: the images still iterating. Finished ones leave it and keep their u and s exactly.
    index = torch.arange(n, device=device)
    f_w, u_w, s_w = f, f.clone(), f.new_zeros(n, height, width)
    g_w = grad_sq(u_w, h)
    e_w = _energy(f_w, u_w, s_w, g_w, cfg)
    u, s, energy = u_w.clone(), s_w.clone(), e_w.clone()  # results of the whole batch
    history = [energy.clone()] if track_energy else []
    outer, u_cg, s_cg = (torch.zeros(n, dtype=torch.int32, device=device) for _ in range(3))
    converged, failed = (torch.zeros(n, dtype=torch.bool, device=device) for _ in range(2))
    for _ in range(cfg.outer_iterations):
        s_w, s_iterations = _s_step(g_w, s_w, cfg, step)
        if track_energy:
            history.append(energy.index_put((index,), _energy(f_w, u_w, s_w, g_w, cfg)))
        u_w, u_iterations = _u_step(f_w, u_w, s_w, cfg, step)
        g_w = grad_sq(u_w, h)
        previous, e_w = e_w, _energy(f_w, u_w, s_w, g_w, cfg)
        u[index], s[index], energy[index] = u_w, s_w, e_w
        outer[index] += 1
        s_cg[index] += s_iterations
        u_cg[index] += u_iterations
        broken = ~torch.isfinite(e_w)
        finished = broken | (previous - e_w <= cfg.outer_tol * previous)
        failed[index], converged[index] = broken, finished & ~broken
        if track_energy:
            history.append(energy.clone())
        if finished.any():
            index, f_w, u_w, s_w, g_w, e_w = (t[~finished] for t in (index, f_w, u_w, s_w, g_w, e_w))
            if len(index) == 0:
                break
    result = ATResult(
        u_NCHW=u / cfg.intensity_scale,
        s_NHW=s,
        energy_N=energy,
        outer_iterations_N=outer,
        converged_N=converged,
        u_cg_iterations_N=u_cg,
        s_cg_iterations_N=s_cg,
        energy_history_NT=torch.stack(history, 1) if track_energy else None,
    )
    return result, failed


# ---------------------------------------------------------------------------------------------------------------
# The recursive decomposition


@dataclass(frozen=True)
class Decomposition:
    """Bases B_1..B_n and their edge fields; the details D_k = B_{k-1} - B_k come from ``details``."""

    bases_NKCHW: torch.Tensor
    edges_NKHW: torch.Tensor
    outer_iterations_NK: torch.Tensor
    converged_NK: torch.Tensor


def decompose(images_NCHW: torch.Tensor, cfg: DecomposeConfig, progress: Progress | None = None) -> Decomposition:
    """B_k = AT(B_{k-1}) for k = 1..cfg.order, in batches of cfg.batch_size; results on the images' device.

    Raises DecompositionError with the indices (within ``images_NCHW``) of every image that could not be solved.
    """
    progress = progress or Silent()
    _check_finite(images_NCHW)
    n, channels, height, width = images_NCHW.shape
    device, out = resolve_device(cfg.device), images_NCHW.device
    bases = torch.empty(n, cfg.order, channels, height, width, dtype=torch.float32, device=out)
    edges = torch.empty(n, cfg.order, height, width, dtype=torch.float32, device=out)
    outer = torch.zeros(n, cfg.order, dtype=torch.int32, device=out)
    converged = torch.zeros(n, cfg.order, dtype=torch.bool, device=out)
    bad: list[int] = []
    progress.start("decompose", total=n, unit="images")
    for start in range(0, n, cfg.batch_size):
        index = torch.arange(start, min(start + cfg.batch_size, n), device=out)
        base = _solver_layout(images_NCHW[index], device)
        for k in range(cfg.order):
            level, failed = _solve(base, cfg, track_energy=False)
            # An image that broke down at one level is not carried to the next; the others go on.
            ok = ~failed
            bad += index[failed.to(out)].tolist()
            index, base = index[ok.to(out)], level.u_NCHW[ok]
            bases[index, k] = base.to(out)
            edges[index, k] = level.s_NHW[ok].to(out)
            outer[index, k] = level.outer_iterations_N[ok].to(out)
            converged[index, k] = level.converged_N[ok].to(out)
        progress.advance(min(cfg.batch_size, n - start))
    if bad:
        raise DecompositionError(sorted(bad), _BROKEN)
    return Decomposition(bases, edges, outer, converged)


def details(images_NCHW: torch.Tensor, bases_NKCHW: torch.Tensor) -> torch.Tensor:
    """D_k = B_{k-1} - B_k for k = 1..n with B_0 = I, so that I = B_n + Σ_k D_k."""
    previous = torch.cat([images_NCHW[:, None].to(bases_NKCHW), bases_NKCHW[:, :-1]], 1)
    return previous[:, : bases_NKCHW.shape[1]] - bases_NKCHW


# ---------------------------------------------------------------------------------------------------------------
# Reference: the same alternation with sparse direct solves (SciPy), the equations in matrix form


def solve_at_scipy(f_CHW: np.ndarray, cfg: DecomposeConfig) -> tuple[np.ndarray, np.ndarray]:
    """The reference AT solver for one image: every half-step is an exact sparse LU solve (float64).

    Returns (u_CHW, s_HW) in [0, 1] intensities. Same start (u = f, s = 0), same alternation and the same
    outer stopping rule as ``solve_at``; only the inner solver differs.
    """
    # lazy: slow to import (bench/RESULTS.md); only this reference solver needs it
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    channels, height, width = f_CHW.shape
    h, alpha, lam, eps = cfg.pixel_spacing, cfg.alpha, cfg.lam, cfg.epsilon

    def forward_difference(size: int) -> sp.csr_matrix:
        # Rows i < size-1: x[i+1] - x[i]; the last row is zero (Neumann boundary).
        return sp.diags([-np.r_[np.ones(size - 1), 0.0], np.ones(size - 1)], [0, 1], format="csr") / h

    # Pixels flattened row-major (index y * width + x), as numpy's reshape does.
    Dx = sp.kron(sp.identity(height), forward_difference(width), format="csr")
    Dy = sp.kron(forward_difference(height), sp.identity(width), format="csr")
    DtD = Dx.T @ Dx + Dy.T @ Dy
    identity = sp.identity(height * width, format="csr")

    def factorise(A: sp.spmatrix):
        # SPD: a symmetric ordering without pivoting is SuperLU's fastest exact mode here.
        return splu(A.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})

    def grad_sq(x_PC: np.ndarray) -> np.ndarray:
        return ((Dx @ x_PC) ** 2 + (Dy @ x_PC) ** 2).sum(1)

    def energy(u_PC: np.ndarray, s_P: np.ndarray) -> float:
        return float(
            ((u_PC - f_PC) ** 2).sum()
            + alpha * ((1 - s_P) ** 2 * grad_sq(u_PC)).sum()
            + lam * (eps * grad_sq(s_P[:, None]) + s_P**2 / (4 * eps)).sum()
        )

    f_PC = f_CHW.reshape(channels, -1).T.astype(np.float64) * cfg.intensity_scale
    u_PC, s_P = f_PC.copy(), np.zeros(height * width)
    e = energy(u_PC, s_P)
    for _ in range(cfg.outer_iterations):
        alpha_g = alpha * grad_sq(u_PC)
        s_P = factorise(sp.diags(alpha_g + lam / (4 * eps)) + lam * eps * DtD).solve(alpha_g)
        W = sp.diags((1 - s_P) ** 2)
        u_PC = factorise(identity + alpha * (Dx.T @ W @ Dx + Dy.T @ W @ Dy)).solve(f_PC)
        e, e_previous = energy(u_PC, s_P), e
        if e_previous - e <= cfg.outer_tol * e_previous:
            break
    u_CHW = (u_PC.T / cfg.intensity_scale).reshape(channels, height, width)
    return u_CHW.astype(np.float32), s_P.reshape(height, width).astype(np.float32)
