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
import math
import time
from pathlib import Path

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .ir import Plan
from .keys import CURVATURE, PLAN, SCORES, SOURCE
from .rundir import write_atomic
from .tracing import trace

__all__ = [
    "run_shots",
    "compose_plans",
    "share_parameters_",
    "sweep_curvature",
    "curvature_blocks",
    "curvature_and_costs",
]

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


def run_shots(
    work: nn.Module,
    calibration: torch.Tensor | None,
    cfg,
    *,
    progress: bool = True,
    on_shot=None,
    teacher=None,
    synthetic=None,
) -> Plan:
    """Compress ``work`` in place over ``cfg.shots`` shots; return the composed plan.

    Args:
        work: the model to compress (in place).
        calibration: (N, L) token windows for curvature methods; ``None`` for magnitude.
        cfg: a :class:`~surgeon_fx.api.CompressConfig`.
        progress: progress bars (shots and curvature sweeps).
        on_shot: optional callback ``on_shot(shot, model, plan)`` after every shot (e.g. evaluation).
        teacher: the frozen original model, for ``cfg.lora_loss`` other than ``"next_token"``.
        synthetic: windows of the teacher's own text (:func:`synthetic_windows`) that the correction
            trains on besides the calibration windows (``None``: none).
    """
    from .passes import annotate_groups, annotate_plan, annotate_scores, apply_plan, apply_plan_to_module_, get_groups
    from .passes.norms import rescale_norms_
    from .passes.obs import apply_obs_updates_

    gm = trace(work)
    prefix = gm.meta[SOURCE].prefix
    annotate_groups(gm, on_unknown=cfg.on_unknown)
    total0, linear0 = _counts(get_groups(gm))
    base0 = total0 if cfg.basis == "model" else linear0
    composed: Plan | None = None
    start_shot = 1
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    state = _read_state(ckpt) if ckpt is not None else None
    if state is not None:
        composed, start_shot, gm = _resume(work, ckpt, cfg, state)
    timings: list[dict[str, float]] = []
    work._surgeon_fx_timings = timings  # grows shot by shot (readable from on_shot)
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
            curvature_and_costs(gm, calibration, cfg, t, progress=progress, clock=clock)
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
        new = apply_plan(gm, plan, share=True)  # untouched weights are not cloned: shared with `work` below
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
        if t < cfg.shots or cfg.lora_steps:  # the next shot (and the correction) analyse the smaller graph
            annotate_groups(gm, on_unknown=cfg.on_unknown)
            clock("groups")
        if cfg.lora_steps:  # the paper's interleaved low-rank first-order correction; gm shares work's weights
            low_rank_correction_(gm, calibration, cfg, t, progress=progress, teacher=teacher, synthetic=synthetic)
            clock("lora")
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
            _save(work, composed, t, ckpt, cfg)
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


def _schedule_fraction(cfg, shot: int) -> float:
    """How far shot ``shot`` (1-based, of ``cfg.shots``) lies along a schedule over the shots: 0 at the
    first shot (and for a single shot), 1 at the last."""
    return (shot - 1) / (cfg.shots - 1) if cfg.shots > 1 else 0.0


def next_token_share(cfg, shot: int) -> float:
    """The next-token loss's share in shot ``shot``'s correction (1-based, of ``cfg.shots``): 0 unless
    ``cfg.lora_loss`` is "distill+next_token"; then ``cfg.lora_next_token_weight``, or, with
    ``cfg.lora_next_token_weight_end``, the straight line from that weight at shot 1 to the end weight at
    the last shot."""
    if cfg.lora_loss != "distill+next_token":
        return 0.0
    start, end = cfg.lora_next_token_weight, cfg.lora_next_token_weight_end
    if end is None:
        return float(start)
    return float(start + (end - start) * _schedule_fraction(cfg, shot))


