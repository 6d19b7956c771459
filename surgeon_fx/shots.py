"""Multi-shot compression: fresh curvature on the current, already smaller model every shot.

Reads: a model (modified in place; ``compress`` hands it a private copy), calibration windows and
a :class:`~surgeon_fx.api.CompressConfig`. Writes: the model's parameters and shapes, optional
per-shot checkpoints. Invariant: shot t of T removes what reaches ``ratio * t / T`` of the
*original* parameter count (linear schedule); each shot is trace/analyse -> curvature -> costs ->
plan -> OBS update -> rewrite, and the composed plan maps the final model to the original one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .ir import Plan
from .keys import CURVATURE, PLAN, SCORES, SOURCE
from .tracing import trace

__all__ = ["run_shots", "compose_plans", "share_parameters_", "sweep_curvature"]

log = logging.getLogger("surgeon_fx")


def compose_plans(first: Plan, later: Plan) -> Plan:
    """The plan that maps the original model to the result of applying ``first`` then ``later``."""
    keep = {p: dict(axes) for p, axes in first.keep.items()}
    for p, axes in later.keep.items():
        for ax, kept in axes.items():
            prev = keep.get(p, {}).get(ax)
            keep.setdefault(p, {})[ax] = tuple(prev[i] for i in kept) if prev is not None else tuple(kept)
    removed = {
        g: tuple(first.removed.get(g, ())) + tuple(later.removed.get(g, ())) for g in {*first.removed, *later.removed}
    }
    return Plan(
        keep=keep,
        removed=removed,
        params_before=first.params_before,
        params_after=later.params_after,
        linear_before=first.linear_before,
        linear_after=later.linear_after,
        target=later.target,
        basis=later.basis,
        method=later.method,
    )


def share_parameters_(gm: fx.GraphModule, model: nn.Module, prefix: str) -> None:
    """Point every parameter of ``gm`` at the parameter of ``model`` with the same FQN."""
    for name, _ in list(gm.named_parameters(remove_duplicate=False)):
        fqn = name[len(prefix) :] if name.startswith(prefix) else name
        owner, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, attr, model.get_parameter(fqn))


def _counts(analysis) -> tuple[int, int]:
    return sum(analysis.param_numel.values()), sum(analysis.param_numel[p] for p in analysis.linear_params)


def run_shots(work: nn.Module, calibration: torch.Tensor | None, cfg, *, progress: bool = True, on_shot=None) -> Plan:
    """Compress ``work`` in place over ``cfg.shots`` shots; return the composed plan.

    Args:
        work: the model to compress (in place).
        calibration: (N, L) token windows for curvature methods; ``None`` for magnitude.
        cfg: a :class:`~surgeon_fx.api.CompressConfig`.
        progress: progress bars (shots and curvature sweeps).
        on_shot: optional callback ``on_shot(shot, model, plan)`` after every shot (e.g. evaluation).
    """
    from .passes import annotate_groups, annotate_plan, annotate_scores, apply_plan, apply_plan_to_module_, get_groups
    from .passes.norms import rescale_norms_
    from .passes.obs import annotate_costs, apply_obs_updates_

    gm = trace(work)
    prefix = gm.meta[SOURCE].prefix
    annotate_groups(gm, on_unknown=cfg.on_unknown)
    total0, linear0 = _counts(get_groups(gm))
    base0 = total0 if cfg.basis == "model" else linear0
    composed: Plan | None = None
    start_shot = 1
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if ckpt is not None and (ckpt / "state.json").exists():
        composed, start_shot, gm = _resume(work, ckpt, cfg)
    timings: list[dict[str, float]] = []
    bar = tqdm(range(start_shot, cfg.shots + 1), desc="shots", disable=not progress)
    for t in bar:
        t0 = time.perf_counter()
        clock = _Clock(gm)
        analysis = get_groups(gm)
        total, linear = _counts(analysis)
        current = total if cfg.basis == "model" else linear
        goal_removed = cfg.ratio * t / cfg.shots * base0 - (base0 - current)
        ratio_t = min(max(goal_removed / current, 0.0), 0.999) if current else 0.0
        if cfg.method == "magnitude":
            annotate_scores(gm, method="magnitude")
            clock("scores")
        else:
            sweep_curvature(gm, calibration, cfg, t, progress=progress)
            clock("curvature")
            annotate_costs(gm, method=cfg.method, damping=cfg.damping, update=cfg.update, sides=cfg.sides)
            clock("costs")
        if cfg.uniform:
            from .passes.uniform import make_uniform_plan

            plan = make_uniform_plan(
                analysis,
                gm.meta[SCORES],
                ratio_t,
                basis=cfg.basis,
                kinds=cfg.kinds,
                multiple=cfg.multiple,
                min_atoms=cfg.min_atoms,
            )
        else:
            annotate_plan(gm, ratio_t, basis=cfg.basis, kinds=cfg.kinds, min_atoms=cfg.min_atoms)
            plan = gm.meta[PLAN]
        clock("plan")
        if cfg.method == "surgeon" and cfg.update != "none":
            apply_obs_updates_(
                gm,
                plan,
                damping=cfg.damping,
                rows=cfg.update in ("rows", "both"),
                cols=cfg.update in ("columns", "both"),
            )
            clock("update")
        if cfg.rescale_norms:
            rescale_norms_(gm, plan)
        gm.meta.pop(CURVATURE, None)  # free the factors (and their inverses) before the rewrite
        new = apply_plan(gm, plan)
        clock("rewrite")
        if cfg.output == "module" or t < cfg.shots:
            apply_plan_to_module_(work, plan, old=gm, new=new)
            share_parameters_(new, work, prefix)
            clock("module")
        composed = plan if composed is None else compose_plans(composed, plan)
        composed = dataclasses.replace(
            composed, params_before=total0, linear_before=linear0, target=cfg.ratio, basis=cfg.basis, method=cfg.method
        )
        gm = new
        if t < cfg.shots:  # the next shot analyses the smaller graph
            annotate_groups(gm, on_unknown=cfg.on_unknown)
            clock("groups")
        dt = time.perf_counter() - t0
        log.info(
            "shot %d/%d: %.1f%% of %s parameters removed (%s left), %.1fs (%s)",
            t,
            cfg.shots,
            100 * (composed.ratio if cfg.basis == "model" else composed.linear_ratio),
            cfg.basis,
            f"{composed.params_after:,}",
            dt,
            clock.summary(),
        )
        timings.append(clock.seconds)
        bar.set_postfix(removed=f"{100 * composed.ratio:.1f}%", seconds=f"{dt:.1f}")
        if ckpt is not None:
            _save(work, composed, t, ckpt)
        if on_shot is not None:
            on_shot(t, work if cfg.output == "module" else gm, composed)
    if composed is None:
        raise ValueError("no shot ran: shots must be >= 1")
    work._surgeon_fx_graph = gm if cfg.output == "graph" else None
    work._surgeon_fx_timings = timings
    return composed


class _Clock:
    """Seconds per stage of one shot (device work is synchronised so each stage owns its time)."""

    def __init__(self, gm: fx.GraphModule):
        p = next(iter(gm.parameters()), None)
        self.cuda = p is not None and p.is_cuda
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())


def sweep_curvature(gm: fx.GraphModule, calibration: torch.Tensor, cfg, shot: int, *, progress: bool = True) -> None:
    """``annotate_curvature`` with the config's sweep options; labels seeded by ``cfg.seed + shot``."""
    from .passes.curvature import annotate_curvature

    annotate_curvature(
        gm,
        calibration,
        fisher=cfg.fisher,
        batch_size=cfg.batch_size,
        seed=cfg.seed + shot,
        precision=cfg.precision,
        progress=progress,
    )


