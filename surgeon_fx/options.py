"""The options of ``surgeon-fx compress``: the parser, their validation and the config they become.

Reads: an ``argparse`` namespace. Writes: nothing (``check_compress_args`` fills in defaults that depend
on other options, in the namespace). Invariant: every combination of options is either refused by
:func:`check_compress_args` with a one-line ``ValueError`` that names the options at fault, or makes a valid
:class:`~surgeon_fx.api.CompressConfig` (:func:`config_fields`), and this happens before any process group
is initialised or any file is written.
"""

from __future__ import annotations

import argparse

__all__ = ["add_compress_parser", "check_compress_args", "config_fields", "compress_methods"]

CHUNK_SIZE = 1024


def compress_methods() -> tuple[str, ...]:
    """Structured methods, then the methods that only sparsify (``wanda``, ``sparsegpt``)."""
    from .api import METHODS, SPARSE_METHODS

    return tuple(dict.fromkeys(METHODS + SPARSE_METHODS))


def config_fields(args) -> dict:
    """The :class:`~surgeon_fx.api.CompressConfig` fields the options set (``ratio`` and ``method`` included)."""
    kw = {"ratio": args.ratio, "method": args.method, "basis": args.basis, "kinds": tuple(args.kinds)}
    kw |= {"seed": args.seed, "uniform": args.uniform, "multiple": args.multiple}
    if args.shots is not None:
        kw["shots"] = args.shots
    kw |= {"fisher": args.fisher, "damping": args.damping, "precision": args.precision, "batch_size": args.batch_size}
    if args.max_memory is not None:
        kw["max_memory"] = args.max_memory
    kw |= {"lora_steps": args.lora_steps, "lora_rank": args.lora_rank, "lora_lr": args.lora_lr}
    kw |= {"lora_loss": args.lora_loss, "lora_batch_size": args.lora_batch_size, "lora_holdout": args.lora_holdout}
    kw |= {"lora_norms": args.lora_norms, "lora_schedule": args.lora_schedule}
    kw["lora_next_token_weight"] = args.lora_next_token_weight
    if args.lora_lr_end is not None:
        kw["lora_lr_end"] = args.lora_lr_end
    if args.lora_next_token_weight_end is not None:
        kw["lora_next_token_weight_end"] = args.lora_next_token_weight_end
    kw |= {"adapt_steps": args.adapt_steps, "adapt_lr": args.adapt_lr, "adapt_rank": args.adapt_rank}
    kw["lora_synthetic"] = args.lora_synthetic
    if args.lora_synthetic_batch_size is not None:
        kw["lora_synthetic_batch_size"] = args.lora_synthetic_batch_size
    if args.sparsity is not None:
        kw |= {"sparsity": args.sparsity, "sparsity_scope": args.sparsity_scope, "chunk_size": args.chunk_size}
        kw["sparsity_rows"] = args.sparsity_rows
        if args.sparsity_band is not None:  # "none": unbounded; not given: the config's "auto"
            kw["sparsity_band"] = None if args.sparsity_band == "none" else args.sparsity_band
        if args.sparsity_ratio is not None:
            kw["sparsity_ratio"] = args.sparsity_ratio
    return kw


class _Given(argparse.Action):
    """Stores the option's value and records its name in ``namespace.given`` (sorted), so that a
    ``--preset`` fills only the options not given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = sorted({*getattr(namespace, "given", []), self.dest})


def apply_preset(args) -> None:
    """Fill the options ``--preset`` sets (:func:`surgeon_fx.presets.preset_options`) that the command
    line did not give (``args.given``), in ``args``; nothing without ``--preset``. Called by
    :func:`check_compress_args` once ``args.ratio`` holds its default."""
    from .presets import preset_options

    if getattr(args, "preset", None) is None:
        return
    given = set(getattr(args, "given", []))
    for key, value in preset_options(args.preset, args.ratio, args.sparsity).items():
        if key not in given:
            setattr(args, key, value)


def _band(text: str) -> float | str:
    """``--sparsity-band``: a float, or ``none`` (no bounds)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {text!r}") from None