def correction_rate(cfg, shot: int) -> float:
    """The correction's learning rate in shot ``shot`` (1-based, of ``cfg.shots``): ``cfg.lora_lr``, or,
    with ``cfg.lora_lr_end``, the geometric path from ``cfg.lora_lr`` at shot 1 to that rate at the last."""
    start, end = cfg.lora_lr, cfg.lora_lr_end
    if end is None:
        return float(start)
    return float(start * (end / start) ** _schedule_fraction(cfg, shot))


def _split_holdout(calibration: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(train, holdout)``: the calibration windows the correction trains on, and its last
    ``cfg.lora_holdout`` windows held out as its guard (``None`` without a guard)."""
    held = cfg.lora_holdout
    return (calibration[:-held], calibration[-held:]) if held else (calibration, None)


def _correct(gm: fx.GraphModule, calibration, cfg, head: str, *, notes=(), progress=True, extra=None, **options):
    """:func:`~surgeon_fx.passes.lora.apply_low_rank_correction_` on ``calibration`` with ``cfg``'s batch
    size and precision, its held-out guard split off (:func:`_split_holdout`), the windows ``extra``
    (if any) trained on too, ``options`` for the rest; logs ``head`` with the training loss over the
    first and the last steps, ``notes`` (``(format, value)`` pairs) and the held-out loss. Returns the
    :class:`~surgeon_fx.passes.lora.Correction`."""
    from .passes.lora import apply_low_rank_correction_

    train, holdout = _split_holdout(calibration, cfg)
    if extra is not None:
        train = torch.cat([train, extra.to(train.device)])
    done = apply_low_rank_correction_(
        gm,
        train,
        batch_size=cfg.lora_batch_size,
        micro_batch_size=cfg.batch_size,
        precision=cfg.precision,
        holdout=holdout,
        progress=progress,
        **options,
    )
    losses = done.losses
    k = max(1, min(4, len(losses) // 2))  # steps see different windows: average a few at each end
    msg = head + ": %d steps, training loss %.4f (first %d) -> %.4f (last %d)"
    args = [len(losses), sum(losses[:k]) / k, k, sum(losses[-k:]) / k, k]
    for fmt, value in notes:
        msg += ", " + fmt
        args.append(value)
    if holdout is not None:
        msg += ", held-out loss %.4f -> %.4f, %s"
        args += [done.holdout_before, done.holdout_after]
        args += [f"merged the update after step {done.kept_step}" if done.kept else "not merged"]
    log.info(msg, *args)
    return done


def adapt_(work: nn.Module, calibration, cfg, *, progress: bool = True):
    """Adapt the unpruned ``work`` to the calibration text before the first shot: ``cfg.adapt_steps``
    Adam steps of a rank-``cfg.adapt_rank`` correction on the next-token loss at ``cfg.adapt_lr``, merged
    into ``work``'s weights (the correction's batch, precision and held-out guard, seed ``cfg.seed``);
    logged like a shot's correction. Returns the :class:`~surgeon_fx.passes.lora.Correction`."""
    from .passes import annotate_groups

    gm = trace(work)  # shares work's parameters: the merged update is work's
    annotate_groups(gm)
    head = "adaptation of the unpruned model (next-token loss)"
    opts = dict(steps=cfg.adapt_steps, rank=cfg.adapt_rank, lr=cfg.adapt_lr, seed=cfg.seed)
    return _correct(gm, calibration, cfg, head, progress=progress, **opts)


SYNTHETIC_PROMPT = 16
"""Tokens of a calibration window that start each synthetic window (:func:`synthetic_windows`)."""


