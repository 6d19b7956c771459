"""The public entry point: ``compress(model, ratio)``, a straight line through the passes.

Reads: the caller's model (never modified, unless ``compress(..., inplace=True)``). Writes: nothing
on disk, except per-shot checkpoints under ``checkpoint_dir``. Invariant: trace -> groups ->
scores -> plan -> rewrite, each stage public in :mod:`surgeon_fx.passes`; same seed, same result.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .ir import KINDS, Plan
from .keys import SurgeonError
from .tracing import trace

__all__ = [
    "CompressConfig",
    "compress",
    "prune",
    "check_model",
    "check_calibration",
    "METHODS",
    "SPARSE_METHODS",
    "SPARSITY_BAND",
]

METHODS = ("magnitude", "surgeon", "kobd", "lobd", "published")
"""Atom scoring methods: weight magnitude (no data), the LLM Surgeon's K-FAC costs with OBS updates,
the diagonal baselines K-OBD (1/2 W^2 G_rr A_cc) and L-OBD (1/2 W^2 A_cc), both without updates, and
``"published"``: the LLM Surgeon as its authors' code prunes structure (rows and columns of every
matrix scored and updated on their own, masked to zero, not coupled, no tensor shrinks;
:mod:`surgeon_fx.published`), the reference the coupled ``"surgeon"`` is measured against."""
CURVATURE_METHODS = ("surgeon", "kobd", "lobd", "published")
PRECISIONS = ("fp32", "tf32", "mixed")
LORA_LOSSES = ("next_token", "distill", "distill+next_token")
LORA_SCHEDULES = ("constant", "cosine")
"""Values of ``lora_schedule`` (and of :func:`surgeon_fx.passes.lora.apply_low_rank_correction_`'s
``schedule``): the correction's learning rate over each shot's steps."""
SPARSE_METHODS = ("surgeon", "magnitude", "wanda", "sparsegpt")
"""Methods for ``sparsity=``: the Surgeon's element costs with correlated OBS updates, per-layer
magnitude, Wanda (|W| * input norm per output row) and SparseGPT (layer-wise OBS, column by column)."""
SPARSITY_BAND = 0.1
"""The default ``sparsity_band`` of global unstructured ``"surgeon"`` sparsity (see :class:`CompressConfig`)."""


@dataclass(frozen=True)
class CompressConfig:
    """Everything that decides what ``compress`` removes (run-time inputs stay arguments).

    Attributes:
        ratio: fraction of parameters to remove, in [0, 1).
        method: how atoms are scored: ``"magnitude"``.
        basis: ``"model"`` (whole model) or ``"linear"`` (decoder linear layers, as papers count).
        kinds: structure kinds that may be removed: any of ``"heads"``, ``"mlp"``, ``"residual"``.
        min_atoms: atoms every group keeps (0 allows removing a layer's last head or unit).
        on_unknown: ``"error"`` or ``"freeze"`` for ops the dependency analysis has no rule for.
        seed: seed of every random choice (example inputs, sampling).
        output: ``"module"`` returns a smaller model of the input's class; ``"graph"`` returns the
            rewritten ``torch.fx.GraphModule`` (token ids -> logits), for models whose ``forward``
            computes sizes from attributes arithmetically, which the eager rewrite cannot follow.
        uniform: keep the same number of atoms in every group of a kind (same widths in every layer),
            so the checkpoint loads with stock ``from_pretrained`` (``surgeon_fx.passes.uniform``).
        multiple: with ``uniform``, round kept widths to a multiple of this many atoms.
        shots: number of shots of the linear schedule (default 1 for magnitude, 8 otherwise); the
            curvature is re-estimated on the already smaller model every shot.
        fisher: ``"empirical"`` (labels from the data) or ``"true"`` (labels sampled from the model).
        damping: K-FAC damping relative to each factor's mean diagonal.
        batch_size: calibration windows per forward/backward of the curvature sweep and of the
            correction (``lora_steps``): the memory knob; the sweep's result does not depend on it.
        precision: arithmetic of the curvature sweep and of the low-rank correction's steps:
            ``"fp32"``, ``"tf32"`` (TensorFloat-32 matmuls on CUDA for the forward/backward and the
            factor products) or ``"mixed"`` (``"tf32"`` plus attention cores in bfloat16); factors
            always accumulate in float32 buffers and inverses are float64; the correction's
            adapters and optimizer stay float32. The model's own weights and arithmetic are untouched.
        update: which second-order (OBS) updates ``"surgeon"`` applies to the remaining weights:
            ``"columns"`` (default: consumers compensate a removed input from correlated inputs),
            ``"rows"``, ``"both"`` or ``"none"``; costs of uncompensated sides assume fixed weights.
        sides: which member slices ``"surgeon"`` sums into an atom's cost: ``"all"`` (default: the
            producers' rows and the consumers' columns) or ``"consumers"`` (only the columns of
            the layers that read the structure); see :func:`surgeon_fx.passes.obs.annotate_costs`.
        rescale_norms: when residual channels go, scale RMS-normalisation weights by
            ``sqrt(n / (n - k))`` so the normalisation divides by the same statistic as before
            (:func:`surgeon_fx.passes.norms.rescale_norms_`).
        checkpoint_dir: save the model and composed plan after every shot there, and resume from it.
            With ``sparsity``, the sparsity shots save their weights and masks in its ``sparsity/``
            subfolder and resume from there too; a resumed run gives the same result. A checkpoint
            written with other options (ratio, method, shots, damping, correction, ...) is refused.
            Each shot is committed by replacing one file (the weights, with the state in their
            metadata), so an interrupted save leaves the previous shot intact.
        sparsity: ``None`` (structured only), ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``: at most
            N nonzeros in every M consecutive inputs) for the decoder linear weights, applied after
            the structured shots (``ratio`` may be 0); methods :data:`SPARSE_METHODS`. ``shots``
            sparsity shots follow a linear schedule; zeroed weights stay zero.
        sparsity_ratio: unstructured: fraction of decoder linear weights to zero (default 0.5);
            N:M: 1 - N/M (the default; another value is an error).
        chunk_size: ``"surgeon"`` sparsity solves the correlated update for at most this many
            weights at once (chunks of rows; memory ``8 * chunk_size^2`` bytes, time ``~chunk_size^2``).
        sparsity_scope: ``"surgeon"`` sparsity: ``"global"`` (one cost threshold over all layers, as
            the paper) or ``"layer"`` (the same sparsity in every layer, costs rank within a layer).
        sparsity_band: ``"surgeon"`` unstructured sparsity under ``"global"`` scope: every layer's
            share of zeros stays within ``sparsity_ratio +- sparsity_band`` (scaled by each shot's
            schedule); inside those bounds one cost threshold still allocates the zeros
            (:func:`surgeon_fx.passes.sparsity.annotate_masks`'s ``band``). ``None``: no bounds, one
            global threshold as the paper. ``"auto"`` (default): :data:`SPARSITY_BAND` (0.1) where a
            band applies (unstructured, ``"surgeon"``, ``"global"``), ``None`` elsewhere. Chosen by
            measurement: at 50% the paper's threshold left SmolLM2-135M's layers between 8% and 96%
            zeros; with 0.1 its WikiText-2 PPL fell 39.65 -> 36.88 on the GPU protocol (2 shots) and
            30.75 -> 30.16 after the distilled correction (``benchmarks/results/h200_session10/``;
            on CPU 46.04 -> 38.01, ``ablation_cpu_session9/``; 0.05 ties with 0.1 on both).
        sparsity_rows: ``"surgeon"`` sparsity: ``"coupled"`` (the paper's ``F = G (x) A``: costs and
            the correlated update through the full output factor), ``"independent"`` (``diag(G)``:
            each row's removals are compensated under ``A`` alone; see
            :data:`surgeon_fx.passes.sparsity.ROWS`), or ``"auto"`` (default): ``"independent"`` for
            unstructured sparsity, ``"coupled"`` for N:M, the better of the two in each setting on
            SmolLM2-135M (H200, ``benchmarks/results/h200_session4/``: unstructured 50% 39.65 vs
            78.93 PPL, 2:4 111.91 vs 92.69). ``"auto"`` is resolved when the config is made.
        max_memory: bound on the curvature state of a structured ``"surgeon"`` / ``"kobd"`` /
            ``"lobd"`` shot (bytes, or a string such as ``"40GB"``): the float32 K-FAC factors
            alive at once plus the cached float64 inverses. ``None`` (default): every factor of the
            model at once, one sweep per shot. Otherwise every layer's input factor ``A`` is kept
            and the output factors ``G`` are collected block by block (contiguous layers), one
            forward/backward sweep per block, each block's costs computed and its ``G`` freed
            before the next (:func:`surgeon_fx.shots.curvature_blocks`); inverses are cached only
            within what is left. The model and one batch's activations come on top of it.
        lora_steps: after every shot, this many Adam steps of a low-rank first-order correction
            (the paper's interleaved LoRA updates): each remaining decoder linear weight gets a
            rank-``lora_rank`` update trained on the next-token loss of the calibration windows
            (``lora_batch_size`` per step, order drawn from ``seed``) with learning rate ``lora_lr``,
            merged into the weight before the next shot
            (:func:`surgeon_fx.passes.lora.apply_low_rank_correction_`). After sparsity shots the
            update is masked, so every removed entry stays zero and an N:M pattern stays valid.
            ``0`` (default): none. Needs calibration; not with ``"published"`` (its masked weights
            would refill) and not under ``torch.distributed``. Costs one forward/backward per step.
        lora_batch_size: calibration windows per step of that correction (``None``, default:
            ``batch_size``). A step larger than ``batch_size`` accumulates gradients over forward/
            backward passes of ``batch_size`` windows: the same training with less memory.
        lora_holdout: the last this many calibration windows are held out from that correction
            (the curvature sweeps still use them) for early stopping: their loss is checked four
            times during each shot's steps and the update with the lowest one is merged, none if
            no update lowers it; the log line shows which (0, default: no guard).
        lora_norms: that correction also trains every 1-D parameter (the norms' scales, biases) in
            full, not low rank, alongside the adapters, with the same Adam and rate; merged with
            them, its zeros kept after sparsity shots (``False``, default: only the decoder linear
            weights change; :func:`surgeon_fx.passes.lora.apply_low_rank_correction_`'s ``norms``).
            No gain on the H200 protocols (``benchmarks/results/h200_session11/``): unstructured 50%
            30.20 against 30.16, 2:4 51.66 against 49.74, structured 90-50% 25.00 / 29.66 / 36.57 /
            48.95 / 73.18 against 24.80 / 29.31 / 36.23 / 48.71 / 71.71.
        lora_next_token_weight: under ``lora_loss="distill+next_token"``, the share ``w`` in (0, 1)
            of the next-token loss in the correction's loss (default 0.5: the mean of the two);
            unused by the other losses.
        lora_next_token_weight_end: under ``lora_loss="distill+next_token"``, the share at the last
            shot, a number in [0, 1): shot ``t`` of ``T`` then uses ``w + (w_end - w) (t - 1) / (T - 1)``
            with ``w = lora_next_token_weight`` at the first shot (``None``, default: ``w`` at every
            shot). ``0`` ends on pure distillation, for schedules where the mixed loss helps the mild
            early shots and distillation the severe late ones. On the H200
            (``benchmarks/results/h200_session13/``, 20 shots, 0.5 -> 0 at lr 5e-4) it gave 68.47 at
            50% (distilled 69.98; constant 0.5: 73.49), and 22.87 / 28.78 at 90 / 80%; with
            ``lora_lr_end`` (below) 67.90.
        lora_lr_end: that correction's learning rate at the last shot, > 0: shot ``t`` of ``T`` then
            uses ``lora_lr * (lora_lr_end / lora_lr) ** ((t - 1) / (T - 1))``, a geometric path from
            ``lora_lr`` at the first shot (``None``, default: ``lora_lr`` at every shot). With
            ``lora_next_token_weight_end`` it lets the mixed loss run at its best rate on the early
            shots and distillation at its own on the late ones (H200, ``benchmarks/results/h200_session13/``:
            the mixed loss best at lr 3e-4, distillation at 1e-3). On the H200 (20 shots,
            ``benchmarks/results/h200_session14/``) 3e-4 -> 1e-3 with the share 0.5 -> 0 gave 22.80 /
            28.70 / 35.95 / 48.04 / 67.90 at 90-50%, the best 50% measured.
        lora_schedule: that correction's learning rate over each shot's steps: ``"constant"``
            (default) or ``"cosine"`` (from ``lora_lr`` down to 0 by the shot's last step;
            :func:`surgeon_fx.passes.lora.apply_low_rank_correction_`'s ``schedule``). No gain on
            the H200 protocols (``benchmarks/results/h200_session12/``): structured 24.78 / 29.65
            against 24.64 / 29.45 at 90 / 80%, unstructured 50% 30.12 against 29.80, 2:4 50.84
            against 49.74.
        lora_rank, lora_lr: rank and Adam learning rate of that correction. SmolLM2-135M, 40 shots
            to 50% on an H200 (``benchmarks/results/h200_session6/``): 16 steps of 8 windows per
            shot at ``3e-4`` lowered the perplexity at 90/80/70/60/50% from 26.4/33.0/45.0/63.8/103.3
            to 23.7/28.9/37.6/53.6/77.3 (1e-3 not measured there). A CPU ablation with 4 shots
            (``benchmarks/results/ablation_cpu_session5/``, ``ablation_cpu_session6/``) gave 24.1/29.8
            at 90/80% with ``3e-4``, 23.2/29.8 with ``1e-3``, 24.7/31.4 with ``1e-4`` (none: 25.0/32.6).
            ``lora_rank="full"`` trains every remaining entry of the decoder weights directly (masked
            fine-tuning after sparsity shots) instead of a rank-limited update: three more float32
            copies of those weights in memory (the update, Adam's moments); use a lower ``lora_lr``.
            On SmolLM2-135M with the next-token loss it overfits the 128 calibration windows and is
            worse than rank 8 everywhere (``benchmarks/results/h200_session8/``); distilled it does
            not: structured at lr 1e-4 (20 shots of 32 steps) it gave the best 70% measured, 35.60
            (rank 32: 35.91), but 74.07 at 50% against 69.98 (``benchmarks/results/h200_session14/``).
        lora_loss: what that correction trains on: ``"next_token"`` (default; the cross-entropy of
            the calibration windows' next tokens, as the paper) or ``"distill"`` (the KL divergence
            from the original model's predictive distribution on the same windows; a frozen copy of
            ``model`` taken before the first shot is the teacher, which costs one more copy of the
            model in memory and one forward of it per step). On a CPU ablation it recovered about
            28% as much as ``"next_token"`` (``benchmarks/results/ablation_cpu_session7/``) in one
            pass over the windows; with many passes (8 windows, 16 passes, full rank) it did not
            overfit where ``"next_token"`` did (68.66 vs 272.10 after Wanda 2:4, none 141.44;
            ``benchmarks/results/ablation_cpu_session8/``). On the H200 (SmolLM2-135M, 2 sparse
            shots, 64 steps of 8 windows, rank 32, lr 1e-3) it gave the best sparse results measured,
            30.75 unstructured 50% and 51.07 in 2:4, where ``"next_token"`` overfit (60.96 in 2:4;
            ``benchmarks/results/h200_session9/``). ``"distill+next_token"``: both losses with the
            same teacher, ``(1 - w) KL + w CE`` with ``w = lora_next_token_weight``
            (:func:`surgeon_fx.passes.lora.apply_low_rank_correction_`'s ``next_token_weight``). On the H200 (20 shots of
            32 steps, rank 32, ``benchmarks/results/h200_session13/``) it gave the best 90% / 80%
            measured at lr 3e-4, 22.66 / 28.33, and was worse than ``"distill"`` below 80% at every
            rate tried (3e-4 to 1e-3).
        adapt_steps: before the first shot, this many Adam steps of the same kind of correction on the
            unpruned model's next-token loss of the calibration windows, merged (0, default: none;
            needs calibration).
            The pruned model then starts from the adapted one, and a distilled correction
            (``lora_loss`` other than ``"next_token"``) distils from the adapted model instead of the
            original: the teacher carries the adaptation to the calibration text, and the student's
            own loss needs no next-token share, which overfits the windows over many shots. Steps of
            ``lora_batch_size`` windows (passes of ``batch_size``) in ``precision``, seed ``seed``,
            the last ``lora_holdout`` windows held out as an early-stopping guard when set. On an
            H200 (SmolLM2-135M, 128 x 2048 Wikipedia windows, rank 32, 8 windows per step;
            ``benchmarks/results/h200_session14/dense_adapt_*``) 32 steps at lr 3e-4 lowered the
            unpruned model's WikiText-2 perplexity from 21.61 to 19.75 (16: 20.18, 64: 19.77, 128:
            20.10; at lr 1e-3 the windows were overfit after 16: 19.87, 128: 23.99). The adapted model
            is then the fairer reference for the compressed one's perplexity, so report both ratios.
            With the shots (``benchmarks/results/h200_session15/``, 32 steps, adapted model 19.80):
            structured, 20 shots, full rank distilled at lr 1e-4, 22.20 / 27.33 / 35.15 / 49.32 /
            83.97 at 90-50% against 24.85 / 28.79 / 35.60 / 46.90 / 74.07 without it: the best down
            to 70% measured, worse below (the shots overfit what the adapted teacher says about the
            calibration windows); unstructured 50% 28.88 (lr 3e-4 distilled) and 2:4 47.50.
            ``lora_synthetic`` (below) removes that overfitting.
        adapt_lr, adapt_rank: that adaptation's Adam learning rate (default 3e-4) and rank (default
            32, or ``"full"``).
        lora_synthetic: windows of the teacher's own text, sampled from it once before the first shot
            and trained on by every shot's distilled correction besides the calibration windows (0,
            default: none; needs ``lora_steps`` and ``lora_loss`` "distill" or "distill+next_token").
            Each starts with the first 16 tokens of a calibration window and goes on by sampling from
            the teacher (the adapted model with ``adapt_steps``) at temperature 1 to the calibration
            windows' length (:func:`surgeon_fx.data.sample_windows`; a transformers model samples with
            its key/value cache, ``lora_synthetic_batch_size`` windows at once). The teacher's predictions
            on its own text are as much the teacher as on the calibration text, so the student
            fits the teacher rather than 128 windows over many shots: data-free distillation (as
            in LLM-QAT) against the overfitting of long runs. CPU, SmolLM2-135M, 16 windows of 256
            tokens, 6 shots to 70% after 16 adaptation steps (``benchmarks/results/ablation_cpu_session15/``):
            64 such windows gave 23.77 / 32.84 / 41.87 at 90 / 80 / 70% against 24.62 / 32.84 /
            46.43; on a protocol too short to overfit they moved results by -3% to +4% either way.
            H200, SmolLM2-135M, 128 x 2048 windows (``benchmarks/results/h200_session16/``): 256
            such windows with 32 adaptation steps and the full-rank distilled correction at lr 1e-4
            (20 shots) gave 22.24 / 26.89 / 32.22 / 42.11 / 58.21 at 90-50%, the best at 80-50%
            measured (without them 22.20 / 27.33 / 35.15 / 49.32 / 83.97), and unstructured 50%
            28.58 (without: 28.88); sampling them took 540 s on a shared GPU. Session 17
            (``benchmarks/results/h200_session17/``): with them, unstructured 50% 27.66 with the
            full-rank correction at lr 1e-4 (4 shots of 64 steps) and 2:4 40.16 with rank 32 at lr
            3e-3 (2 shots of 256 steps; 47.50 without them at 128 steps, 41.76 with them at 128).
            Session 18 (``h200_session18/``): 512 windows, 2 shots of 384 steps at lr 2e-3 gave
            37.60 in 2:4 (256 steps: 38.92; 512 steps at lr 3e-3 with 256 windows 38.96).
            With ``checkpoint_dir`` they are kept there for a resumed run;
            ``compress(synthetic=...)`` takes them given.
        lora_synthetic_batch_size: how many of those windows are sampled at once (``None``, default:
            ``8 * lora_batch_size``). Each batch takes one model call per token, so larger batches
            sample faster where memory allows (their key/value caches grow with it); other values
            sample other windows (same seed and batch size, same windows). 256 windows of 2048 tokens
            for SmolLM2-135M: 144 s at 256 at once alone on an H200 (``h200_session17/``), about
            235 s at 64 (58.7 s per 64 in ``h200_session16/``).
    """

    ratio: float
    method: str = "magnitude"
    basis: str = "model"
    kinds: tuple[str, ...] = field(default=KINDS)
    min_atoms: int = 1
    on_unknown: str = "error"
    seed: int = 0
    output: str = "module"
    uniform: bool = False
    multiple: int = 1
    shots: int | None = None
    fisher: str = "empirical"
    damping: float = 0.01
    batch_size: int = 1
    precision: str = "fp32"
    update: str = "columns"
    sides: str = "all"
    rescale_norms: bool = True
    checkpoint_dir: str | None = None
    sparsity: str | None = None
    sparsity_ratio: float | None = None
    chunk_size: int = 1024
    sparsity_scope: str = "global"
    sparsity_rows: str = "auto"
    sparsity_band: float | str | None = "auto"
    max_memory: int | str | None = None
    lora_steps: int = 0
    lora_rank: int | str = 8
    lora_lr: float = 3e-4
    lora_lr_end: float | None = None
    lora_loss: str = "next_token"
    lora_batch_size: int | None = None
    lora_holdout: int = 0
    lora_norms: bool = False
    lora_schedule: str = "constant"
    lora_next_token_weight: float = 0.5
    lora_next_token_weight_end: float | None = None
    adapt_steps: int = 0
    adapt_lr: float = 3e-4
    adapt_rank: int | str = 32
    lora_synthetic: int = 0
    lora_synthetic_batch_size: int | None = None

    def __post_init__(self):
        from surgeon_fx.passes.plan import _check_ratio

        from .patterns import parse_sparsity

        _check_ratio(self.ratio)
        pattern = parse_sparsity(self.sparsity)
        if self.method not in METHODS + SPARSE_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS + SPARSE_METHODS[2:]}")
        if pattern is None:
            if self.method not in METHODS:
                raise ValueError(
                    f"method {self.method!r} is a sparsity method: pass sparsity='unstructured' or '2:4' "
                    f"(structured pruning supports {METHODS})"
                )
            if self.sparsity_ratio is not None:
                raise ValueError("sparsity_ratio needs sparsity='unstructured' or 'N:M'")
        else:
            if self.method not in SPARSE_METHODS:
                raise ValueError(f"sparsity={self.sparsity!r} supports methods {SPARSE_METHODS}, got {self.method!r}")
            if self.ratio > 0 and self.method not in METHODS:
                raise ValueError(
                    f"ratio={self.ratio} removes structures first, which method {self.method!r} cannot score; "
                    "use ratio=0 (sparsity only) or method 'surgeon' / 'magnitude'"
                )
            nm_ratio = None if pattern == "unstructured" else 1 - pattern[0] / pattern[1]
            if self.sparsity_ratio is None:
                object.__setattr__(self, "sparsity_ratio", 0.5 if nm_ratio is None else nm_ratio)
            if not isinstance(self.sparsity_ratio, (int, float)) or not 0 <= self.sparsity_ratio < 1:
                raise ValueError(f"sparsity_ratio must be in [0, 1), got {self.sparsity_ratio!r}")
            if nm_ratio is not None and abs(self.sparsity_ratio - nm_ratio) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity!r} zeroes exactly {nm_ratio:.3g} of the weights; "
                    f"got sparsity_ratio={self.sparsity_ratio} (leave it unset)"
                )
        if self.sparsity_scope not in ("global", "layer"):
            raise ValueError(f"sparsity_scope must be 'global' or 'layer', got {self.sparsity_scope!r}")
        band = self.sparsity_band
        banded = pattern == "unstructured" and self.method == "surgeon" and self.sparsity_scope == "global"
        if isinstance(band, str) and band == "auto":
            object.__setattr__(self, "sparsity_band", SPARSITY_BAND if banded else None)
        elif band is not None:
            if isinstance(band, bool) or not isinstance(band, (int, float)) or not 0 <= band <= 1:
                raise ValueError(f"sparsity_band must be a float in [0, 1], None or 'auto', got {band!r}")
            if not banded:
                raise ValueError(
                    "sparsity_band bounds how the global surgeon spreads unstructured zeros over layers: it needs "
                    f"sparsity='unstructured', method='surgeon', sparsity_scope='global' (got {self.sparsity!r}, "
                    f"{self.method!r}, {self.sparsity_scope!r})"
                )
        if self.sparsity_rows not in ("auto", "coupled", "independent"):
            raise ValueError(f"sparsity_rows must be 'auto', 'coupled' or 'independent', got {self.sparsity_rows!r}")
        if self.sparsity_rows == "auto" and self.sparsity is not None:
            rows = "independent" if pattern == "unstructured" else "coupled"
            object.__setattr__(self, "sparsity_rows", rows)
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        if self.basis not in ("model", "linear"):
            raise ValueError(f"basis must be 'model' or 'linear', got {self.basis!r}")
        kinds = tuple(self.kinds) if not isinstance(self.kinds, str) else (self.kinds,)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if not isinstance(self.min_atoms, int) or self.min_atoms < 0:
            raise ValueError(f"min_atoms must be an int >= 0, got {self.min_atoms!r}")
        if self.on_unknown not in ("error", "freeze"):
            raise ValueError(f"on_unknown must be 'error' or 'freeze', got {self.on_unknown!r}")
        if self.output not in ("module", "graph"):
            raise ValueError(f"output must be 'module' or 'graph', got {self.output!r}")
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise ValueError(f"multiple must be an int >= 1, got {self.multiple!r}")
        if self.shots is None:
            object.__setattr__(self, "shots", 1 if self.method in ("magnitude", "wanda", "sparsegpt") else 8)
        if not isinstance(self.shots, int) or self.shots < 1:
            raise ValueError(f"shots must be an int >= 1, got {self.shots!r}")
        if self.fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {self.fisher!r}")
        if not (self.damping > 0):
            raise ValueError(f"damping must be > 0, got {self.damping!r}")
        if self.update is True or self.update is False:  # accept booleans: True = both sides
            object.__setattr__(self, "update", "both" if self.update else "none")
        if self.update not in ("none", "columns", "rows", "both"):
            raise ValueError(f"update must be 'none', 'columns', 'rows' or 'both', got {self.update!r}")
        if self.method == "published" and (
            self.uniform or self.output != "module" or self.checkpoint_dir is not None or self.sparsity is not None
        ):
            raise ValueError(
                "method 'published' masks weights in place and keeps every shape: it supports neither "
                "uniform, output='graph', checkpoint_dir nor sparsity; leave them at their defaults"
            )
        if self.sides not in ("consumers", "all"):
            raise ValueError(f"sides must be 'consumers' or 'all', got {self.sides!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if isinstance(self.lora_steps, bool) or not isinstance(self.lora_steps, int) or self.lora_steps < 0:
            raise ValueError(f"lora_steps must be an int >= 0, got {self.lora_steps!r}")
        rank = self.lora_rank
        if rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"lora_rank must be an int >= 1 or 'full' (train the weights themselves), got {rank!r}")
        if not isinstance(self.lora_lr, (int, float)) or not self.lora_lr > 0:
            raise ValueError(f"lora_lr must be > 0, got {self.lora_lr!r}")
        end = self.lora_lr_end
        if end is not None and (isinstance(end, bool) or not isinstance(end, (int, float)) or not end > 0):
            raise ValueError(f"lora_lr_end must be None or a rate > 0 (the last shot's lora_lr), got {end!r}")
        if self.lora_batch_size is None:
            object.__setattr__(self, "lora_batch_size", self.batch_size)
        lbs = self.lora_batch_size
        if isinstance(lbs, bool) or not isinstance(lbs, int) or lbs < 1:
            raise ValueError(f"lora_batch_size must be an int >= 1 or None (batch_size), got {lbs!r}")
        hold = self.lora_holdout
        if isinstance(hold, bool) or not isinstance(hold, int) or hold < 0:
            raise ValueError(f"lora_holdout must be an int >= 0 (held-out calibration windows), got {hold!r}")
        if not isinstance(self.lora_norms, bool):
            raise ValueError(
                f"lora_norms must be True or False (train the 1-D parameters too), got {self.lora_norms!r}"
            )
        w = self.lora_next_token_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < 1:
            raise ValueError(
                "lora_next_token_weight must be a number in (0, 1) (the next-token loss's share under "
                f"lora_loss='distill+next_token'), got {w!r}"
            )
        end = self.lora_next_token_weight_end
        if end is not None:
            if isinstance(end, bool) or not isinstance(end, (int, float)) or not 0 <= end < 1:
                raise ValueError(
                    "lora_next_token_weight_end must be None or a number in [0, 1) (the next-token loss's share "
                    f"at the last shot), got {end!r}"
                )
            if self.lora_loss != "distill+next_token":
                raise ValueError(
                    "lora_next_token_weight_end schedules the next-token share of lora_loss='distill+next_token'; "
                    f"it has no effect with lora_loss={self.lora_loss!r}: leave it None or set that loss"
                )
        if self.lora_schedule not in LORA_SCHEDULES:
            raise ValueError(f"lora_schedule must be one of {LORA_SCHEDULES}, got {self.lora_schedule!r}")
        if self.lora_loss not in LORA_LOSSES:
            raise ValueError(f"lora_loss must be one of {LORA_LOSSES}, got {self.lora_loss!r}")
        if self.lora_steps and self.method == "published":
            raise ValueError("lora_steps is not supported with method 'published': it would refill the masked weights")
        steps = self.adapt_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"adapt_steps must be an int >= 0 (0: no adaptation), got {steps!r}")
        lr = self.adapt_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"adapt_lr must be a rate > 0, got {lr!r}")
        rank = self.adapt_rank
        if rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"adapt_rank must be an int >= 1 or 'full' (train the weights themselves), got {rank!r}")
        syn = self.lora_synthetic
        if isinstance(syn, bool) or not isinstance(syn, int) or syn < 0:
            raise ValueError(f"lora_synthetic must be an int >= 0 (windows the teacher writes; 0: none), got {syn!r}")
        if syn and (not self.lora_steps or self.lora_loss == "next_token"):
            raise ValueError(
                "lora_synthetic windows are the teacher's own text for a distilled correction: set lora_steps > 0 "
                f"and lora_loss='distill' or 'distill+next_token' (got lora_steps={self.lora_steps}, "
                f"lora_loss={self.lora_loss!r}), or leave lora_synthetic at 0"
            )
        sb = self.lora_synthetic_batch_size
        if sb is not None and (isinstance(sb, bool) or not isinstance(sb, int) or sb < 1):
            raise ValueError(
                f"lora_synthetic_batch_size must be an int >= 1 (windows sampled at once) or None "
                f"(8 x lora_batch_size), got {sb!r}"
            )
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory, "max_memory"))
            if self.method not in ("surgeon", "kobd", "lobd") or self.sparsity is not None:
                raise ValueError(
                    "max_memory bounds the curvature of structured 'surgeon' / 'kobd' / 'lobd' runs; "
                    f"it is not supported with method={self.method!r}, sparsity={self.sparsity!r}"
                )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(value: int | str, name: str = "size") -> int:
    """Bytes from an int or a string such as ``"40GB"``, ``"512 MiB"`` or ``"1.5e9"``.

    Raises:
        ValueError: not a positive size, naming ``name``.
    """
    import re

    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of bytes or a string like '40GB', got {value!r}")
    if isinstance(value, (int, float)):
        num = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{name} must be a number of bytes or a string like '40GB' or '512MiB', got {value!r}")
        num = float(m.group(1)) * _UNITS[unit]
    if not num > 0:
        raise ValueError(f"{name} must be > 0 bytes, got {value!r}")
    return int(num)


def check_model(model: nn.Module) -> None:
    """Reject models ``compress`` cannot work on, saying what is wrong and what to do.

    Raises:
        TypeError: not an ``nn.Module``, or parameters that are not floating point.
        ValueError: parameters with NaN/inf, or spread over several devices.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress expects a torch.nn.Module, got {type(model).__name__}")
    devices = set()
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            raise TypeError(
                f"parameter {name} has dtype {p.dtype}; compress needs floating-point weights "
                "(dequantize the model first, e.g. load it with dtype=torch.float32)"
            )
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} contains NaN or inf values; fix or reload the model before compressing")
        devices.add(p.device)
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are spread over {sorted(map(str, devices))}; move it to one "
            "device first (model.to(device))"
        )