def _save(work: nn.Module, plan: Plan, shot: int, ckpt: Path) -> None:
    from safetensors.torch import save_model

    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "weights.safetensors.tmp"
    save_model(work, str(tmp))
    tmp.replace(ckpt / "weights.safetensors")
    state = {"shot": shot, "plan": plan.to_dict()}
    (ckpt / "state.json.tmp").write_text(json.dumps(state))
    (ckpt / "state.json.tmp").replace(ckpt / "state.json")


def _resume(work: nn.Module, ckpt: Path, cfg):
    """Rebuild the shapes of the last finished shot on ``work`` and load its weights."""
    from safetensors.torch import load_model

    from .passes import annotate_groups, apply_plan, apply_plan_to_module_

    state = json.loads((ckpt / "state.json").read_text())
    plan = Plan.from_dict(state["plan"])
    gm = trace(work)
    annotate_groups(gm, on_unknown=cfg.on_unknown)
    new = apply_plan(gm, plan)
    apply_plan_to_module_(work, plan, old=gm, new=new)
    load_model(work, str(ckpt / "weights.safetensors"))
    share_parameters_(new, work, gm.meta[SOURCE].prefix)
    annotate_groups(new, on_unknown=cfg.on_unknown)
    log.info("resumed from %s after shot %d", ckpt, state["shot"])
    return plan, state["shot"] + 1, new