def synthetic_windows(model: nn.Module, calibration: torch.Tensor, cfg, *, progress: bool = True) -> torch.Tensor:
    """``cfg.lora_synthetic`` windows of ``model``'s own text for the distilled correction, as long as
    the calibration windows: each starts with the first :data:`SYNTHETIC_PROMPT` tokens of a training
    calibration window (in turn; the ``cfg.lora_holdout`` held-out ones never) and goes on by
    sampling from ``model`` (:func:`surgeon_fx.data.sample_windows`, seed ``cfg.seed``,
    ``cfg.lora_synthetic_batch_size`` windows at once, by default ``8 * cfg.lora_batch_size``, whose
    key/value caches are far smaller than a training step's activations). Logged with the time it took."""
    from .data import sample_windows

    train, _ = _split_holdout(calibration, cfg)
    length = train.shape[1]
    rows = torch.arange(cfg.lora_synthetic) % len(train)
    prompts = train[rows, : min(SYNTHETIC_PROMPT, length - 1)]
    t0 = time.perf_counter()
    out = sample_windows(
        model,
        prompts,
        length,
        seed=cfg.seed,
        batch_size=cfg.lora_synthetic_batch_size or 8 * cfg.lora_batch_size,
        precision=cfg.precision,
        progress=progress,
    )
    log.info(
        "synthetic windows: %d of %d tokens sampled from the teacher in %.1f s",
        len(out),
        length,
        time.perf_counter() - t0,
    )
    return out


SYNTHETIC_FILE = "synthetic.pt"
"""Where a run with ``checkpoint_dir`` keeps its synthetic windows (:func:`teacher_windows`)."""


def synthetic_key(calibration: torch.Tensor, cfg) -> dict:
    """What the synthetic windows depend on besides the model: the options of the adaptation (the
    teacher) and of the sampling, and the calibration windows (their SHA-256)."""
    import hashlib

    keys = ("seed", "precision", "batch_size", "lora_batch_size", "lora_holdout", "lora_synthetic")
    keys += ("lora_synthetic_batch_size", "adapt_steps", "adapt_lr", "adapt_rank")
    digest = hashlib.sha256(calibration.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return {k: getattr(cfg, k) for k in keys} | {"calibration": f"{tuple(calibration.shape)} {digest}"}


def teacher_windows(model: nn.Module, calibration: torch.Tensor, cfg, *, progress: bool = True) -> torch.Tensor:
    """:func:`synthetic_windows`, kept in ``cfg.checkpoint_dir`` (:data:`SYNTHETIC_FILE`, written
    atomically) when the run has one: a resumed run reads them back instead of sampling again, if they
    were sampled with the same options and calibration windows (:func:`synthetic_key`); otherwise it
    samples and replaces the file. Under ``torch.distributed`` rank 0 samples (and reads and writes the
    file) and every rank trains on its windows (:func:`surgeon_fx.launch.from_rank0`)."""
    from .launch import from_rank0

    path = Path(cfg.checkpoint_dir) / SYNTHETIC_FILE if cfg.checkpoint_dir else None

    def sample():
        if path is None:
            return synthetic_windows(model, calibration, cfg, progress=progress)
        key = synthetic_key(calibration, cfg)
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if isinstance(saved, dict) and saved.get("key") == key:
                log.info("synthetic windows: %d of %d tokens read from %s", *saved["windows"].shape, path)
                return saved["windows"]
        out = synthetic_windows(model, calibration, cfg, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: torch.save({"key": key, "windows": out}, tmp))
        return out

    return from_rank0(sample)


def low_rank_correction_(
    gm: fx.GraphModule,
    calibration,
    cfg,
    shot: int,
    *,
    keep_zeros=False,
    progress=True,
    teacher=None,
    synthetic=None,
):
    """Shot ``shot``'s low-rank correction with ``cfg``'s steps, rank, batch size and precision (seed +
    shot; the rate :func:`correction_rate`), distilled from ``teacher`` under ``cfg.lora_loss`` "distill"
    (mixed with the next-token loss under "distill+next_token", its share :func:`next_token_share`), the
    last ``cfg.lora_holdout`` windows held out as its guard, the 1-D parameters trained too under
    ``cfg.lora_norms``, the ``synthetic`` windows (the teacher's own text) trained on besides the
    calibration windows; logs its training loss over the first and the last steps (and the held-out loss),
    and the shot's rate and share when they follow a schedule over the shots."""
    if cfg.lora_loss != "next_token" and teacher is None:
        raise ValueError(f"lora_loss={cfg.lora_loss!r} needs the original model as teacher (compress passes it)")
    lr, share = correction_rate(cfg, shot), next_token_share(cfg, shot)
    notes = [("lr %.3g", lr)] if cfg.lora_lr_end is not None else []
    if cfg.lora_next_token_weight_end is not None:
        notes.append(("next-token share %.3f", share))
    _correct(
        gm,
        calibration,
        cfg,
        f"shot {shot} correction",
        notes=notes,
        progress=progress,
        steps=cfg.lora_steps,
        rank=cfg.lora_rank,
        lr=lr,
        seed=cfg.seed + shot,
        keep_zeros=keep_zeros,
        teacher=teacher if cfg.lora_loss != "next_token" else None,
        next_token_weight=share,
        norms=cfg.lora_norms,
        schedule=cfg.lora_schedule,
        extra=synthetic,
    )


def sweep_curvature(
    gm: fx.GraphModule, calibration: torch.Tensor, cfg, shot: int, *, progress: bool = True, layers=None
) -> None:
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
        layers=layers,
    )


