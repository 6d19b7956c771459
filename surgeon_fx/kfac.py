"""K-FAC curvature and optimal-brain-surgeon (OBS) formulas for one linear layer. No FX here.

Reads: a weight matrix ``W`` (R outputs x C inputs; a bias is an extra input column whose
activation is 1) and its Kronecker factors ``A = E[a a^T]`` (inputs) and ``G = E[g g^T]``
(gradients of the loss w.r.t. the outputs), so the Fisher is approximated by ``F = G (x) A``.
Writes: nothing; pure functions. Invariant: every cost is the exact increase of the quadratic
model ``1/2 dw^T F dw`` under the constrained-optimal update, and every update is that minimiser
(tested against brute force).

Formulas (van der Ouderaa et al., 2024; Hassibi & Stork, 1993):
- remove rows R:    dL = 1/2 tr(([G^-1]_RR)^-1 W_R A W_R^T),  dW = -G^-1[:, R] ([G^-1]_RR)^-1 W_R
- remove columns C: dL = 1/2 tr(([A^-1]_CC)^-1 W_:C^T G W_:C), dW = -W_:C ([A^-1]_CC)^-1 A^-1[C, :]
- remove element (r, c): dL = 1/2 W_rc^2 / ([G^-1]_rr [A^-1]_cc)
Without the compensating update (the other weights kept fixed) the costs are
- rows R:    dL = 1/2 tr(G_RR W_R A W_R^T);   columns C: dL = 1/2 tr(A_CC W_:C^T G W_:C)
A factor may be diagonal (a 1-D tensor), e.g. ``A`` of an embedding (one-hot inputs) or ``G`` of a
vocabulary-sized output; the same formulas apply with diagonal matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "damped_inverse",
    "row_costs",
    "col_costs",
    "row_costs_fixed",
    "col_costs_fixed",
    "row_update",
    "col_update",
    "element_costs",
    "as_matrix",
]


def as_matrix(f: torch.Tensor) -> torch.Tensor:
    """A factor as a dense matrix (diagonal factors are stored as vectors)."""
    return torch.diag(f) if f.dim() == 1 else f


def damped_inverse(f: torch.Tensor, damping: float) -> torch.Tensor:
    """Inverse of ``f + damping * mean(diag f) * I`` in float64 (Cholesky); vectors stay diagonal.

    A factor whose diagonal is all zero (a dead layer) is damped with 1.0 so it stays invertible.
    """
    f = f.double()
    diag = f if f.dim() == 1 else torch.diagonal(f)
    scale = float(diag.mean()) if diag.numel() else 1.0
    lam = damping * (scale if scale > 0 else 1.0)
    if f.dim() == 1:
        return 1.0 / (f + lam)
    m = f + lam * torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:  # not positive definite in float64: fall back to an eigen-solve
        evals, evecs = torch.linalg.eigh(m)
        return (evecs / evals.clamp_min(lam)) @ evecs.T
    return torch.cholesky_inverse(chol)


def _sub(f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.diag(f[idx]) if f.dim() == 1 else f[idx][:, idx]


def _cols(f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``f[:, idx]`` for dense or diagonal ``f``."""
    if f.dim() == 2:
        return f[:, idx]
    out = torch.zeros(f.shape[0], len(idx), dtype=f.dtype, device=f.device)
    out[idx, torch.arange(len(idx), device=f.device)] = f[idx]
    return out


