"""Named sets of :func:`surgeon_fx.compress` options: the settings measured best.

Reads: nothing. Writes: nothing. Invariant: a preset only fills options the caller did not give
(:func:`preset_options` returns them; ``compress(preset=...)`` and ``surgeon-fx compress --preset``
let every explicit option win), and every set it returns makes a valid
:class:`~surgeon_fx.api.CompressConfig` with a calibration set.

``"quality"`` is what gave the best perplexities on the H200 protocols (SmolLM2-135M, 128 x 2048
calibration windows, WikiText-2 at 2048 tokens, dense 21.61; ``benchmarks/results/h200_session16/``
to ``h200_session18/``):

- structures: shots of 2.5% of the parameters each, 32 adaptation steps of the unpruned model, 256
  windows of the adapted teacher's own text, and after every shot 32 steps of 8 windows of a
  full-rank correction distilled from the teacher at lr 1e-4: 22.24 / 26.89 / 32.22 / 42.11 / 58.21
  at 90-50% of the decoder linear parameters kept (without the correction: 26.39 / 32.98 / 44.95 /
  63.76 / 103.26 in 40 shots);
- unstructured sparsity: 4 shots, the same adaptation and synthetic windows, 64 steps per shot of
  the same full-rank distilled correction at lr 1e-4: 27.66 at 50% (rank 32 at lr 3e-4: 28.58);
- N:M sparsity: 2 shots, the same adaptation, 512 synthetic windows, 384 steps per shot of a rank-32
  distilled correction at lr 2e-3: 37.60 in 2:4 (with 256 windows and 256 steps at lr 3e-3: 40.16;
  full rank at lr 1e-4 with 128 steps: 43.95).

It costs time and memory: the adaptation, sampling the synthetic windows, a frozen copy of the
model as the teacher, and with ``lora_rank="full"`` three float32 copies of the decoder weights (the
update and Adam's moments). Sampling 256 windows for SmolLM2-135M took 540 s on an H200 shared by
three runs at the default 64 windows at once (the structured result), 144 s alone on an H200 at
256 at once (``lora_synthetic_batch_size=256``, the sparse results; 512 windows 306 s; the preset
keeps the default, whose key/value caches are four times smaller). On a GPU pass
``precision="mixed"`` too (the measured runs did). Combined runs (structures removed, then sparsity)
take the sparsity's settings.
"""

from __future__ import annotations

import math
import numbers

from .patterns import parse_sparsity

__all__ = ["PRESETS", "SHOT_SIZE", "preset_options"]

PRESETS = ("quality",)
"""The preset names."""

SHOT_SIZE = 0.025
"""Fraction of the parameters a structured shot of the ``"quality"`` preset removes."""


def preset_options(name: str, ratio: float, sparsity: str | None = None) -> dict:
    """The options preset ``name`` sets for a run removing ``ratio`` of the parameters (structures) with
    ``sparsity`` (``None``, ``"unstructured"`` or ``"N:M"``).

    Raises:
        ValueError: an unknown preset name, or ``sparsity`` that
            :func:`surgeon_fx.patterns.parse_sparsity` rejects.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (or pass the options yourself)")
    teacher = {"adapt_steps": 32, "lora_loss": "distill", "lora_batch_size": 8}
    if sparsity is None:
        ok = isinstance(ratio, numbers.Real) and not isinstance(ratio, bool) and 0 < ratio < 1
        shots = max(1, math.ceil(ratio / SHOT_SIZE - 1e-9)) if ok else 1  # a bad ratio: compress names it
        return teacher | {"shots": shots, "lora_synthetic": 256, "lora_steps": 32, "lora_rank": "full", "lora_lr": 1e-4}
    if parse_sparsity(sparsity) == "unstructured":
        return teacher | {"shots": 4, "lora_synthetic": 256, "lora_steps": 64, "lora_rank": "full", "lora_lr": 1e-4}
    return teacher | {"shots": 2, "lora_synthetic": 512, "lora_steps": 384, "lora_rank": 32, "lora_lr": 2e-3}
