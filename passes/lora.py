"""Low-rank first-order correction: LoRA steps on the calibration windows, merged into the weights.

The LLM Surgeon paper (van der Ouderaa et al., 2024, "interleaved low-rank first-order
corrections") optionally follows each pruning shot with a few first-order steps: every remaining
decoder weight ``W`` gets a low-rank update ``B A`` (``B`` starts at zero, so the first step starts
from the pruned model), trained by Adam on the next-token loss of the calibration data, and then
merged, ``W <- W + B A``. The second-order machinery prices removals one shot at a time under a
local quadratic model; these steps let the model move to the loss it actually has afterwards.
With a ``teacher`` (the unpruned model) the steps minimise the KL divergence from its predictions
instead of the next-token loss (distillation), or a weighted sum of the two (``next_token_weight``).

Reads: a graph called as ``gm(input_ids) -> logits`` and calibration windows. Writes: the decoder
linear weights of ``gm`` in place (the layers of :func:`~surgeon_fx.passes.sparsity.sparse_layers`:
never embeddings or the LM head; norm scales and biases, every 1-D parameter, only with ``norms=True``;
shapes never change; with ``keep_zeros`` their zero entries stay zero, so a sparse pattern survives).
Nothing else in the graph changes, so the pass composes with the others between shots. Invariant:
with a fixed ``seed`` the window order and the adapters' initialisation are fixed (same seed, same
result on one device).

The adapters are trained through :func:`torch.func.functional_call` on the graph itself, with the
weights replaced by ``W + B A``: it works on any traced graph, including after structures were
removed, where a module-wrapping LoRA library would see no ``nn.Linear`` layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from surgeon_fx.api import LORA_SCHEDULES
from surgeon_fx.evaluate import _logits
from surgeon_fx.launch import rank_and_world
from surgeon_fx.tracing import is_hf_model

from .curvature import _check_windows, sweep_precision, with_precision
from .groups import get_groups
from .sparsity import sparse_layers

__all__ = ["apply_low_rank_correction_", "Correction"]


@dataclass
class Correction:
    """What one run of :func:`apply_low_rank_correction_` did.

    Attributes:
        losses: the training loss of every step, before its update.
        holdout_before, holdout_after: with ``holdout`` windows, their loss (the same loss as the
            training's) without and with the merged update (the best checked; equal to
            ``holdout_before`` when none was merged); ``None`` without them.
        kept_step: how many steps the merged update had trained (``len(losses)`` without
            ``holdout``; 0: nothing was merged).
    """

    losses: list[float] = field(default_factory=list)
    holdout_before: float | None = None
    holdout_after: float | None = None
    kept_step: int = 0

    @property
    def kept(self) -> bool:
        """Whether an update was merged into the weights."""
        return self.kept_step > 0


def apply_low_rank_correction_(
    gm: fx.GraphModule,
    windows: torch.Tensor,
    *,
    steps: int,
    rank: int | str = 8,
    lr: float = 3e-4,
    batch_size: int = 1,
    micro_batch_size: int | None = None,
    seed: int = 0,
    keep_zeros: bool = False,
    precision: str = "fp32",
    teacher: nn.Module | None = None,
    holdout: torch.Tensor | None = None,
    holdout_checks: int = 4,
    norms: bool = False,
    next_token_weight: float = 0.0,
    schedule: str = "constant",
    progress: bool = True,
) -> Correction:
    """Train rank-``rank`` updates of the decoder linear weights for ``steps`` Adam steps; merge them.

    Args:
        gm: an annotated graph (``annotate_groups``) called as ``gm(input_ids) -> logits``.
        windows: (N, L) calibration token ids; each step takes ``batch_size`` of them, in an order
            drawn from ``seed`` (one pass over them, then another order).
        steps: Adam steps (0: nothing happens).
        rank: rank of each weight's update, or ``"full"``: every entry of every decoder weight is
            trained directly (the update is a dense matrix, not ``B A``; masked fine-tuning of the
            remaining weights under ``keep_zeros``). ``"full"`` holds three float32 copies of the
            decoder weights (the update and Adam's two moments) and usually needs a lower ``lr``.
        lr: Adam's learning rate.
        batch_size: windows per step. micro_batch_size: windows per forward/backward (``None``:
            ``batch_size``); a step accumulates the gradients of ``ceil(batch_size /
            micro_batch_size)`` of them, each weighted by its share of the step's positions, so it
            trains the same as one pass (up to rounding) with the activations of fewer windows alive.
        seed: window order and the initialisation of ``A``.
        keep_zeros: every weight entry that is exactly zero when the pass starts stays exactly
            zero: the update is ``M * (B A)`` with ``M`` the mask of non-zero entries, in training
            and in the merge. For sparse models (unstructured or N:M), whose pattern it keeps.
        precision: arithmetic of the forward/backward, as the curvature sweep's
            (:func:`~surgeon_fx.passes.curvature.annotate_curvature`): ``"fp32"``, ``"tf32"``
            (TF32 matmuls on CUDA) or ``"mixed"`` (also attention in bfloat16). The adapters, Adam
            and the merge stay float32.
        teacher: ``None`` (default): the loss is the next-token cross-entropy of the windows. A
            model (e.g. the unpruned original; a Hugging Face causal LM or any module mapping ids to
            logits): the loss is the KL divergence from the teacher's predictive distribution to the
            graph's, ``KL(p_teacher || p)`` summed over the vocabulary and averaged over every
            position of the windows (distillation). It is zero, with zero gradient, where the graph
            already predicts as the teacher does. The teacher runs under ``torch.no_grad`` on the
            graph's device, as it is (put it in eval mode), in ``precision`` (its attention in
            bfloat16 under ``"mixed"`` when it is a traced graph); it is not changed.
        holdout: (K, L) held-out token ids (not trained on): early stopping. Their loss (the
            training loss) is measured before the first step and ``holdout_checks`` times during
            training (every ``ceil(steps / holdout_checks)`` steps and after the last); the update
            with the lowest held-out loss is merged, and none when no update beats the weights as
            they were. A guard against fitting ``windows`` at the expense of other text, which
            more steps, a higher rank or ``lr`` invite. ``None`` (default): the last update is
            always merged.
        holdout_checks: how many times training is checked against ``holdout`` (>= 1; 1: only
            after the last step). Each check keeps a copy of the trained update (for a rank ``r``
            update, ``r`` rows and columns per weight; for ``"full"``, one more copy of the weights).
        norms: also train every floating-point 1-D parameter of the graph (norm scales, biases) in
            full, not low rank: each gets a float32 update of its shape, starting at zero, trained
            by the same Adam (same ``lr``) alongside the adapters, masked under ``keep_zeros``,
            part of what ``holdout`` keeps and merged (``p += update``) exactly when the weights'
            update is. ``False`` (default): they are never written.
        next_token_weight: with a ``teacher``, the share ``w`` of the next-token cross-entropy in
            the loss: ``(1 - w) KL(p_teacher || p) + w CE`` (each the mean over its positions). 0
            (default): pure distillation; 1: the next-token loss alone (the teacher unused). Needs a
            teacher when not 0.
        schedule: Adam's learning rate over the ``steps``: ``"constant"`` (default: ``lr`` every
            step) or ``"cosine"`` (``lr (1 + cos(pi t / steps)) / 2`` at step ``t = 0 .. steps - 1``,
            :class:`torch.optim.lr_scheduler.CosineAnnealingLR` to 0: the full rate first, then ever
            smaller steps, so the update merged is not the noisy last iterate of a constant rate).
        progress: a progress bar over the steps.

    Returns:
        A :class:`Correction`: the training loss (mean next-token cross-entropy, or the mean KL
        divergence with a ``teacher``) of every step before its update, the held-out losses and
        whether the update was merged.

    Raises:
        ValueError: bad windows or options; no decoder linear layer in the graph; a non-finite loss.
    """
    _check_windows(windows)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1 or 'full', got {rank!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    micro = batch_size if micro_batch_size is None else micro_batch_size
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
        raise ValueError(f"micro_batch_size must be an int >= 1 or None, got {micro_batch_size!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module mapping token ids to logits, got {type(teacher).__name__}")
    hf = teacher is not None and is_hf_model(teacher)
    if isinstance(teacher, fx.GraphModule):
        teacher = with_precision(teacher, precision)
    run = with_precision(gm, precision)  # checks precision
    if holdout is not None:
        _check_windows(holdout)
    if isinstance(holdout_checks, bool) or not isinstance(holdout_checks, int) or holdout_checks < 1:
        raise ValueError(f"holdout_checks must be an int >= 1, got {holdout_checks!r}")
    if not isinstance(norms, bool):
        raise ValueError(f"norms must be True or False (train the 1-D parameters too), got {norms!r}")
    if isinstance(next_token_weight, bool) or not 0 <= next_token_weight <= 1:
        raise ValueError(f"next_token_weight must be a number in [0, 1], got {next_token_weight!r}")
    if next_token_weight and teacher is None:
        raise ValueError("next_token_weight mixes the next-token loss into distillation: it needs a teacher")
    if schedule not in LORA_SCHEDULES:
        raise ValueError(f"schedule must be one of {LORA_SCHEDULES}, got {schedule!r}")
    if steps == 0:
        return Correction()
    if rank_and_world()[1] > 1:
        raise ValueError("the low-rank correction does not run under torch.distributed yet; use one process")
    targets = get_groups(gm).param_targets
    names = sorted({targets[lay.weight] for lay in sparse_layers(gm)})
    if not names:
        raise ValueError("found no decoder linear layer to correct in this graph")
    gen = torch.Generator().manual_seed(seed)
    weights = {n: gm.get_parameter(n) for n in names}
    device = next(iter(weights.values())).device
    adapters: dict[str, tuple[torch.Tensor, ...]] = {}
    for n, w in weights.items():
        rows, cols = w.shape
        if rank == "full":  # the update itself is trained: Adam on W + D from D = 0 is Adam on W
            adapters[n] = (torch.zeros(rows, cols, dtype=torch.float32, device=device, requires_grad=True),)
            continue
        a = (torch.rand(rank, cols, generator=gen, dtype=torch.float32) * 2 - 1) / math.sqrt(cols)
        b = torch.zeros(rows, rank, dtype=torch.float32)
        adapters[n] = (a.to(device).requires_grad_(True), b.to(device).requires_grad_(True))
    if norms:  # every 1-D parameter (norm scales, biases) is trained whole: an update of its shape from 0
        for n, p in sorted(gm.named_parameters()):
            if p.ndim == 1 and p.is_floating_point():
                weights[n] = p
                adapters[n] = (torch.zeros_like(p, dtype=torch.float32).requires_grad_(True),)
    keep = {n: w.detach() != 0 for n, w in weights.items()} if keep_zeros else {}

    def delta(n: str) -> torch.Tensor:
        ab = adapters[n]
        d = (ab[0] if len(ab) == 1 else ab[1] @ ab[0]).to(weights[n].dtype)
        return d * keep[n] if keep_zeros else d

    frozen = {k: p.detach() for k, p in gm.named_parameters()}  # no gradients for the weights themselves

    def forward_loss(ids: torch.Tensor) -> torch.Tensor:
        params = dict(frozen)
        params.update({n: w.detach() + delta(n) for n, w in weights.items()})
        with sweep_precision(precision, device):
            logits = torch.func.functional_call(run, params, (ids,), strict=False)
            return _loss(logits, ids, teacher, hf, next_token_weight)

    def holdout_loss() -> float:  # the mean over every held-out window, in passes of ``micro`` windows
        with torch.no_grad():
            chunks = holdout.split(micro)
            return sum(len(c) * forward_loss(c.to(device)).item() for c in chunks) / len(holdout)

    result = Correction()
    best_step, best = steps, None  # without holdout: the last step's update
    if holdout is not None:
        result.holdout_before = best = holdout_loss()  # B = 0 (or D = 0): the weights as they are
        best_step = 0
        every = -(-steps // holdout_checks)
    opt = torch.optim.Adam([t for ab in adapters.values() for t in ab], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if schedule == "cosine" else None
    order: list[int] = []
    for step in tqdm(range(steps), desc="low-rank correction", disable=not progress, leave=False):
        while len(order) < batch_size:  # fewer windows than a step takes: a window may come twice
            order += torch.randperm(len(windows), generator=gen).tolist()
        pick, order = order[:batch_size], order[batch_size:]
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for at in range(0, batch_size, micro):  # gradient accumulation over micro-batches
            ids = windows[pick[at : at + micro]].to(device)
            share = len(ids) / len(pick)  # every window has the same positions: its share of the mean
            loss = forward_loss(ids)
            if not torch.isfinite(loss):
                raise ValueError(f"low-rank correction: the loss became {loss.item()} at step {step}; lower lr")
            step_loss += share * loss.item()
            with sweep_precision(precision, device):
                (share * loss).backward()
        result.losses.append(step_loss)
        opt.step()
        if sched is not None:
            sched.step()
        done = step + 1
        if holdout is not None and (done % every == 0 or done == steps):
            now = holdout_loss()
            if now < best:  # keep this update: the best held-out loss so far
                best, best_step = now, done
                if done < steps:  # the last step's update needs no copy: the adapters hold it
                    saved = {n: tuple(t.detach().clone() for t in ab) for n, ab in adapters.items()}
    if holdout is not None:
        result.holdout_after = best
        if best_step and best_step < steps:  # an earlier check won: its update is the one merged
            with torch.no_grad():
                for n, ab in adapters.items():
                    for t, kept in zip(ab, saved[n]):
                        t.copy_(kept)
    result.kept_step = best_step
    if best_step:
        with torch.no_grad():
            for n, w in weights.items():
                w.add_(delta(n))
    return result


_CHUNK_ENTRIES = 1 << 26  # logits entries per chunk of the loss: 256 MB of float32 intermediates


def _loss(
    logits: torch.Tensor, ids: torch.Tensor, teacher: nn.Module | None, hf: bool, next_token_weight: float = 0.0
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids``, or with a ``teacher`` the mean over every position
    of ``KL(p_teacher || p)``, or ``(1 - w) KL + w CE`` with ``next_token_weight`` ``w``.

    Computed in chunks of positions, each under activation checkpointing: the float32
    log-probabilities (and the teacher's) exist for one chunk at a time, in the forward and again
    in the backward, instead of several copies of the whole ``[windows, length, vocabulary]``
    logits. What autograd keeps is the logits themselves (and the teacher's); their gradient is one
    tensor of their size.
    """
    flat = logits.flatten(0, 1)
    total = flat.new_zeros((), dtype=torch.float32)
    if teacher is None or next_token_weight:  # the last position predicts nothing: ignored, no sliced copy
        targets = F.pad(ids[:, 1:], (0, 1), value=-100).flatten()
        count = ids.shape[0] * (ids.shape[1] - 1)
        share = 1.0 if teacher is None else next_token_weight
        total = total + share * _chunked_sum(_cross_entropy_sum, flat, targets) / count
    if teacher is not None and next_token_weight < 1:
        with torch.no_grad():
            other = _logits(teacher, ids, hf).flatten(0, 1)
        total = total + (1 - next_token_weight) * _chunked_sum(_kl_sum, flat, other) / flat.shape[0]
    return total


def _chunked_sum(piece, flat: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``piece(flat, other)`` summed over chunks of rows, each checkpointed when a gradient is wanted."""
    rows = max(1, _CHUNK_ENTRIES // flat.shape[-1])
    save = torch.is_grad_enabled() and flat.requires_grad
    total = flat.new_zeros((), dtype=torch.float32)
    for x, y in zip(flat.split(rows), other.split(rows)):
        total = total + (checkpoint(piece, x, y, use_reentrant=False) if save else piece(x, y))
    return total


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def _kl_sum(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``sum KL(p_teacher || p)`` over the rows."""
    target = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), target, log_target=True, reduction="sum")