def check_compress_args(args) -> None:
    """Validate the options of ``surgeon-fx compress`` and fill in the defaults that depend on others.

    ``--preset`` fills the options it sets that were not given (:func:`apply_preset`); ``--ratio``
    defaults to 0.3, or to 0 (sparsify only) with ``--sparsity``; ``--sparsity-scope`` to
    ``global``, ``--sparsity-rows`` to ``auto`` and ``--chunk-size`` to 1024.

    Raises:
        ValueError: a bad value or combination; the message names the options.
    """
    from .api import METHODS, SPARSE_METHODS, CompressConfig
    from .patterns import parse_sparsity

    sparse = args.sparsity is not None
    if args.ratio is None:
        args.ratio = 0.0 if sparse else 0.3
    apply_preset(args)
    if not 0.0 <= args.ratio < 1.0:
        raise ValueError(f"--ratio must be in [0, 1), got {args.ratio} (0.3 removes 30% of the parameters)")
    for name in (
        "multiple",
        "calib_windows",
        "calib_seq_len",
        "windows",
        "seq_len",
        "shots",
        "chunk_size",
        "batch_size",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.method == "published":
        raise ValueError(
            "--method published masks weights and keeps every shape, which this command cannot save or report "
            "yet; use the Python API: surgeon_fx.compress(model, ratio, calibration=..., method='published')"
        )
    if not sparse:
        if args.method not in METHODS:
            raise ValueError(f"--method {args.method} only sparsifies: pass --sparsity unstructured or N:M (e.g. 2:4)")
        given = {"--sparsity-ratio": args.sparsity_ratio, "--sparsity-scope": args.sparsity_scope}
        given["--sparsity-rows"] = args.sparsity_rows
        given["--sparsity-band"] = args.sparsity_band
        given["--chunk-size"] = args.chunk_size
        for option, value in given.items():
            if value is not None:
                raise ValueError(f"{option} needs --sparsity (unstructured or N:M, e.g. 2:4)")
        _check_config(CompressConfig, args)
        return
    try:
        pattern = parse_sparsity(args.sparsity)
    except ValueError:
        raise ValueError(
            f"--sparsity must be 'unstructured' or N:M with 0 <= N < M (e.g. 2:4, 4:8), got {args.sparsity!r}"
        ) from None
    if args.method not in SPARSE_METHODS:
        raise ValueError(f"--sparsity works with --method {' / '.join(SPARSE_METHODS)}, not --method {args.method}")
    if args.ratio > 0 and args.method not in METHODS:
        raise ValueError(
            f"--method {args.method} cannot remove structures: pass --ratio 0 (sparsity only), or --method "
            "surgeon / magnitude to remove structures and sparsify"
        )
    if args.sparsity_ratio is not None:
        if not 0.0 <= args.sparsity_ratio < 1.0:
            raise ValueError(f"--sparsity-ratio must be in [0, 1), got {args.sparsity_ratio}")
        if pattern != "unstructured" and abs(args.sparsity_ratio - (1 - pattern[0] / pattern[1])) > 1e-9:
            raise ValueError(
                f"--sparsity {args.sparsity} zeroes exactly {1 - pattern[0] / pattern[1]:g} of the weights; "
                f"leave --sparsity-ratio out (got {args.sparsity_ratio})"
            )
    surgeon_only = (
        ("--sparsity-scope", args.sparsity_scope),
        ("--sparsity-rows", args.sparsity_rows),
        ("--sparsity-band", args.sparsity_band),
        ("--chunk-size", args.chunk_size),
    )
    for option, value in surgeon_only:
        if value is not None and args.method != "surgeon":
            raise ValueError(f"{option} applies to --method surgeon only (--method {args.method} ranks per layer)")
    args.sparsity_scope = args.sparsity_scope or "global"
    if args.sparsity_band is not None:
        if args.sparsity_band != "none" and not 0.0 <= args.sparsity_band <= 1.0:
            raise ValueError(f"--sparsity-band must be in [0, 1], got {args.sparsity_band}")
        if pattern != "unstructured" or args.sparsity_scope != "global":
            raise ValueError(
                "--sparsity-band bounds each layer's share of unstructured zeros under --sparsity-scope "
                "global: use it with --sparsity unstructured, without --sparsity-scope layer"
            )
    args.sparsity_rows = args.sparsity_rows or "auto"
    args.chunk_size = args.chunk_size or CHUNK_SIZE
    _check_config(CompressConfig, args)


def _check_config(config_class, args) -> None:
    """What the CLI checks above do not cover, in the library's words."""
    try:
        config_class(**config_fields(args))
    except (ValueError, TypeError) as e:
        raise ValueError(f"these options do not fit together: {e}") from e


def _lora_rank(text: str) -> int | str:
    """``--lora-rank``: a positive int or ``full``."""
    import argparse

    if text == "full":
        return text
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'full', got {text!r}")
    return rank


def add_basis_kinds(p) -> None:
    """``--basis`` and ``--kinds``: what the ratio counts and which structures may go (compress, demo)."""
    from .ir import KINDS

    p.add_argument(
        "--basis",
        default="model",
        choices=("model", "linear"),
        help="count the ratio over the whole model or the decoder linear layers (default model)",
    )
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="structures that may be removed")


