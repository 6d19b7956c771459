"""The LLM Surgeon as published: rows and columns of every matrix pruned independently, by masking.

Reads: a model (modified in place; ``compress`` hands it a private copy), calibration windows and
a :class:`~surgeon_fx.api.CompressConfig`. Writes: the model's weight *values* (zeros and OBS
updates); shapes never change. Invariant: every decoder linear matrix is treated on its own, as the
reference implementation of van der Ouderaa et al. (2024) does for structured pruning: each row
and each column has its K-FAC OBS cost, one global threshold across all matrices picks the cheapest
(per weight they zero) until shot ``t`` of ``T`` has zeroed ``ratio * t / T`` of the decoder linear
weights, and every matrix gets the joint OBS update for all of its removed rows, then all of its
removed columns (earlier shots' rows and columns included, so they stay exactly zero). Nothing is
coupled: removing a row of ``q_proj`` does not remove anything from ``o_proj``, so the zeros do not
shrink any tensor. This is the faithful reference the coupled, physically shrinking ``"surgeon"``
method is measured against.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import kfac
from .keys import CURVATURE
from .tracing import trace

__all__ = ["MaskedResult", "run_published_shots"]

log = logging.getLogger("surgeon_fx")


@dataclass
class MaskedResult:
    """What a masked (same-shape) method removed: rows/columns per weight FQN, and weight counts."""

    rows: dict[str, set[int]] = field(default_factory=dict)
    cols: dict[str, set[int]] = field(default_factory=dict)
    shape: dict[str, tuple[int, int]] = field(default_factory=dict)
    linear_before: int = 0
    params_before: int = 0

    def zeroed(self, fqn: str) -> int:
        r, c = self.shape[fqn]
        nr, nc = len(self.rows.get(fqn, ())), len(self.cols.get(fqn, ()))
        return nr * c + nc * r - nr * nc

    @property
    def linear_zeroed(self) -> int:
        return sum(self.zeroed(f) for f in self.shape)

    @property
    def linear_after(self) -> int:
        return self.linear_before - self.linear_zeroed

    @property
    def params_after(self) -> int:
        """Parameters of the model that are not masked to zero."""
        return self.params_before - self.linear_zeroed

    @property
    def linear_ratio(self) -> float:
        return self.linear_zeroed / self.linear_before if self.linear_before else 0.0


def run_published_shots(work: nn.Module, calibration: torch.Tensor, cfg, *, progress: bool = True, on_shot=None):
    """Mask ``cfg.ratio`` of the decoder linear weights of ``work`` (in place) over ``cfg.shots`` shots.

    Args:
        work: the model (modified in place: values only).
        calibration: (N, L) token windows.
        cfg: a :class:`~surgeon_fx.api.CompressConfig` (``ratio``, ``shots``, ``damping``, ``fisher``,
            ``batch_size``, ``precision``, ``seed``).
        progress: progress bars.
        on_shot: optional ``on_shot(shot, model, result)`` after every shot.

    Returns:
        A :class:`MaskedResult`.
    """
    from .passes import annotate_groups, get_groups
    from .passes.obs import _Inverses, _write_back_, layer_matrix
    from .passes.sparsity import sparse_layers
    from .shots import _counts, sweep_curvature

    gm = trace(work)  # shares its parameters with ``work``
    annotate_groups(gm, on_unknown=cfg.on_unknown)
    analysis = get_groups(gm)
    params_before, linear_before = _counts(analysis)
    res = MaskedResult(linear_before=linear_before, params_before=params_before)
    bar = tqdm(range(1, cfg.shots + 1), desc="shots", disable=not progress)
    for t in bar:
        t0 = time.perf_counter()
        sweep_curvature(gm, calibration, cfg, t, progress=progress)
        curv = gm.meta[CURVATURE]
        inv = _Inverses(curv, cfg.damping)
        layers = sparse_layers(gm, curv)  # decoder linear layers read once (tied weights stay untouched)
        cands = []  # (cost per weight, layer index, "row" | "col", index)
        mats = {}
        for i, lay in enumerate(layers):
            m = layer_matrix(gm, curv, lay).double()
            mats[i] = m
            w_cols = lay.cols - (1 if lay.bias else 0)
            res.shape.setdefault(lay.weight, (lay.rows, w_cols))
            done_r, done_c = res.rows.get(lay.weight, set()), res.cols.get(lay.weight, set())
            rc = kfac.row_costs(m, curv.factor_a(lay), inv.g_inv(lay)).cpu().numpy() / max(w_cols, 1)
            cc = kfac.col_costs(m, lay.g, inv.a_inv(lay)).cpu().numpy()[:w_cols] / max(lay.rows, 1)
            cands += [(float(c), i, "row", r) for r, c in enumerate(rc) if r not in done_r]
            cands += [(float(c), i, "col", j) for j, c in enumerate(cc) if j not in done_c]
        cands.sort(key=lambda x: x[0] if np.isfinite(x[0]) else np.inf)
        goal = cfg.ratio * t / cfg.shots * res.linear_before
        zeroed = res.linear_zeroed
        touched = set()
        for _, i, role, idx in cands:
            if zeroed >= goal:
                break
            lay = layers[i]
            before = res.zeroed(lay.weight)
            (res.rows if role == "row" else res.cols).setdefault(lay.weight, set()).add(idx)
            zeroed += res.zeroed(lay.weight) - before
            touched.add(i)
        with torch.no_grad():
            for i in sorted(touched):
                lay, m = layers[i], mats[i]
                gone_r = sorted(res.rows.get(lay.weight, ()))
                gone_c = sorted(res.cols.get(lay.weight, ()))
                if gone_r:
                    m = m + kfac.row_update(m, inv.g_inv(lay), gone_r)
                    m[gone_r] = 0.0
                if gone_c:
                    m = m + kfac.col_update(m, inv.a_inv(lay), gone_c)
                    m[:, gone_c] = 0.0
                _write_back_(gm, analysis, lay, m)
        del gm.meta[CURVATURE]
        dt = time.perf_counter() - t0
        log.info(
            "shot %d/%d: %.1f%% of linear weights zeroed (rows and columns, masked), %.1fs",
            t,
            cfg.shots,
            100 * res.linear_ratio,
            dt,
        )
        bar.set_postfix(zeroed=f"{100 * res.linear_ratio:.1f}%", seconds=f"{dt:.1f}")
        if on_shot is not None:
            on_shot(t, work, res)
    return res
