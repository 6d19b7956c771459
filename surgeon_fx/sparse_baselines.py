"""Sparsity baselines on one weight matrix: magnitude, Wanda and SparseGPT, from their papers' formulas.

Reads: a weight ``W`` (R outputs x C inputs, bias excluded), input statistics (the K-FAC input factor
``A = E[x x^T]`` of the curvature pass, i.e. the layer-wise Hessian ``X^T X`` up to scale) and an
optional prior mask. Writes: nothing; pure functions, no FX. Invariant: masks are True = removed;
entries of ``prior`` are always removed again, so masks of earlier shots persist.

- Magnitude: remove the smallest ``|W_ij|`` in the layer.
- Wanda (Sun et al., 2024): score ``|W_ij| * ||X_j||_2``, compared within each output row.
- SparseGPT (Frantar & Alistarh, 2023): OBS with ``H = X^T X + 1% mean(diag H) I``, columns
  processed left to right; each pruned weight's error ``(w - 0) / [H^-1]_jj`` is spread over the
  later columns of its row through the upper Cholesky factor of ``H^-1``, lazily in blocks of 128
  columns; the mask of each block is chosen adaptively by ``w^2 / [H^-1]_jj^2`` when the block
  starts (for N:M, per group of M columns when the group starts).
"""

from __future__ import annotations

import torch

from .kfac import as_matrix
from .patterns import nm_eligible, select_smallest

__all__ = ["magnitude_mask", "wanda_scores", "row_mask", "nm_mask", "sparsegpt_prune"]


def _forced(score: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    score = score.double()
    return score if prior is None else torch.where(prior, -torch.inf, score)


def nm_mask(score: torch.Tensor, n: int, m: int, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Per group of ``m`` inputs, remove the lowest-scoring entries until at most ``n`` are kept."""
    return nm_eligible(score, n, m, prior) < torch.inf


def magnitude_mask(w: torch.Tensor, ratio: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Remove ``round(ratio * numel)`` entries of smallest magnitude (prior entries first)."""
    k = max(round(ratio * w.numel()), int(prior.sum()) if prior is not None else 0)
    return select_smallest(_forced(w.abs(), prior), k)


def wanda_scores(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` up to a constant: ``sqrt(A_jj)`` with ``A = E[x x^T]`` (dense or diagonal)."""
    ad = a if a.dim() == 1 else torch.diagonal(a)
    return w.abs().double() * ad.double().clamp_min(0).sqrt()[None, : w.shape[1]]


def row_mask(score: torch.Tensor, ratio: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """In every row, remove its lowest-scoring entries (Wanda's comparison group); the layer loses
    exactly ``round(ratio * R * C)`` (rows differ by at most one), never fewer than ``prior`` holds."""
    r, c = score.shape
    total = round(ratio * r * c)
    k = torch.full((r, 1), total // r, device=score.device)
    k[: total - (total // r) * r] += 1  # spread the remainder over the first rows
    if prior is not None:
        k = torch.maximum(k, prior.sum(1, keepdim=True))
    rank = torch.empty(r, c, dtype=torch.long, device=score.device)
    order = _forced(score, prior).argsort(dim=1, stable=True)
    rank.scatter_(1, order, torch.arange(c, device=score.device).expand(r, c))
    return rank < k


def _upper_hinv(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (dead inputs get ``H_jj = 1``)."""
    h = as_matrix(h).double().clone()
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    diag += damp * float(diag.mean())
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


@torch.no_grad()
def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    *,
    ratio: float | None = None,
    nm: tuple[int, int] | None = None,
    prior: torch.Tensor | None = None,
    block: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one layer: choose the mask and update the remaining weights (float64).

    Args:
        w: (R, C) weight (outputs x inputs, bias excluded).
        h: (C, C) or (C,) input Hessian, any positive scale (``X^T X`` or ``E[x x^T]``).
        ratio: unstructured: fraction of each block of columns to remove (``nm`` must be None).
        nm: ``(n, m)``: keep at most ``n`` of every ``m`` consecutive inputs.
        prior: (R, C) bool entries that must be removed (earlier shots).
        block: columns per lazy update block (rounded down to a multiple of ``m``).
        damp: relative damping (SparseGPT: 1%).

    Returns:
        ``(new_w, mask)``: the updated (R, C) float64 weight, exactly zero on ``mask``.

    Raises:
        ValueError: neither or both of ``ratio`` and ``nm``; shapes that do not fit.
    """
    if (ratio is None) == (nm is None):
        raise ValueError("sparsegpt_prune needs exactly one of ratio= (unstructured) and nm=(n, m)")
    r, c = w.shape
    if h.shape[0] != c:
        raise ValueError(f"sparsegpt_prune: weight has {c} inputs but the Hessian is {tuple(h.shape)}")
    w = w.double().clone()
    hinv = _upper_hinv(h, damp)
    if nm is not None:
        block = max(nm[1], block - block % nm[1])
    mask = torch.zeros(r, c, dtype=torch.bool, device=w.device)
    for i1 in range(0, c, block):
        i2 = min(i1 + block, c)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diagonal(h1)
        pri = prior[:, i1:i2] if prior is not None else None
        err = torch.zeros_like(w1)
        if ratio is not None:
            k = max(round(ratio * w1.numel()), int(pri.sum()) if pri is not None else 0)
            mask[:, i1:i2] = select_smallest(_forced(w1**2 / d**2, pri), k)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                g = slice(j, min(j + nm[1], i2 - i1))
                gp = pri[:, g] if pri is not None else None
                mask[:, i1 + g.start : i1 + g.stop] = nm_mask(w1[:, g] ** 2 / d[g] ** 2, *nm, gp)
            col = w1[:, j]
            e = torch.where(mask[:, i1 + j], col, 0.0) / d[j]
            w1[:, j:] -= e[:, None] * h1[j, j:][None, :]
            w1[:, j][mask[:, i1 + j]] = 0.0
            err[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w, mask
