"""Multi-shot sparsification: fresh statistics on the current model every shot, masks that persist.

Reads: a model (modified in place; ``compress`` hands it a private copy, possibly already made
smaller by the structured shots), calibration windows and a :class:`~surgeon_fx.api.CompressConfig`
with ``sparsity`` set. Writes: the values (never the shapes) of the decoder linear weights, and
biases through the OBS update. Invariant: shot t of T reaches ``t / T`` of the target (linear
schedule: the unstructured ratio, or for N:M the removals per group); every entry removed in an
earlier shot stays exactly zero; after the last shot an N:M pattern holds in every sparsified layer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .keys import MASKS
from .patterns import parse_sparsity
from .rundir import write_atomic
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


WEIGHTS = "weights.safetensors"
"""The file of a sparsity checkpoint that commits a shot: the model's weights, and in its metadata the state."""


def sparsity_checkpoint(checkpoint_dir: str | Path) -> Path:
    """Where the sparsity shots of a run with ``checkpoint_dir`` keep their state (its ``sparsity/``)."""
    return Path(checkpoint_dir) / "sparsity"


def _state_of(cfg) -> dict:
    """What a sparsity checkpoint must match to be resumed by this config."""
    from .shots import CORRECTION_KEYS

    keys = (
        "sparsity",
        "method",
        "shots",
        "sparsity_ratio",
        "sparsity_rows",
        "sparsity_scope",
        "sparsity_band",
        "damping",
        "fisher",
        *CORRECTION_KEYS,
    )
    return {k: getattr(cfg, k) for k in keys}


def _save_shot(work: nn.Module, masks: dict[str, torch.Tensor], shot: int, cfg, ckpt: Path) -> None:
    """Write shot ``shot``: ``masks-<shot>.safetensors`` first, then the weights, whose replacement commits
    the shot (its metadata names it), then the previous shot's masks go. A crash at any point leaves a
    consistent earlier or later shot. Rank 0 only under ``torch.distributed`` (every rank holds the same)."""
    from safetensors.torch import save_file, save_model

    from .launch import is_main

    if not is_main():
        return
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in masks.items()}, str(ckpt / f"masks-{shot}.safetensors"))
    meta = {"surgeon_fx_sparsity": json.dumps({"shot": shot, **_state_of(cfg)})}
    write_atomic(ckpt / WEIGHTS, lambda tmp: save_model(work, str(tmp), metadata=meta))
    for old in ckpt.glob("masks-*.safetensors"):
        if old.name != f"masks-{shot}.safetensors":
            old.unlink()


def _load_shot(work: nn.Module, cfg, ckpt: Path) -> tuple[int, dict[str, torch.Tensor] | None]:
    """Load the last committed shot into ``work``; return ``(next shot, its masks)`` (``(1, None)``: none)."""
    from safetensors.torch import load_file, load_model

    from .shots import checkpoint_metadata, refuse_other_run

    path = ckpt / WEIGHTS
    if not path.is_file():
        return 1, None
    state = json.loads(checkpoint_metadata(path, "surgeon_fx_sparsity") or "{}")
    refuse_other_run("sparsity checkpoint", ckpt, state, _state_of(cfg))
    shot = int(state["shot"])
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    load_model(work, str(path), device=str(device))
    masks = load_file(str(ckpt / f"masks-{shot}.safetensors"), device=str(device))
    log.info("resumed sparsity from %s after shot %d", ckpt, shot)
    return shot + 1, masks


def run_sparsity_shots(
    work: nn.Module,
    calibration: torch.Tensor | None,
    cfg,
    *,
    progress: bool = True,
    on_shot=None,
    checkpoint_dir: str | Path | None = None,
    teacher=None,
    synthetic=None,
) -> tuple[SparsityReport, fx.GraphModule]:
    """Sparsify ``work`` in place over ``cfg.shots`` shots.

    Each shot: (curvature sweep on the current weights unless magnitude) -> masks -> update/zero
    -> (with ``cfg.lora_steps``) the low-rank correction with the zeros kept.

    Args:
        work: the model (in place).
        calibration: (N, L) token windows; ``None`` for magnitude.
        cfg: a :class:`~surgeon_fx.api.CompressConfig` with ``sparsity`` set.
        progress: progress bars.
        on_shot: optional ``on_shot(shot, model, report)`` after every shot.
        checkpoint_dir: save the weights and masks after every shot there, and resume from the last
            shot saved (the result equals an uninterrupted run's). A checkpoint of another
            sparsity, method, shot count, target, rows, scope, damping, Fisher or correction is refused.
        teacher: the frozen original model, for ``cfg.lora_loss`` other than ``"next_token"``.
        synthetic: windows of the teacher's own text the correction trains on too (``None``: none).

    Returns:
        ``(report, gm)``: the :class:`SparsityReport` and the traced graph, whose parameters are
        ``work``'s own.
    """
    from .passes import annotate_groups
    from .passes.sparsity import annotate_masks, apply_masks_, apply_sparsegpt_, apply_wanda_, sparse_layers
    from .shots import low_rank_correction_, sweep_curvature

    pattern = parse_sparsity(cfg.sparsity)
    name = cfg.sparsity
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start, prior = _load_shot(work, cfg, ckpt) if ckpt is not None else (1, None)
    gm = trace(work)  # the graph's parameters are work's parameters: updates land in work
    annotate_groups(gm, on_unknown=cfg.on_unknown)
    params = sorted({lay.weight for lay in sparse_layers(gm)})
    if not params:
        raise ValueError("found no decoder linear layer to sparsify in this model")
    target = cfg.sparsity_ratio
    report = _report(work, params, name, cfg.method, target) if start > cfg.shots else None
    bar = tqdm(range(start, cfg.shots + 1), desc="sparsity shots", disable=not progress)
    for t in bar:
        t0 = time.perf_counter()
        fraction = t / cfg.shots
        if cfg.method == "surgeon":
            sweep_curvature(gm, calibration, cfg, t, progress=progress)
        if cfg.method in ("sparsegpt", "wanda"):  # layer after layer, each on the already pruned layers' outputs
            layerwise = apply_sparsegpt_ if cfg.method == "sparsegpt" else apply_wanda_
            layerwise(
                gm,
                pattern,
                windows=calibration,
                ratio=target,
                fraction=fraction,
                prior=prior,
                batch_size=cfg.batch_size,
                precision=cfg.precision,
                progress=progress,
            )
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
                band=cfg.sparsity_band,
            )
            apply_masks_(gm, update=update, damping=cfg.damping, chunk_size=cfg.chunk_size, rows=cfg.sparsity_rows)
        prior = gm.meta[MASKS].masks
        if cfg.lora_steps:  # the low-rank correction, masked so that every removed entry stays zero
            low_rank_correction_(
                gm, calibration, cfg, t, keep_zeros=True, progress=progress, teacher=teacher, synthetic=synthetic
            )
        report = _report(work, params, name, cfg.method, target)
        if ckpt is not None:
            _save_shot(work, prior, t, cfg, ckpt)
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