def add_compress_parser(sub, model_arg, device_arg, text_args, func, epilog: str) -> None:
    """Add the ``compress`` sub-command (options documented in its ``--help``) to ``sub``."""
    from .api import LORA_LOSSES, LORA_SCHEDULES, PRECISIONS

    c = sub.add_parser(
        "compress",
        help="compress a model into a folder: checkpoint, tokenizer, ONNX, report",
        description="Compress a model and write OUT/: config.json + model.safetensors (+ tokenizer files), "
        "model.onnx (and/or model.pt2), report.md with widths.png and perplexity.png, report.json. The folder "
        "is built in OUT.partial/ and moved into place when everything succeeded; per-shot state lives in "
        "OUT.partial/shots/ and an interrupted run resumes when the same command runs again. Several "
        "processes: `torchrun --nproc-per-node N -m surgeon_fx.cli compress ...` (each rank sweeps its share "
        "of the calibration windows; rank 0 evaluates and writes).",
        epilog=epilog,
    )
    model_arg(c)
    device_arg(c)
    c.add_argument("-o", "--out", required=True, help="output folder (refused if it exists, unless --force)")
    c.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="fraction of parameters to remove (structures), in [0, 1) (default 0.3; 0 with --sparsity)",
    )
    c.add_argument(
        "--method",
        default="magnitude",
        choices=compress_methods(),
        help="how atoms (with --sparsity: weights) are scored (default magnitude); wanda and sparsegpt only "
        "sparsify (--sparsity with --ratio 0); published: Python API only",
    )
    c.add_argument(
        "--preset",
        default=None,
        choices=("quality",),
        help="quality: the settings measured best (an adaptation of the unpruned model, windows of its own "
        "text, a distilled correction after every shot; surgeon_fx.presets), for --shots, --lora-steps, "
        "--lora-rank, --lora-lr, --lora-loss, --lora-batch-size, --adapt-steps and --lora-synthetic where not "
        "given; slower and needs more memory (default: none)",
    )
    c.add_argument(
        "--shots", action=_Given, type=int, default=None, help="shots of the linear schedule (default: the method's)"
    )
    add_basis_kinds(c)
    c.add_argument("--uniform", action="store_true", help="same widths in every layer (loads with stock transformers)")
    c.add_argument("--multiple", type=int, default=1, help="with --uniform: keep widths a multiple of this many atoms")
    c.add_argument(
        "--sparsity",
        default=None,
        help="also zero decoder linear weights after removing structures: 'unstructured' or N:M (e.g. 2:4: at "
        "most 2 nonzeros in every 4 consecutive inputs); --method surgeon, magnitude, wanda or sparsegpt",
    )
    c.add_argument(
        "--sparsity-ratio",
        type=float,
        default=None,
        help="with --sparsity unstructured: fraction of decoder linear weights to zero (default 0.5); N:M sets "
        "it to 1 - N/M",
    )
    c.add_argument(
        "--sparsity-scope",
        default=None,
        choices=("global", "layer"),
        help="with --sparsity and --method surgeon: one cost threshold over all layers (global; default) or the "
        "same sparsity in every layer",
    )
    c.add_argument(
        "--sparsity-band",
        type=_band,
        default=None,
        help="with --sparsity unstructured and --method surgeon: keep every layer's share of zeros within "
        "--sparsity-ratio +- this (default 0.1, chosen by measurement; 'none': unbounded, one global threshold "
        "as the paper)",
    )
    c.add_argument(
        "--sparsity-rows",
        default=None,
        choices=("auto", "coupled", "independent"),
        help="with --sparsity and --method surgeon: coupled (the paper's G (x) A costs and update), independent "
        "(each row compensated under A alone) or auto (default): independent for unstructured, coupled for N:M",
    )
    c.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help=f"with --sparsity and --method surgeon: weights per correlated update solve (default {CHUNK_SIZE}; "
        "memory 8 * chunk^2 bytes)",
    )
    c.add_argument(
        "--layout",
        default="auto",
        choices=("auto", "stock", "uneven"),
        help="checkpoint layout: stock (plain from_pretrained loads it), uneven (needs surgeon_fx.load_pretrained) "
        "or auto: stock where the config can express the widths (default)",
    )
    c.add_argument(
        "--calibration",
        default="wiki",
        help="calibration text for curvature methods: 'wiki' (packaged Wikipedia corpus; default) or a "
        ".txt/.json/.jsonl file; magnitude needs none",
    )
    c.add_argument(
        "--fisher",
        default="empirical",
        choices=("empirical", "true"),
        help="curvature labels: the data's next tokens (empirical, default) or sampled from the model (true)",
    )
    c.add_argument("--damping", type=float, default=0.01, help="K-FAC damping relative to the mean diagonal (0.01)")
    c.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="arithmetic of the curvature sweep and the --lora-steps correction: fp32 (default), tf32 (TF32 "
        "matmuls on CUDA) or mixed (tf32 and bfloat16 attention; the fast GPU setting)",
    )
    c.add_argument("--batch-size", type=int, default=1, help="calibration windows per sweep forward/backward (1)")
    c.add_argument(
        "--max-memory",
        default=None,
        help="bound on the curvature state of a shot, e.g. 40GB: factors are collected block by block (default: "
        "no bound, one sweep per shot)",
    )
    c.add_argument(
        "--lora-steps",
        action=_Given,
        type=int,
        default=0,
        help="after every shot, this many Adam steps of a low-rank correction on the calibration "
        "windows, merged into the weights (the paper's interleaved LoRA updates; after sparsity shots masked "
        "so that zeros stay zero; default 0: none)",
    )
    c.add_argument(
        "--lora-rank",
        action=_Given,
        type=_lora_rank,
        default=8,
        help="rank of that correction (default 8), or 'full': train the remaining weights themselves (use a lower --lora-lr)",
    )
    c.add_argument("--lora-lr", action=_Given, type=float, default=3e-4, help="its Adam learning rate (default 3e-4)")
    c.add_argument(
        "--lora-batch-size",
        action=_Given,
        type=int,
        default=None,
        help="calibration windows per step of that correction (default: --batch-size); steps larger than "
        "--batch-size accumulate gradients over passes of --batch-size windows (same training, less memory)",
    )
    c.add_argument(
        "--lora-holdout",
        type=int,
        default=0,
        help="hold the last K calibration windows out of that correction for early stopping: their loss is "
        "checked four times per shot and the best update merged, none if no update lowers it (default 0: no guard)",
    )
    c.add_argument(
        "--lora-loss",
        action=_Given,
        default="next_token",
        choices=LORA_LOSSES,
        help="what it trains on: the calibration text's next tokens (default), the original model's "
        "predictions on it (distill; one more model copy in memory) or both (distill+next_token; "
        "see --lora-next-token-weight)",
    )
    c.add_argument(
        "--lora-norms",
        action="store_true",
        help="that correction also trains the 1-D parameters (norm scales, biases) in full, not low rank, "
        "alongside the adapters, merged with them (default: only the decoder linear weights change)",
    )
    c.add_argument(
        "--lora-next-token-weight",
        type=float,
        default=0.5,
        metavar="W",
        help="with --lora-loss distill+next_token: the next-token loss's share W in (0, 1) of the loss "
        "(1 - W) KL + W CE (default 0.5)",
    )
    c.add_argument(
        "--lora-lr-end",
        type=float,
        default=None,
        metavar="LR",
        help="the correction's rate at the last shot; the shots between go from --lora-lr to it on a "
        "geometric path (default: --lora-lr at every shot)",
    )
    c.add_argument(
        "--lora-next-token-weight-end",
        type=float,
        default=None,
        metavar="W",
        help="with --lora-loss distill+next_token: the share at the last shot, in [0, 1); the shots between "
        "go in a straight line from --lora-next-token-weight (default: that weight at every shot; 0 ends on "
        "pure distillation)",
    )
    c.add_argument(
        "--adapt-steps",
        action=_Given,
        type=int,
        default=0,
        help="before the first shot, this many next-token correction steps on the unpruned model, merged: "
        "the shots start from the adapted model and a distilled correction distils from it (default 0: none)",
    )
    c.add_argument("--adapt-lr", type=float, default=3e-4, help="that adaptation's Adam learning rate (default 3e-4)")
    c.add_argument("--adapt-rank", type=_lora_rank, default=32, help="that adaptation's rank (default 32), or 'full'")
    c.add_argument(
        "--lora-synthetic",
        action=_Given,
        type=int,
        default=0,
        metavar="N",
        help="with a distilled --lora-loss: N windows of the teacher's own text (each started by 16 tokens of a "
        "calibration window, sampled at temperature 1), which every shot's correction trains on besides the "
        "calibration windows (default 0: none)",
    )
    c.add_argument(
        "--lora-synthetic-batch-size",
        type=int,
        default=None,
        metavar="B",
        help="those windows sampled B at a time (default 8 x --lora-batch-size); larger is faster where the "
        "key/value caches fit",
    )
    c.add_argument(
        "--lora-schedule",
        default="constant",
        choices=LORA_SCHEDULES,
        help="that correction's learning rate over each shot's steps: constant (default) or cosine "
        "(from --lora-lr down to 0 by the shot's last step)",
    )
    c.add_argument("--calib-windows", type=int, default=128, help="calibration windows (default 128)")
    c.add_argument("--calib-seq-len", type=int, default=2048, help="tokens per calibration window (default 2048)")
    text_args(c, 8, 512)
    c.add_argument("--no-eval", dest="eval", action="store_false", help="skip the perplexity evaluations")
    c.add_argument("--no-shot-eval", dest="shot_eval", action="store_false", help="evaluate only before and after")
    c.add_argument(
        "--export",
        nargs="*",
        default=["onnx"],
        choices=("onnx", "pt2"),
        help="exports to write into the folder (default onnx; none: pass --export without a value)",
    )
    c.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c.add_argument("--force", action="store_true", help="replace an existing output (only when the run succeeds)")
    c.add_argument("--restart", action="store_true", help="discard an interrupted run in OUT.partial/")
    c.set_defaults(func=func)