def _quad(w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``w @ f @ w^T`` for dense or diagonal ``f``."""
    return (w * f) @ w.T if f.dim() == 1 else w @ f @ w.T


def row_costs(w: torch.Tensor, a: torch.Tensor, g_inv: torch.Tensor, blocks: Sequence[Sequence[int]] | None = None):
    """Loss increase of removing each block of rows of ``w`` (each row, if ``blocks`` is None).

    Args:
        w: (R, C) weights (bias appended as the last column when ``a`` includes it).
        a: (C, C) or (C,) input factor. g_inv: damped inverse of the output factor, (R, R) or (R,).
        blocks: row index lists, one per candidate.

    Returns:
        float64 tensor, one cost per block.
    """
    w = w.double()
    a = a.double()
    if blocks is None:
        # 1/2 (w_r A w_r^T) / [G^-1]_rr for every row at once
        wa = (w * a) if a.dim() == 1 else w @ a
        num = (wa * w).sum(1)
        den = g_inv if g_inv.dim() == 1 else torch.diagonal(g_inv)
        return 0.5 * num / den
    out = torch.empty(len(blocks), dtype=torch.float64, device=w.device)
    for i, b in enumerate(blocks):
        idx = torch.as_tensor(b, device=w.device)
        inner = _quad(w[idx], a)
        out[i] = 0.5 * torch.trace(torch.linalg.solve(_sub(g_inv, idx), inner))
    return out


def col_costs(w: torch.Tensor, g: torch.Tensor, a_inv: torch.Tensor, blocks: Sequence[Sequence[int]] | None = None):
    """Loss increase of removing each block of columns of ``w`` (see :func:`row_costs`)."""
    w = w.double()
    g = g.double()
    if blocks is None:
        gw = (w * g[:, None]) if g.dim() == 1 else g @ w
        num = (gw * w).sum(0)
        den = a_inv if a_inv.dim() == 1 else torch.diagonal(a_inv)
        return 0.5 * num / den
    out = torch.empty(len(blocks), dtype=torch.float64, device=w.device)
    for i, b in enumerate(blocks):
        idx = torch.as_tensor(b, device=w.device)
        wc = w[:, idx]
        inner = _quad(wc.T, g)
        out[i] = 0.5 * torch.trace(torch.linalg.solve(_sub(a_inv, idx), inner))
    return out


def row_costs_fixed(w: torch.Tensor, a: torch.Tensor, g: torch.Tensor, blocks: Sequence[Sequence[int]] | None = None):
    """Loss increase of removing each block of rows with every other weight kept fixed (no update)."""
    w, a, g = w.double(), a.double(), g.double()
    quad = ((w * a) if a.dim() == 1 else w @ a) * w  # (R, C): row r's w_r A w_r^T summed over C below
    if blocks is None:
        gd = g if g.dim() == 1 else torch.diagonal(g)
        return 0.5 * gd * quad.sum(1)
    out = torch.empty(len(blocks), dtype=torch.float64, device=w.device)
    for i, b in enumerate(blocks):
        idx = torch.as_tensor(b, device=w.device)
        out[i] = 0.5 * torch.trace(_sub(g, idx) @ _quad(w[idx], a))
    return out


def col_costs_fixed(w: torch.Tensor, g: torch.Tensor, a: torch.Tensor, blocks: Sequence[Sequence[int]] | None = None):
    """Loss increase of removing each block of columns with every other weight kept fixed (no update)."""
    w, a, g = w.double(), a.double(), g.double()
    if blocks is None:
        gw = (w * g[:, None]) if g.dim() == 1 else g @ w
        ad = a if a.dim() == 1 else torch.diagonal(a)
        return 0.5 * ad * (gw * w).sum(0)
    out = torch.empty(len(blocks), dtype=torch.float64, device=w.device)
    for i, b in enumerate(blocks):
        idx = torch.as_tensor(b, device=w.device)
        out[i] = 0.5 * torch.trace(_sub(a, idx) @ _quad(w[:, idx].T, g))
    return out


def row_update(w: torch.Tensor, g_inv: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """OBS update for removing ``rows`` jointly: ``-G^-1[:, R] ([G^-1]_RR)^-1 W_R`` (float64).

    After adding it, the removed rows are exactly zero and the other rows compensate.
    """
    idx = torch.as_tensor(list(rows), device=w.device)
    w = w.double()
    coef = torch.linalg.solve(_sub(g_inv, idx), w[idx])  # (|R|, C)
    return -_cols(g_inv, idx) @ coef


def col_update(w: torch.Tensor, a_inv: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """OBS update for removing ``cols`` jointly: ``-W_:C ([A^-1]_CC)^-1 A^-1[C, :]`` (float64)."""
    idx = torch.as_tensor(list(cols), device=w.device)
    w = w.double()
    coef = torch.linalg.solve(_sub(a_inv, idx), _cols(a_inv, idx).T)  # (|C|, C)
    return -w[:, idx] @ coef


def element_costs(w: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """Loss increase of removing each single weight: ``1/2 W_rc^2 / ([G^-1]_rr [A^-1]_cc)``."""
    gd = g_inv if g_inv.dim() == 1 else torch.diagonal(g_inv)
    ad = a_inv if a_inv.dim() == 1 else torch.diagonal(a_inv)
    return 0.5 * w.double() ** 2 / (gd.double()[:, None] * ad.double()[None, :])
