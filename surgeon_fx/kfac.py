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
- remove a set Q of elements (r_q, c_q) jointly: S_qq' = [G^-1]_{r_q r_q'} [A^-1]_{c_q c_q'},
  lambda = S^-1 w_Q, dL = 1/2 w_Q^T lambda, dW = -G^-1 Lambda A^-1 (Lambda: lambda_q at (r_q, c_q))
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
    "element_update",
    "element_update_chunked",
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


def _lambda_matrix(w: torch.Tensor, s: torch.Tensor, rq: torch.Tensor, cq: torch.Tensor) -> torch.Tensor:
    """Solve ``S lambda = w_Q`` (SPD) and scatter lambda into an (R', C) matrix (zero off Q)."""
    rhs = w[rq, cq]
    chol, info = torch.linalg.cholesky_ex(s)
    lam = torch.cholesky_solve(rhs[:, None], chol)[:, 0] if int(info) == 0 else torch.linalg.lstsq(s, rhs).solution
    out = torch.zeros(int(rq.max()) + 1, w.shape[1], dtype=w.dtype, device=w.device)
    out[rq, cq] = lam
    return out


def element_update(w: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """OBS update removing every element of ``mask`` jointly under ``F = G (x) A`` (float64).

    ``lambda = S^-1 w_Q`` with ``S_qq' = [G^-1]_{r_q r_q'} [A^-1]_{c_q c_q'}``; the update
    ``dW_ij = -sum_q [G^-1]_{i r_q} [A^-1]_{c_q j} lambda_q`` minimises ``1/2 dw^T F dw`` subject to
    ``(W + dW)_Q = 0``. Memory grows with ``|Q|^2``: use :func:`element_update_chunked` for real layers.

    Args:
        w: (R, C) matrix. g_inv: (R, R) or (R,). a_inv: (C, C) or (C,). mask: (R, C) bool, True = remove.

    Returns:
        dW, (R, C) float64; ``(w + dW)[mask]`` is zero up to round-off.
    """
    w = w.double()
    g_inv, a_inv = as_matrix(g_inv).double(), as_matrix(a_inv).double()
    rq, cq = torch.nonzero(mask, as_tuple=True)
    if rq.numel() == 0:
        return torch.zeros_like(w)
    s = g_inv[rq][:, rq] * a_inv[cq][:, cq]
    lam = _lambda_matrix(w, s, rq, cq)  # (max r_q + 1, C)
    return -(g_inv[:, : lam.shape[0]] @ lam) @ a_inv


def _row_chunks(counts: list[int], chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive row ranges holding at most ``chunk_size`` masked elements (a fuller row stays alone)."""
    out, start, acc = [], 0, 0
    for r, c in enumerate(counts):
        if r > start and acc + c > chunk_size:
            out.append((start, r))
            start, acc = r, 0
        acc += c
    out.append((start, len(counts)))
    return out


def element_update_chunked(
    w: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor, mask: torch.Tensor, *, chunk_size: int = 1024
) -> torch.Tensor:
    """Remove ``mask`` from ``w`` in chunks of consecutive rows; return the new matrix (float64).

    Chunk ``[s, e)`` holds at most ``chunk_size`` masked elements (a row with more is a chunk of
    its own). It solves the OBS problem of :func:`element_update` for its own masked elements, with
    the rows of earlier chunks frozen (their removed elements stay exactly zero) and every later row
    free, on the matrix that earlier chunks already updated. Freezing rows ``< s`` replaces
    ``G^-1`` by ``inv(G_{s:, s:})``, which the upper Cholesky factor ``U`` of ``G^-1 = U^T U``
    gives without new inversions: ``inv(G_{s:, s:}) = U_{s:, s:}^T U_{s:, s:}`` (as in SparseGPT,
    here over rows). With ``chunk_size >= mask.sum()`` this is :func:`element_update`.
    Cost: ``sum_chunk |Q|^3 / 3`` for the solves plus ``R C^2 + R^2 C / 2`` for the updates.

    Args:
        w: (R, C). g_inv: (R, R) or (R,) damped inverse of G. a_inv: (C, C) or (C,).
        mask: (R, C) bool, True = remove (include elements that are already zero to keep them zero).
        chunk_size: masked elements solved jointly per chunk (memory ``chunk_size^2`` doubles).

    Returns:
        The updated (R, C) float64 matrix, exactly zero on ``mask``.

    Raises:
        ValueError: shapes disagree or ``chunk_size < 1``.
    """
    r, c = w.shape
    if mask.shape != w.shape or g_inv.shape[0] != r or a_inv.shape[0] != c:
        raise ValueError(
            f"element_update_chunked: w {tuple(w.shape)}, mask {tuple(mask.shape)}, g_inv "
            f"{tuple(g_inv.shape)} and a_inv {tuple(a_inv.shape)} do not fit together"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    w = w.double().clone()
    a_inv = as_matrix(a_inv).double()
    diag_g = g_inv.dim() == 1
    # U with G^-1 = U^T U (upper); a diagonal G^-1 has U = sqrt(diag) and decoupled rows
    u = g_inv.double().sqrt() if diag_g else torch.linalg.cholesky(g_inv.double()).mT
    for s, e in _row_chunks(mask.sum(1).tolist(), chunk_size):
        rq, cq = torch.nonzero(mask[s:e], as_tuple=True)  # rows relative to s
        if rq.numel() == 0:
            continue
        if diag_g:
            gs = u[s:e] ** 2  # inv(G_{s:, s:}) restricted to the chunk
            s_mat = gs[rq][:, None] * (rq[:, None] == rq[None, :]) * a_inv[cq][:, cq]
            lam = _lambda_matrix(w[s:e], s_mat, rq, cq)
            w[s : s + lam.shape[0]] -= (gs[: lam.shape[0], None] * lam) @ a_inv
        else:
            ucc = u[s:e, s:e]
            gs = ucc.T @ ucc  # inv(G_{s:, s:})[chunk, chunk]
            s_mat = gs[rq][:, rq] * a_inv[cq][:, cq]
            lam = _lambda_matrix(w[s:e], s_mat, rq, cq)  # (e' - s, C), e' <= e
            err = ucc[:, : lam.shape[0]] @ (lam @ a_inv)  # (e - s, C)
            w[s:] -= u[s:e, s:].T @ err  # inv(G_{s:, s:})[:, chunk] Lambda A^-1
        w[s:e][mask[s:e]] = 0.0
    return w