def check_calibration(calibration, vocab_size: int | None) -> torch.Tensor:
    """Validate calibration windows: an (N, L) integer tensor of token ids, N >= 1, L >= 2.

    Raises:
        ValueError: empty, too short, wrong dtype or shape, or ids outside the vocabulary.
    """
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(
            f"calibration must be an (N, L) tensor of token ids, got {type(calibration).__name__}; make one with "
            "surgeon_fx.data.calibration_windows(source, tokenizer, n=..., seq_len=...)"
        )
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"calibration must be a 2-D int64 tensor (N, L), got {calibration.dtype} {tuple(calibration.shape)}"
        )
    if calibration.shape[0] == 0 or calibration.shape[1] < 2:
        raise ValueError(
            f"calibration data is empty or too short: got {tuple(calibration.shape)} windows, need N >= 1 windows "
            "of L >= 2 tokens (128 x 2048 is the paper's setting)"
        )
    _check_in_vocab(calibration, vocab_size, "calibration", "was it made with this model's tokenizer?")
    return calibration.long()


def _check_in_vocab(ids: torch.Tensor, vocab_size: int | None, name: str, question: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``ids`` holds a token id outside ``[0, vocab_size)``."""
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} holds token ids outside [0, {vocab_size}); {question}")


def compress(
    model: nn.Module,
    ratio: float,
    *,
    calibration=None,
    method: str | None = None,
    config: CompressConfig | None = None,
    progress: bool = True,
    on_shot=None,
    inplace: bool = False,
    on_adapt=None,
    synthetic=None,
    on_synthetic=None,
    preset: str | None = None,
    **options,
) -> nn.Module:
    """Return a smaller copy of ``model`` with ``ratio`` of its parameters physically removed.

    The pipeline, repeated for every shot: :func:`~surgeon_fx.trace` -> ``annotate_groups`` ->
    ``annotate_curvature`` + ``annotate_costs`` (or ``annotate_scores`` for magnitude) ->
    ``annotate_plan`` -> ``apply_obs_updates_`` -> ``apply_plan`` (graph) and
    ``apply_plan_to_module_`` (the copy).

    Args:
        model: a Hugging Face causal LM or a module mapping token ids to logits; not modified
            (unless ``inplace``).
        ratio: fraction of parameters to remove, in [0, 1).
        calibration: (N, L) int64 token windows (``surgeon_fx.data.calibration_windows``); required by
            the curvature methods.
        method: ``"surgeon"`` (default when calibration is given), ``"magnitude"`` (default
            otherwise), ``"kobd"``, ``"lobd"`` or ``"published"`` (masked, same shapes: the result
            carries ``surgeon_fx_masks``, a :class:`~surgeon_fx.published.MaskedResult`, and
            ``surgeon_fx_plan = None``); with ``sparsity`` also ``"wanda"`` or ``"sparsegpt"``.
        config: a full :class:`CompressConfig`; ``ratio``/``method``/``options`` override its fields.
        progress: show progress bars (shots, curvature sweeps).
        on_shot: optional ``on_shot(shot, model, plan)`` called after every shot (after a sparsity
            shot: ``on_shot(shot, model, report)`` with a :class:`~surgeon_fx.sparse_shots.SparsityReport`).
        on_adapt: optional ``on_adapt(model)`` called once with the adapted unpruned copy when
            ``adapt_steps`` is set, before the first shot (e.g. to score the adapted dense model, the
            reference the compressed one should be read against).
        synthetic: ``lora_synthetic``'s windows of the teacher's own text, given instead of sampled: an
            (M, L) int64 tensor of token ids as long as the calibration windows, e.g. what
            ``on_synthetic`` received in an earlier run with the same teacher (the same model,
            calibration and adaptation options), to spare the sampling. ``lora_synthetic`` may be
            left at 0 (it becomes M) or must equal M; needs a distilled correction like it.
        preset: ``"quality"`` fills the options not given with the settings measured best
            (:mod:`surgeon_fx.presets`: an adaptation, synthetic windows and a distilled correction
            after every shot; slower, and needs calibration); ``None`` (default): the options as given.
            Not with ``config``.
        on_synthetic: optional ``on_synthetic(windows)`` called once with the synthetic windows, when
            ``lora_synthetic`` samples them (or reads them back from ``checkpoint_dir``), before the
            first shot.
        inplace: compress ``model`` itself instead of a deep copy (the result is ``model``, with
            ``output="module"``): no second copy of the weights, for models that fit in memory only
            once (a 7B model in bfloat16 on one GPU). Same result as the copy; if the call fails,
            ``model`` may be left between two shots. The command line does this (it owns its model).
        **options: other :class:`CompressConfig` fields (``basis``, ``kinds``, ``shots``, ``fisher``, ...).

    Returns:
        A new model of the same class, smaller, whose ``forward`` and ``generate()`` work (or the
        rewritten ``GraphModule`` with ``output="graph"``). The composed plan is at
        ``result.surgeon_fx_plan`` (a :class:`~surgeon_fx.ir.Plan`); with ``sparsity``, what it
        reached is at ``result.surgeon_fx_sparsity`` (a :class:`~surgeon_fx.sparse_shots.SparsityReport`).

    Raises:
        ValueError / TypeError: bad ratio, options, calibration data or model (NaN or integer weights, ...).
        surgeon_fx.UnsupportedGraphError: the model cannot be traced, or holds an unsupported op.
    """
    from .shots import run_shots
    from .tracing import vocab_size_of

    if preset is not None:
        from .presets import preset_options

        if config is not None:
            raise ValueError("pass preset or config, not both (a config already sets every option)")
        filled = {k: v for k, v in preset_options(preset, ratio, options.get("sparsity")).items() if k not in options}
        logging.getLogger("surgeon_fx").info("preset %r sets %s", preset, filled)
        options = filled | options
    fields = {} if config is None else {k: getattr(config, k) for k in config.__dataclass_fields__}
    fields.update(options)
    fields["ratio"] = ratio
    if synthetic is not None:
        if not isinstance(synthetic, torch.Tensor) or synthetic.dim() != 2 or len(synthetic) == 0:
            raise ValueError(
                "synthetic must be a non-empty (M, L) tensor of token ids (the windows on_synthetic received in "
                f"an earlier run), got {type(synthetic).__name__} {tuple(getattr(synthetic, 'shape', ()))}"
            )
        if fields.get("lora_synthetic", 0) not in (0, len(synthetic)):
            raise ValueError(
                f"lora_synthetic={fields['lora_synthetic']} but synthetic holds {len(synthetic)} windows; "
                "leave lora_synthetic at 0 (it then counts the windows given) or make them agree"
            )
        fields["lora_synthetic"] = len(synthetic)
    if method is not None:
        fields["method"] = method
    elif config is None and calibration is not None:
        fields["method"] = "surgeon"
    cfg = CompressConfig(**fields)
    check_model(model)
    method_needs_data = cfg.method in CURVATURE_METHODS + SPARSE_METHODS[2:]
    if method_needs_data or cfg.lora_steps or cfg.adapt_steps:
        if calibration is None:
            who = f"method {cfg.method!r}" if method_needs_data else "lora_steps" if cfg.lora_steps else "adapt_steps"
            instead = "use method='magnitude'" if method_needs_data else f"leave {who} at 0"
            raise ValueError(
                f"{who} needs calibration windows: pass calibration=surgeon_fx.data."
                f"calibration_windows('wiki', tokenizer, n=128, seq_len=2048), or {instead}"
            )
        vocab = vocab_size_of(model)
        calibration = check_calibration(calibration, vocab)
        if (cfg.lora_steps or cfg.adapt_steps) and cfg.lora_holdout >= len(calibration):
            raise ValueError(
                f"lora_holdout={cfg.lora_holdout} holds out every one of the {len(calibration)} calibration "
                "windows: the correction needs at least one to train on; lower lora_holdout or pass more windows"
            )
        if synthetic is not None:
            if synthetic.dtype not in (torch.int64, torch.int32) or synthetic.shape[1] != calibration.shape[1]:
                raise ValueError(
                    f"synthetic windows must be int64 token ids as long as the calibration windows (L = "
                    f"{calibration.shape[1]}), got {synthetic.dtype} {tuple(synthetic.shape)}"
                )
            _check_in_vocab(synthetic, vocab, "synthetic", "were they sampled from this model?")
            synthetic = synthetic.long()
    torch.manual_seed(cfg.seed)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    work = (model if inplace else copy.deepcopy(model)).eval()
    if cfg.adapt_steps:
        from .shots import adapt_

        adapt_(work, calibration, cfg, progress=progress)
        if on_adapt is not None:
            on_adapt(work)
    teacher = None
    if cfg.lora_steps and cfg.lora_loss != "next_token":  # the (adapted) model's predictions, frozen before any shot
        teacher = trace(copy.deepcopy(work).requires_grad_(False))  # a graph: "mixed" rewrites it too
    if cfg.lora_synthetic and synthetic is None:  # the teacher's own text, from work (the teacher's weights)
        from .shots import teacher_windows

        synthetic = teacher_windows(work, calibration, cfg, progress=progress)
        if on_synthetic is not None:
            on_synthetic(synthetic)
    if cfg.sparsity is not None:
        return _compress_sparse(work, calibration, cfg, progress, on_shot, teacher, synthetic)
    if cfg.method == "published":
        from .published import run_published_shots

        work.surgeon_fx_masks = run_published_shots(work, calibration, cfg, progress=progress, on_shot=on_shot)
        work.surgeon_fx_plan = None
        return work
    try:
        plan = run_shots(
            work, calibration, cfg, progress=progress, on_shot=on_shot, teacher=teacher, synthetic=synthetic
        )
    except SurgeonError as e:
        if cfg.output == "module" and "does not match the rewritten graph" in str(e):
            raise SurgeonError(f"{e}. Pass output='graph' to get the rewritten GraphModule instead.") from e
        raise
    result = work._surgeon_fx_graph if cfg.output == "graph" else work
    del work._surgeon_fx_graph
    timings = work.__dict__.pop("_surgeon_fx_timings", [])
    result.surgeon_fx_plan = plan
    result.surgeon_fx_timings = timings
    return result


def _compress_sparse(
    work: nn.Module, calibration, cfg: CompressConfig, progress: bool, on_shot, teacher=None, synthetic=None
) -> nn.Module:
    """Structured shots (when ``ratio > 0``, on the module), then sparsity shots on the result."""
    import dataclasses

    from .passes import get_groups
    from .shots import _counts, run_shots
    from .sparse_shots import run_sparsity_shots, sparsity_checkpoint

    plan = None
    if cfg.ratio > 0:
        plan = run_shots(
            work,
            calibration,
            dataclasses.replace(cfg, output="module"),
            progress=progress,
            on_shot=on_shot,
            teacher=teacher,
            synthetic=synthetic,
        )
        del work._surgeon_fx_graph
    timings = work.__dict__.pop("_surgeon_fx_timings", [])
    sparse_ckpt = None if cfg.checkpoint_dir is None else sparsity_checkpoint(cfg.checkpoint_dir)
    report, gm = run_sparsity_shots(
        work,
        calibration,
        cfg,
        progress=progress,
        on_shot=on_shot,
        checkpoint_dir=sparse_ckpt,
        teacher=teacher,
        synthetic=synthetic,
    )
    if plan is None:  # nothing removed: the identity plan (sparsity changes no parameter count)
        total, linear = _counts(get_groups(gm))
        plan = Plan({}, {}, total, total, linear, linear, 0.0, cfg.basis, cfg.method)
    result = gm if cfg.output == "graph" else work
    result.surgeon_fx_timings = timings
    result.surgeon_fx_plan = plan
    result.surgeon_fx_sparsity = report
    return result


def _finish(work: nn.Module, gm, plan: Plan, output: str, rescale_norms: bool = True) -> nn.Module:
    from surgeon_fx.passes import apply_plan, apply_plan_to_module_
    from surgeon_fx.passes.norms import rescale_norms_

    if rescale_norms:
        rescale_norms_(gm, plan)
    new = apply_plan(gm, plan)
    target = new if output == "graph" else work
    if output == "module":
        try:
            apply_plan_to_module_(work, plan, old=gm, new=new)
        except SurgeonError as e:
            raise SurgeonError(f"{e}. Pass output='graph' to get the rewritten GraphModule instead.") from e
    target.surgeon_fx_plan = plan
    return target


def prune(
    model: nn.Module, plan: Plan, *, on_unknown: str = "error", output: str = "module", rescale_norms: bool = True
) -> nn.Module:
    """Return a copy of ``model`` with exactly what ``plan`` says removed (e.g. a plan from JSON).

    Args:
        model: the model the plan was made for (same parameter names and shapes); not modified.
        plan: a :class:`~surgeon_fx.ir.Plan`, e.g. ``Plan.from_json(text)``.
        on_unknown, output, rescale_norms: as in :class:`CompressConfig`.

    Raises:
        KeyError / ValueError: the plan does not fit this model's parameters or coupling.
    """
    from surgeon_fx.passes import annotate_groups

    check_model(model)
    if output not in ("module", "graph"):
        raise ValueError(f"output must be 'module' or 'graph', got {output!r}")
    work = copy.deepcopy(model).eval()
    gm = trace(work)
    annotate_groups(gm, on_unknown=on_unknown)
    return _finish(work, gm, plan, output, rescale_norms)
