"""The ``surgeon-fx compress`` run: load -> calibrate -> trace -> evaluate -> compress -> save -> export -> report.

Reads: a model (local Hugging Face folder, surgeon_fx checkpoint, ``.gguf`` file, ``smollm2-135m`` or a Hub
name), calibration and evaluation text. Writes: one output folder (checkpoint, tokenizer, exports, report),
built in ``<out>.partial/`` and moved into place only when every stage has finished.
Invariant: an existing output is never modified unless ``--force``, and even then it is only replaced by the
final move; an interrupted run leaves ``<out>.partial/`` with ``run.json`` (settings and finished stages)
and ``shots/`` (per-shot state that ``compress(checkpoint_dir=...)`` writes and resumes from), so running
the same command again resumes, and running it with other settings is refused until ``--restart``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .rundir import OutputExistsError, RunDir  # noqa: F401  (OutputExistsError: raised by run_compress)

__all__ = ["load_any", "run_compress", "add_compress_parser"]


def load_any(spec: str, device: str = "cpu"):
    """Load a model and its tokenizer from a surgeon_fx output folder or anything ``load_model`` reads.

    Args:
        spec: a folder written by :func:`surgeon_fx.save_pretrained` (uneven widths included), a Hugging Face
            folder, a ``.gguf`` file, ``"smollm2-135m"`` or a Hub name.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``; ``tokenizer`` is ``None`` when the folder has none.

    Raises:
        FileNotFoundError / ValueError: as :func:`surgeon_fx.models.load_model` and
            :func:`surgeon_fx.load_pretrained`.
    """
    from .checkpoint import load_pretrained, read_metadata
    from .models import load_model

    path = Path(spec).expanduser()
    if (path / "config.json").is_file() and read_metadata(path) is not None:
        from transformers import AutoTokenizer

        model = load_pretrained(path, device=device)
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError, KeyError):
            tok = None
        return model, tok
    return load_model(spec, device=device)


def _versions() -> dict:
    import platform

    import transformers

    from . import __version__

    return {
        "surgeon_fx": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "platform": platform.platform(),
    }


def _compress_kwargs(args, rd: RunDir, on_shot) -> dict:
    """Options for ``compress`` that this version of it accepts (the API grows: shots, checkpoints, ...)."""
    from .api import CompressConfig, compress

    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    params = inspect.signature(compress).parameters
    kw = {"basis": args.basis, "kinds": tuple(args.kinds), "seed": args.seed, "uniform": args.uniform}
    kw["multiple"] = args.multiple
    if args.shots is not None:
        if "shots" not in fields:
            raise ValueError("this version of compress has no 'shots' option; leave --shots out")
        kw["shots"] = args.shots
    if "checkpoint_dir" in fields or "checkpoint_dir" in params:
        kw["checkpoint_dir"] = str(rd.shots)
    if "progress" in params:
        kw["progress"] = True
    if "on_shot" in params:
        kw["on_shot"] = on_shot
    return {k: v for k, v in kw.items() if k in fields or k in params}


def _eval_text(args) -> tuple[str, str]:
    from .data import wiki_calibration_text, wikitext2_text

    path = args.wikitext or os.environ.get("SURGEON_FX_WIKITEXT")
    if path:
        return wikitext2_text(path), f"WikiText-2 test ({Path(path).name})"
    return wiki_calibration_text(), "Wikipedia lead paragraphs (packaged corpus)"


def _first_windows(eval_windows, tok, text: str, seq_len: int, n: int):
    """``eval_windows(tok, text, ...)[:n]`` without tokenizing all of a long text: the windows are the first
    ``n * seq_len`` tokens, and tokenization is local, so a prefix with a wide margin gives the same ids."""
    prefix = text[: 16 * n * seq_len + 4096]
    if len(prefix) < len(text):
        try:
            w = eval_windows(tok, prefix, seq_len=seq_len, max_windows=n)
            if w.shape[0] == n:
                return w
        except ValueError:
            pass
    return eval_windows(tok, text, seq_len=seq_len, max_windows=n)


def _linear_params(analysis) -> int:
    return sum(analysis.param_numel[p] for p in analysis.linear_params)


def run_compress(args, argv: list[str]) -> Path:
    """Run every stage of ``surgeon-fx compress`` (see the module docstring); return the output folder.

    Raises:
        OutputExistsError: the output exists (no ``--force``) or a partial run has other settings.
        ValueError / FileNotFoundError: bad input (model, data, options).
    """
    import shlex

    from . import api
    from .checkpoint import load_pretrained, read_metadata, save_pretrained
    from .data import calibration_windows, eval_windows
    from .evaluate import count_parameters, perplexity, state_dict_bytes
    from .passes import annotate_groups, get_groups
    from .report import layer_widths, write_report
    from .tracing import trace

    skip = {"out", "force", "restart", "device", "func", "command", "argv"}
    fingerprint = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    rd = RunDir(args.out, fingerprint, force=args.force, restart=args.restart)
    resumed = rd.open()
    print(
        f"{'resuming' if resumed else 'writing'} {rd.partial} (moved to {rd.out} when every stage is done)", flush=True
    )
    times: dict[str, float] = dict(rd.state.get("times", {}))

    def timed(stage, fn):
        t = time.perf_counter()
        out = fn()
        times[stage] = time.perf_counter() - t
        rd.state["times"] = times
        return out

    model, tok = timed("load", lambda: load_any(args.model, args.device))
    needs_text = args.eval or args.method != "magnitude"
    if tok is None and needs_text:
        raise ValueError(f"{args.model} has no tokenizer; calibration and evaluation need one to read text")
    calibration = None
    if args.method != "magnitude":
        calibration = timed(
            "calibration",
            lambda: calibration_windows(
                args.calibration, tok, n=args.calib_windows, seq_len=args.calib_seq_len, seed=args.seed
            ),
        )
    with tqdm(total=2, desc="tracing") as bar:
        gm = timed("trace", lambda: trace(model))
        bar.update()
        timed("groups", lambda: annotate_groups(gm))
        bar.update()
    analysis = get_groups(gm)
    gm = None  # free the graph's copy of the weights
    windows = None
    if args.eval:
        text, source = _eval_text(args)
        windows = _first_windows(eval_windows, tok, text, args.seq_len, args.windows)
        rd.state["eval"] = {"text": source, "windows": int(windows.shape[0]), "seq_len": args.seq_len}
    dense = rd.done("dense")
    if dense is None:
        ppl = timed("evaluate dense", lambda: perplexity(model, windows)) if args.eval else None
        dense = {"parameters": count_parameters(model), "linear_parameters": _linear_params(analysis)}
        rd.mark("dense", {**dense, "file_bytes": state_dict_bytes(model), "perplexity": ppl})
        dense = rd.done("dense")
    rd.state["points"]["0"] = {"label": "dense", "parameters": dense["parameters"], "perplexity": dense["perplexity"]}

    def on_shot(shot, m, plan):
        point = {"label": f"shot {shot}", "parameters": count_parameters(m), "perplexity": None}
        rd.state["points"][str(shot)] = point
        rd.save()  # compress has saved this shot in shots/: record it before the (interruptible) evaluation
        if args.eval and args.shot_eval:
            point["perplexity"] = perplexity(m, windows)
            rd.save()

    if rd.done("save") is None:
        kw = _compress_kwargs(args, rd, on_shot)
        small = timed(
            "compress", lambda: api.compress(model, args.ratio, calibration=calibration, method=args.method, **kw)
        )
        if "on_shot" not in kw:
            on_shot(1, small, small.surgeon_fx_plan)
        timed("save", lambda: save_pretrained(small, rd.partial, tokenizer=tok, layout=args.layout))
        rd.mark("save", True)
    else:
        print(f"compressed checkpoint found in {rd.partial}; not compressing again", flush=True)
        small = load_pretrained(rd.partial, device=args.device)
    meta = read_metadata(rd.partial)
    if meta["layout"] != "stock" and args.uniform:
        print(f"note: the checkpoint needs surgeon_fx.load_pretrained (layout 'uneven'): {meta['why_uneven']}")
    model = None  # free the dense weights before the exports
    plan = small.surgeon_fx_plan
    comp = rd.done("compressed")
    if comp is None:
        last = rd.state["points"].get(str(max(int(k) for k in rd.state["points"])), {})
        ppl = last.get("perplexity") if last.get("parameters") == count_parameters(small) else None
        if args.eval and ppl is None:
            ppl = timed("evaluate compressed", lambda: perplexity(small, windows))
        weights = sum(f.stat().st_size for f in rd.partial.glob("model*.safetensors"))
        comp = {"parameters": count_parameters(small), "linear_parameters": plan.linear_after}
        rd.mark("compressed", {**comp, "file_bytes": weights, "perplexity": ppl})
        comp = rd.done("compressed")
    for fmt in args.export:
        if rd.done(f"export {fmt}") is None:
            from .export import export_onnx, export_pt2

            fn = export_onnx if fmt == "onnx" else export_pt2
            timed(f"export {fmt}", lambda fn=fn, fmt=fmt: fn(small, rd.partial / f"model.{fmt}"))
            rd.mark(f"export {fmt}", True)
    files = {str(f.relative_to(rd.partial)): f.stat().st_size for f in rd.partial.rglob("*") if f.is_file()}
    files = {k: v for k, v in files.items() if not k.startswith(("shots", "run.json"))}
    record = {
        "command": "surgeon-fx " + shlex.join(argv),
        "model": args.model,
        "settings": {k: v for k, v in fingerprint.items() if k not in ("model",)} | {"device": args.device},
        "dense": dense,
        "compressed": comp,
        "eval": rd.state.get("eval"),
        "points": [rd.state["points"][k] for k in sorted(rd.state["points"], key=int)],
        "times": times,
        "versions": _versions(),
        "plan_summary": plan.summary(),
        "files": files,
        "resumed": resumed,
        "checkpoint": {"layout": meta["layout"], "why_uneven": meta.get("why_uneven")},
    }
    write_report(rd.partial, record, layer_widths(analysis, plan))
    return rd.commit()


def add_compress_parser(sub, model_arg, device_arg, text_args, func, epilog: str) -> None:
    """Add the ``compress`` sub-command (options documented in its ``--help``) to ``sub``."""
    from .api import METHODS
    from .ir import KINDS

    c = sub.add_parser(
        "compress",
        help="compress a model into a folder: checkpoint, tokenizer, ONNX, report",
        description="Compress a model and write OUT/: config.json + model.safetensors (+ tokenizer files), "
        "model.onnx (and/or model.pt2), report.md with widths.png and perplexity.png, report.json. The folder "
        "is built in OUT.partial/ and moved into place when everything succeeded; per-shot state lives in "
        "OUT.partial/shots/ and an interrupted run resumes when the same command runs again.",
        epilog=epilog,
    )
    model_arg(c)
    device_arg(c)
    c.add_argument("-o", "--out", required=True, help="output folder (refused if it exists, unless --force)")
    c.add_argument("--ratio", type=float, default=0.3, help="fraction of parameters to remove, in [0, 1) (default 0.3)")
    c.add_argument("--method", default="magnitude", choices=METHODS, help="how atoms are scored (default magnitude)")
    c.add_argument("--shots", type=int, default=None, help="shots of the linear schedule (default: the method's)")
    c.add_argument(
        "--basis",
        default="model",
        choices=("model", "linear"),
        help="count the ratio over the whole model or the decoder linear layers (default model)",
    )
    c.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="structures that may be removed")
    c.add_argument("--uniform", action="store_true", help="same widths in every layer (loads with stock transformers)")
    c.add_argument("--multiple", type=int, default=1, help="with --uniform: keep widths a multiple of this many atoms")
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