def _factor_bytes(lay, max_dense: int) -> tuple[int, int]:
    """float32 bytes of a layer's ``A`` and ``G`` as the sweep stores them (large sides diagonal)."""
    a = lay.cols if lay.cols > max_dense or lay.layout == "embedding" else lay.cols**2
    g = lay.rows if lay.rows > max_dense else lay.rows**2
    return 4 * a, 4 * g


def curvature_blocks(gm: fx.GraphModule, max_memory: int | None, *, keep_g: bool = False, max_dense: int | None = None):
    """Split the layers into contiguous blocks whose curvature fits ``max_memory`` bytes.

    Every layer's ``A`` stays alive (the column update needs it after the plan); the ``G`` of one
    block at a time (of all blocks with ``keep_g``, for row updates), plus room for the float64
    inverse of the largest dense factor. Returns ``(blocks, cache_bytes)``: lists of layer names
    in graph order, and the bytes left for cached inverses (``None``: no bound).

    Raises:
        ValueError: ``max_memory`` cannot hold even the ``A`` factors and one layer's ``G``,
            naming the least that would do.
    """
    from .passes.curvature import MAX_DENSE, find_layers

    max_dense = MAX_DENSE if max_dense is None else max_dense
    layers = [lay for lay, _ in find_layers(gm).values()]
    if max_memory is None:
        return [[lay.node for lay in layers]], None
    a_bytes: dict[str, int] = {}
    g_bytes: dict[str, int] = {}
    side = 0
    for lay in layers:
        a, g = _factor_bytes(lay, max_dense)
        a_bytes[lay.a_key], g_bytes[lay.node] = a, g
        dense_sides = [n for n, nbytes in ((lay.cols, a), (lay.rows, g)) if nbytes == 4 * n * n]
        side = max([side, *dense_sides])
    transient = 32 * side * side  # float64 copy, damped matrix, Cholesky factor and inverse
    fixed = sum(a_bytes.values()) + transient + (sum(g_bytes.values()) if keep_g else 0)
    room = max_memory - fixed
    biggest = 0 if keep_g else max(g_bytes.values(), default=0)
    if room < biggest:
        raise ValueError(
            f"max_memory={_mb(max_memory)} cannot hold this model's curvature: the input factors A "
            f"take {_mb(sum(a_bytes.values()))}, the largest output factor G {_mb(biggest)} and an inverse "
            f"{_mb(transient)}; pass at least max_memory='{_mb(fixed + biggest, up=True).replace(' ', '')}'"
        )
    if keep_g:
        return [[lay.node for lay in layers]], room
    blocks: list[list[str]] = [[]]
    used = 0
    for lay in layers:
        if blocks[-1] and used + g_bytes[lay.node] > room:
            blocks.append([])
            used = 0
        blocks[-1].append(lay.node)
        used += g_bytes[lay.node]
    peak = max(sum(g_bytes[n] for n in b) for b in blocks)
    return blocks, room - peak


