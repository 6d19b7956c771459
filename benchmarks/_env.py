"""Shared by the benchmarks: what a result records about where it ran (versions, machine), and the
method-variant options of the low-rank correction, the per-shot log lines."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch
import transformers

import surgeon_fx as sf
from surgeon_fx.rundir import write_atomic


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "surgeon_fx": sf.__version__,
    }


def artefact(out: str | os.PathLike, ext: str) -> Path:
    """``<out><ext>``: the result file of kind ``ext`` (``".json"``, ``".md"``, ``".log"``) for ``--out``.

    The name is appended, not substituted: ``Path.with_suffix`` would read the ``.1_l64`` of
    ``sparse_band0.1_l64`` as a suffix and send two runs to the same ``sparse_band0.json``. An ``--out``
    that already ends in one of the result suffixes keeps its stem."""
    out = Path(out)
    if out.suffix in (".json", ".md", ".log"):
        out = out.with_suffix("")
    return out.with_name(out.name + ext)


def machine(device: torch.device) -> dict:
    return {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def correction_variant(option: str) -> dict:
    """``compress`` options of a method variant that sets the low-rank correction: ``"l16"`` (steps
    after every shot), ``"lr3e-4"`` (its learning rate; ``"lre1e-3"``: the last shot's, the shots between
    on a geometric path), ``"r8"`` (its rank; ``"rfull"``: the weights
    themselves), ``"lb8"`` (windows per step, accumulated over passes of the batch size), ``"h8"``
    (windows held out as its guard), ``"distill"`` (trained on the original model's predictions;
    ``"distillnt"``: on the mean of that loss and the next-token loss; ``"ntw0.25"``: on both, the
    next-token loss's share 0.25; ``"ntwe0"``: on both, that share going from the first shot's (0.5 or
    ``ntw``'s) to 0 at the last), ``"norms"`` (the 1-D parameters, norm scales and biases, trained
    too), ``"cos"`` (its rate decays to 0 over each shot's steps by a cosine), ``"ad32"`` (next-token
    steps on the unpruned model before the first shot, which then also is the teacher; ``"adlr3e-4"``:
    their rate), ``"syn256"`` (256 windows of the teacher's own text trained on too; ``"synb256"``:
    sampled 256 at a time); ``{}`` for any other."""
    if option == "distill":
        return {"lora_loss": "distill"}
    if option == "distillnt":
        return {"lora_loss": "distill+next_token"}
    if option.startswith("ntwe"):
        return {"lora_loss": "distill+next_token", "lora_next_token_weight_end": float(option[4:])}
    if option.startswith("ntw"):
        return {"lora_loss": "distill+next_token", "lora_next_token_weight": float(option[3:])}
    if option == "cos":
        return {"lora_schedule": "cosine"}
    if option == "norms":
        return {"lora_norms": True}
    if option == "rfull":
        return {"lora_rank": "full"}
    if option.startswith("h") and option[1:].isdigit():
        return {"lora_holdout": int(option[1:])}
    if option.startswith("lb") and option[2:].isdigit():
        return {"lora_batch_size": int(option[2:])}
    if option.startswith("syn") and option[3:].isdigit():
        return {"lora_synthetic": int(option[3:])}
    if option.startswith("synb") and option[4:].isdigit():
        return {"lora_synthetic_batch_size": int(option[4:])}
    if option.startswith("adlr"):
        return {"adapt_lr": float(option[4:])}
    if option.startswith("ad") and option[2:].isdigit():
        return {"adapt_steps": int(option[2:])}
    if option.startswith("lre"):
        return {"lora_lr_end": float(option[3:])}
    if option.startswith("lr"):
        return {"lora_lr": float(option[2:])}
    if option[:1] in ("l", "r") and option[1:].isdigit():
        return {"lora_steps" if option[0] == "l" else "lora_rank": int(option[1:])}
    return {}


class ShotLog(logging.Handler):
    """Keeps the per-shot log lines (stage timings) so a cut-short run still has them, and the lines of
    what runs before the first shot (the adaptation, the synthetic windows)."""

    def __init__(self, lines: list[str], echo=None):
        super().__init__(logging.INFO)
        self.lines = lines
        self.echo = echo or (lambda msg: print(msg, flush=True))  # also shown (and logged) this way

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith(("shot ", "adaptation ", "synthetic windows")):
            self.lines.append(msg)
            self.echo(msg)


def synthetic_cache(folder: str | None, model: str, calibration: torch.Tensor, ratio: float, options: dict, say=print):
    """``compress`` keywords that share one run's synthetic windows (``lora_synthetic``) with the others:
    ``{"synthetic": windows}`` when ``folder`` holds windows sampled with the same teacher and sampling
    options (:func:`surgeon_fx.shots.synthetic_key`, plus ``model``, the ``--model`` argument), else
    ``{"on_synthetic": save}``, which writes them there (atomically) once sampled. ``{}`` without
    ``folder`` or synthetic windows. ``ratio`` and ``options`` are ``compress``'s."""
    import hashlib
    import json

    from surgeon_fx.shots import synthetic_key

    if not folder or not options.get("lora_synthetic"):
        return {}
    cfg = sf.CompressConfig(ratio=ratio, **options)
    key = synthetic_key(calibration, cfg) | {"model": str(model)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(folder) / f"synthetic_{cfg.lora_synthetic}_{digest}.pt"
    if path.is_file():
        say(f"synthetic windows: {cfg.lora_synthetic} read from {path} (sampled by an earlier run; key {key})")
        return {"synthetic": torch.load(path, weights_only=True)}

    def save(windows: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: torch.save(windows, tmp), unique=True)
        say(f"synthetic windows saved to {path}")

    return {"on_synthetic": save}
