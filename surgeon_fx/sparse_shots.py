"""Multi-shot sparsification: fresh statistics on the current model every shot, masks that persist.

Reads: a model (modified in place; ``compress`` hands it a private copy, possibly already made
smaller by the structured shots), calibration windows and a :class:`~surgeon_fx.api.CompressConfig`
with ``sparsity`` set. Writes: the values (never the shapes) of the decoder linear weights, and
biases through the OBS update. Invariant: shot t of T reaches ``t / T`` of the target (linear
schedule: the unstructured ratio, or for N:M the removals per group); every entry removed in an
earlier shot stays exactly zero; after the last shot an N:M pattern holds in every sparsified layer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .keys import MASKS
from .patterns import parse_sparsity
from .tracing import trace

__all__ = ["SparsityReport", "run_sparsity_shots"]

log = logging.getLogger("surgeon_fx")


@dataclass(frozen=True)
class SparsityReport:
    """What sparsification reached, on ``model.surgeon_fx_sparsity`` of a compressed model.

    Attributes:
        pattern: ``"unstructured"`` or ``"N:M"``.
        method: the sparsity method.
        target: requested fraction of zero weights in the sparsified layers.
        reached: fraction of exactly-zero weights there now.
        removed / total: zero and all weight entries of the sparsified layers (biases excluded).
        params: FQNs of the sparsified weights (decoder linear layers; not embeddings or the LM head).
        per_param: fraction of zeros per weight.
    """

    pattern: str
    method: str
    target: float
    reached: float
    removed: int
    total: int
    params: tuple[str, ...]
    per_param: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lo = min(self.per_param.values(), default=0.0)
        hi = max(self.per_param.values(), default=0.0)
        return (
            f"sparsity ({self.method}, {self.pattern}): {100 * self.reached:.2f}% of {self.total:,} decoder linear "
            f"weights are zero (target {100 * self.target:.2f}%); per layer {100 * lo:.1f}%..{100 * hi:.1f}%"
        )


def _report(model: nn.Module, params, pattern: str, method: str, target: float) -> SparsityReport:
    per, zeros, total = {}, 0, 0
    for p in params:
        w = model.get_parameter(p)
        z = int((w == 0).sum())
        per[p] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return SparsityReport(pattern, method, target, zeros / total if total else 0.0, zeros, total, tuple(params), per)


def run_sparsity_shots(
    work: nn.Module, calibration: torch.Tensor | None, cfg, *, progress: bool = True, on_shot=None
) -> tuple[SparsityReport, fx.GraphModule]:
    """Sparsify ``work`` in place over ``cfg.shots`` shots.

    Each shot: (curvature sweep on the current weights unless magnitude) -> masks -> update/zero.

    Args:
        work: the model (in place).
        calibration: (N, L) token windows; ``None`` for magnitude.
        cfg: a :class:`~surgeon_fx.api.CompressConfig` with ``sparsity`` set.
        progress: progress bars.
        on_shot: optional ``on_shot(shot, model, report)`` after every shot.

    Returns:
        ``(report, gm)``: the :class:`SparsityReport` and the traced graph, whose parameters are
        ``work``'s own.
    """
    from .passes import annotate_groups
    from .passes.sparsity import annotate_masks, apply_masks_, apply_sparsegpt_, sparse_layers
    from .shots import sweep_curvature

    pattern = parse_sparsity(cfg.sparsity)
    name = cfg.sparsity
    gm = trace(work)  # the graph's parameters are work's parameters: updates land in work
    annotate_groups(gm, on_unknown=cfg.on_unknown)
    params = sorted({lay.weight for lay in sparse_layers(gm)})
    if not params:
        raise ValueError("found no decoder linear layer to sparsify in this model")
    target = cfg.sparsity_ratio
    prior: dict[str, torch.Tensor] | None = None
    report = None
    bar = tqdm(range(1, cfg.shots + 1), desc="sparsity shots", disable=not progress)
    for t in bar:
        t0 = time.perf_counter()
        fraction = t / cfg.shots
        if cfg.method != "magnitude":
            sweep_curvature(gm, calibration, cfg, t, progress=progress)
        if cfg.method == "sparsegpt":
            apply_sparsegpt_(gm, pattern, ratio=target, fraction=fraction, prior=prior)
        else:
            update = cfg.method == "surgeon" and cfg.update != "none"
            annotate_masks(
                gm,
                pattern,
                ratio=target,
                fraction=fraction,
                method=cfg.method,
                prior=prior,
                damping=cfg.damping,
                update=update,
                scope=cfg.sparsity_scope,
                rows=cfg.sparsity_rows,
            )
            apply_masks_(gm, update=update, damping=cfg.damping, chunk_size=cfg.chunk_size, rows=cfg.sparsity_rows)
        prior = gm.meta[MASKS].masks
        report = _report(work, params, name, cfg.method, target)
        dt = time.perf_counter() - t0
        log.info(
            "sparsity shot %d/%d (%s, %s): %.2f%% of decoder linear weights zero, %.1fs",
            t,
            cfg.shots,
            cfg.method,
            name,
            100 * report.reached,
            dt,
        )
        bar.set_postfix(zero=f"{100 * report.reached:.1f}%", seconds=f"{dt:.1f}")
        if on_shot is not None:
            on_shot(t, work, report)
    return report, gm