def _mb(n: int, up: bool = False) -> str:
    """Bytes as megabytes with two decimals (rounded up with ``up``), e.g. ``'1234.57 MB'``."""
    v = n / 1e6
    return f"{math.ceil(v * 100) / 100 if up else v:.2f} MB"


def curvature_and_costs(gm: fx.GraphModule, calibration, cfg, shot: int, *, progress: bool = True, clock=None):
    """The curvature sweep(s) and ``annotate_costs`` of one shot, block by block under ``cfg.max_memory``.

    With one block this is ``sweep_curvature`` then ``annotate_costs``. With several, block ``b``'s
    sweep collects the factors of its layers only, its costs add to the scores, and its ``G``
    factors are freed (kept for row updates); the merged curvature (every ``A``) stays on ``gm``
    for the OBS update. K-FAC is block-diagonal across layers, so the scores and the plan equal
    those of one sweep (up to float summation order).
    """
    from .keys import CURVATURE
    from .passes.curvature import get_curvature
    from .passes.obs import annotate_costs

    keep_g = cfg.update in ("rows", "both") and cfg.method == "surgeon"
    blocks, cache = curvature_blocks(gm, cfg.max_memory, keep_g=keep_g)
    if len(blocks) > 1:
        log.info(
            "shot %d: curvature in %d blocks of layers to stay within max_memory=%s",
            shot,
            len(blocks),
            _mb(cfg.max_memory),
        )
    merged = None
    for b, names in enumerate(blocks):
        sweep_curvature(gm, calibration, cfg, shot, progress=progress, layers=None if len(blocks) == 1 else names)
        curv = get_curvature(gm)
        if merged is None:
            merged = curv
            merged.cache_bytes = cache
        else:
            for name in names:
                lay = curv.layers[name]
                merged.layers[name].g = lay.g
                merged.a.setdefault(lay.a_key, curv.a[lay.a_key])
            merged.collected |= set(names)
            gm.meta[CURVATURE] = merged
        if clock is not None:
            clock("curvature")
        annotate_costs(
            gm,
            method=cfg.method,
            damping=cfg.damping,
            update=cfg.update,
            sides=cfg.sides,
            layers=None if len(blocks) == 1 else names,
            accumulate=b > 0,
        )
        if len(blocks) > 1 and not keep_g:
            for name in names:
                merged.layers[name].g = None
            for key in [k for k in merged.inverses if k[0] == "g"]:
                del merged.inverses[key]
        if clock is not None:
            clock("costs")


CORRECTION_KEYS = (
    "lora_steps",
    "lora_rank",
    "lora_lr",
    "lora_lr_end",
    "lora_loss",
    "lora_batch_size",
    "lora_holdout",
    "lora_norms",
    "lora_schedule",
    "lora_next_token_weight",
    "lora_next_token_weight_end",
    "adapt_steps",
    "adapt_lr",
    "adapt_rank",
    "lora_synthetic",
    "lora_synthetic_batch_size",
)
"""The low-rank correction's options (and the adaptation's before the first shot), which structured and
sparsity checkpoints both record."""

RUN_KEYS = (
    "ratio",
    "method",
    "basis",
    "kinds",
    "min_atoms",
    "seed",
    "uniform",
    "multiple",
    "shots",
    "fisher",
    "damping",
    "update",
    "sides",
    "rescale_norms",
    *CORRECTION_KEYS,
)
"""The options a structured checkpoint must share with the run that resumes it."""


def _run_state(cfg) -> dict:
    return json.loads(json.dumps({k: getattr(cfg, k) for k in RUN_KEYS}))  # tuples as lists, as read back


def _save(work: nn.Module, plan: Plan, shot: int, ckpt: Path, cfg) -> None:
    """Write the shot's weights with the composed plan in their metadata: replacing
    ``weights.safetensors`` commits the shot in one step, so a crash leaves the previous shot or this
    one, never a mix. ``state.json`` mirrors the state for people (resume reads the weights' metadata).
    Rank 0 only under ``torch.distributed``: every rank holds the same state, and ranks writing one
    folder would race."""
    from safetensors.torch import save_model

    from .launch import is_main

    if not is_main():
        return

    ckpt.mkdir(parents=True, exist_ok=True)
    state = json.dumps({"shot": shot, "plan": plan.to_dict(), "config": _run_state(cfg)})
    write_atomic(ckpt / "weights.safetensors", lambda tmp: save_model(work, str(tmp), metadata={STATE_KEY: state}))
    write_atomic(ckpt / "state.json", lambda tmp: tmp.write_text(state))


STATE_KEY = "surgeon_fx_state"
"""Metadata key of a structured checkpoint's ``weights.safetensors`` that holds its shot, plan and options."""


def checkpoint_metadata(path: Path, key: str) -> str | None:
    """Metadata entry ``key`` of the safetensors file ``path`` (``None``: no such entry)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(key)


ADDED_LATER = {
    "lora_holdout": 0,
    "lora_norms": False,
    "lora_schedule": "constant",
    "lora_next_token_weight": 0.5,
    "lora_next_token_weight_end": None,
    "lora_lr_end": None,
    "adapt_steps": 0,
    "adapt_lr": 3e-4,
    "adapt_rank": 32,
    "lora_synthetic": 0,
    "lora_synthetic_batch_size": None,
}
"""Options added after checkpoints first recorded theirs, each with the value that does what a run
before it did: a checkpoint that lacks one was written with that value."""


def unused_options(options: dict) -> set[str]:
    """The correction options in ``options`` that change nothing given the others: the low-rank
    correction's when ``lora_steps`` is 0 (except its batch size and held-out guard, which an adaptation
    uses too), the adaptation's rate and rank when ``adapt_steps`` is 0 and the synthetic windows' batch
    size when ``lora_synthetic`` is 0."""
    unused = set()
    if not options.get("lora_steps"):
        unused |= {k for k in CORRECTION_KEYS if k.startswith("lora_") and k != "lora_steps"}
        if options.get("adapt_steps"):
            unused -= {"lora_batch_size", "lora_holdout"}
    if not options.get("adapt_steps"):
        unused |= {"adapt_lr", "adapt_rank"}
    if not options.get("lora_synthetic"):
        unused |= {"lora_synthetic_batch_size"}
    return unused


def refuse_other_run(what: str, ckpt: Path, saved: dict, want: dict) -> None:
    """Raise when the options ``saved`` with a checkpoint differ from this run's ``want`` (an option
    missing from ``saved`` that is in :data:`ADDED_LATER` reads as its value there; an option that
    changes nothing in both runs, :func:`unused_options`, may differ)."""
    had = ADDED_LATER | saved
    free = unused_options(had) & unused_options(want)
    diff = sorted(k for k in want if k not in free and had.get(k) != want[k])
    if diff:
        raise ValueError(
            f"the {what} in {ckpt} was written by another run (it differs in {diff}: "
            f"{ {k: had.get(k) for k in diff} }, this run: { {k: want[k] for k in diff} }); "
            "pass another checkpoint_dir or delete that folder"
        )


def _read_state(ckpt: Path) -> dict | None:
    """The committed state of a structured checkpoint (``None``: nothing committed there)."""
    path = ckpt / "weights.safetensors"
    if not path.is_file():
        return None
    meta = checkpoint_metadata(path, STATE_KEY)
    if meta is None:  # written before the state moved into the weights' metadata
        return json.loads((ckpt / "state.json").read_text())
    return json.loads(meta)


def _resume(work: nn.Module, ckpt: Path, cfg, state: dict):
    """Rebuild the shapes of the last finished shot on ``work`` and load its weights."""
    from safetensors.torch import load_model

    from .passes import annotate_groups, apply_plan, apply_plan_to_module_

    want = _run_state(cfg)
    refuse_other_run("checkpoint", ckpt, state.get("config", want), want)  # older checkpoints kept no options
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
