"""The ``surgeon-fx compress`` run: load -> calibrate -> trace -> evaluate -> compress -> save -> export -> report.

Reads: a model (local Hugging Face folder, surgeon_fx checkpoint, ``.gguf`` file, ``smollm2-135m`` or a Hub
name), calibration and evaluation text. Writes: one output folder (checkpoint, tokenizer, exports, report),
built in ``<out>.partial/`` and moved into place only when every stage has finished.
Invariant: an existing output is never modified unless ``--force``, and even then it is only replaced by the
final move; an interrupted run leaves ``<out>.partial/`` with ``run.json`` (settings and finished stages)
and ``shots/`` (per-shot state that ``compress(checkpoint_dir=...)`` writes and resumes from), so running
the same command again resumes, and running it with other settings is refused until ``--restart``.
Under ``torchrun`` (an initialised process group, :mod:`surgeon_fx.launch`) every rank loads and compresses
the same model, but only rank 0 opens, writes and moves the output folder, evaluates and prints; its
decisions (resume, refuse) reach the other ranks by broadcast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .options import add_compress_parser, config_fields
from .rundir import OutputExistsError, RunDir  # noqa: F401  (OutputExistsError: raised by run_compress)
from .sparse_shots import WEIGHTS as SPARSE_WEIGHTS
from .sparse_shots import sparsity_checkpoint

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


def _points(state: dict) -> list[dict]:
    """The run's perplexity points in order: dense, the adapted dense model (``--adapt-steps``), the shots."""
    points = [state["points"][k] for k in sorted(state["points"], key=int)]
    if state.get("adapted") is not None:
        points.insert(1, state["adapted"])
    return points


def _compress_kwargs(args, checkpoint_dir: Path | None, on_shot, progress: bool, on_adapt=None) -> dict:
    """Options for ``compress`` that this version of it accepts (the API grows: shots, checkpoints, ...).

    ``checkpoint_dir`` is passed whenever this ``compress`` accepts it (with ``--sparsity`` too: the
    sparsity shots checkpoint in its ``sparsity/`` subfolder).
    """
    from .api import CompressConfig, compress

    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    params = inspect.signature(compress).parameters
    kw = config_fields(args)
    kw.pop("ratio"), kw.pop("method")
    if "shots" in kw and "shots" not in fields:
        raise ValueError("this version of compress has no 'shots' option; leave --shots out")
    resumable = "checkpoint_dir" in fields or "checkpoint_dir" in params
    if checkpoint_dir is not None and resumable:
        kw["checkpoint_dir"] = str(checkpoint_dir)
    if "progress" in params:
        kw["progress"] = progress
    if "on_shot" in params and on_shot is not None:
        kw["on_shot"] = on_shot
    if "on_adapt" in params and on_adapt is not None:
        kw["on_adapt"] = on_adapt
    if "inplace" in params:  # the command owns its model: no second copy of the weights
        kw["inplace"] = True
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


def _checkpoint_dir(rd: RunDir, main: bool, rank0_has_shots: bool, stack: contextlib.ExitStack) -> Path | None:
    """Where ``compress`` keeps per-shot state on this rank.

    Rank 0: ``OUT.partial/shots/``. Other ranks: none (they write nothing), except when rank 0 resumes
    after a finished shot: then this rank must resume from the same shot, so it reads rank 0's state
    (which must be visible to it: a shared file system) through a private temporary folder, removed at
    the end, into which ``compress`` also saves the later shots. Call it on every rank (through
    :func:`surgeon_fx.launch.on_every_rank`, which waits for all) before rank 0 may save its next shot.
    """
    if main:
        return rd.shots
    if not rank0_has_shots:
        return None
    structured, sparse = rd.shots / "weights.safetensors", sparsity_checkpoint(rd.shots) / SPARSE_WEIGHTS
    # the structured weights carry their state; state.json is a copy for people, taken along when there
    names = [p for p in (structured, structured.with_name("state.json")) if p.is_file()] if structured.is_file() else []
    if sparse.is_file():  # the sparsity shots' weights name the masks file they go with
        names += [sparse, *sorted(sparse.parent.glob("masks-*.safetensors"))]
    missing = [str(p) for p in names if not p.is_file()]
    if missing or not names:
        raise FileNotFoundError(
            f"rank 0 resumes from {rd.shots}, but this rank cannot read {', '.join(missing) or 'its shots'}: put "
            "--out on a file system every rank sees, or pass --restart"
        )
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="surgeon-fx-shots-")))
    for p in names:
        dst = tmp / p.relative_to(rd.shots)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if p.name.endswith(".json"):
            shutil.copyfile(p, dst)
            continue
        try:  # a hard link keeps this shot's file even when rank 0 replaces it after the next shot
            os.link(p, dst)
        except OSError:
            shutil.copyfile(p, dst)
    return tmp


def _sparsity_record(model, params, sparsity: str, method: str, target: float) -> dict:
    """Zeros counted in the sparsified weights of ``model``, and for N:M the layers that break the pattern."""
    from .patterns import check_nm, parse_sparsity

    zeros = total = 0
    for p in params:
        w = model.get_parameter(p)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    pattern = parse_sparsity(sparsity)
    invalid = []
    if pattern != "unstructured":
        invalid = sorted(p for p, v in check_nm(model, *pattern, params=params).items() if v)
    return {
        "pattern": sparsity,
        "method": method,
        "target": target,
        "reached": zeros / total if total else 0.0,
        "zero_weights": zeros,
        "weights": total,
        "layers": len(params),
        "nm_valid": None if pattern == "unstructured" else not invalid,
        "nm_invalid_layers": invalid,
    }


def run_compress(args, argv: list[str]) -> Path:
    """Run every stage of ``surgeon-fx compress`` (see the module docstring); return the output folder.

    ``args`` must have passed :func:`surgeon_fx.options.check_compress_args`. Under an initialised process
    group every rank calls this: all compress (the curvature sweeps are shared), rank 0 alone evaluates,
    prints and writes, and the others return as soon as the compressed model exists (see
    :mod:`surgeon_fx.launch`).

    Raises:
        OutputExistsError: the output exists (no ``--force``) or a partial run has other settings.
        ValueError / FileNotFoundError: bad input (model, data, options).
    """
    with contextlib.ExitStack() as stack:
        return _run(args, argv, stack)


def _run(args, argv: list[str], stack: contextlib.ExitStack) -> Path:
    import shlex

    from . import api
    from .checkpoint import load_pretrained, read_metadata, save_pretrained
    from .data import calibration_windows, eval_windows
    from .evaluate import count_parameters, perplexity, state_dict_bytes
    from .launch import from_rank0, is_main, on_every_rank, rank_and_world
    from .passes import annotate_groups, get_groups
    from .report import layer_widths, write_report
    from .sparse_shots import SparsityReport
    from .tracing import trace

    main, world = is_main(), rank_and_world()[1]
    skip = {"out", "force", "restart", "device", "func", "command", "argv", "given"}
    fingerprint = {k: v for k, v in sorted(vars(args).items()) if k not in skip}
    rd = RunDir(args.out, fingerprint, force=args.force, restart=args.restart, write=main)
    # rank 0 alone looks at the disk and decides (resume or not, or refuse); the other ranks follow
    resumed, rd.state, has_shots = from_rank0(
        lambda: (
            rd.open(),
            rd.state,
            (rd.shots / "weights.safetensors").is_file() or (sparsity_checkpoint(rd.shots) / SPARSE_WEIGHTS).is_file(),
        )
    )
    # every rank holds its resume state (or all stop) before rank 0 may save a later shot
    ckpt = on_every_rank(lambda: _checkpoint_dir(rd, main, has_shots and rd.done("save") is None, stack))
    if main:
        where = f"{rd.partial} (moved to {rd.out} when every stage is done)"
        ranks = f"; {world} processes, rank 0 writes" if world > 1 else ""
        print(f"{'resuming' if resumed else 'writing'} {where}{ranks}", flush=True)
    times: dict[str, float] = dict(rd.state.get("times", {}))

    def timed(stage, fn):
        t = time.perf_counter()
        out = fn()
        times[stage] = time.perf_counter() - t
        rd.state["times"] = times
        return out

    if not main and rd.done("save") is not None:
        return rd.out  # rank 0 resumes after the compressed checkpoint: nothing left to compute together
    model, tok = timed("load", lambda: load_any(args.model, args.device))
    needs_data = args.method != "magnitude" or args.lora_steps > 0 or args.adapt_steps > 0
    needs_text = args.eval or needs_data
    if tok is None and needs_text:
        raise ValueError(f"{args.model} has no tokenizer; calibration and evaluation need one to read text")
    calibration = None
    if needs_data and rd.done("save") is None:
        calibration = timed(
            "calibration",
            lambda: calibration_windows(
                args.calibration, tok, n=args.calib_windows, seq_len=args.calib_seq_len, seed=args.seed
            ),
        )
    analysis = windows = None
    if main:
        with tqdm(total=2, desc="tracing") as bar:
            gm = timed("trace", lambda: trace(model))
            bar.update()
            timed("groups", lambda: annotate_groups(gm))
            bar.update()
        analysis = get_groups(gm)
        gm = None  # free the graph's copy of the weights
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
        point = {"label": "dense", "parameters": dense["parameters"], "perplexity": dense["perplexity"]}
        rd.state["points"]["0"] = point
    cfg = api.CompressConfig(**config_fields(args))
    structured_shots = cfg.shots if cfg.sparsity is None or cfg.ratio > 0 else 0

    def on_shot(shot, m, plan_or_report):
        sparse = isinstance(plan_or_report, SparsityReport)
        key = structured_shots + shot if sparse else shot
        label = f"{args.sparsity} shot {shot}" if sparse else f"shot {shot}"
        point = {"label": label, "parameters": count_parameters(m), "perplexity": None}
        rd.state["points"][str(key)] = point
        rd.save()  # compress has saved this shot in shots/: record it before the (interruptible) evaluation
        if args.eval and args.shot_eval:
            point["perplexity"] = perplexity(m, windows)
            rd.save()

    def on_adapt(m):  # the adapted dense model (--adapt-steps): the fairer reference for the result
        if rd.state.get("adapted") is None:  # a resumed run adapts again (for its teacher): scored once
            ppl = perplexity(m, windows) if args.eval else None
            rd.state["adapted"] = {"label": "adapted", "parameters": count_parameters(m), "perplexity": ppl}
            rd.save()

    if rd.done("save") is None:
        kw = _compress_kwargs(args, ckpt, on_shot if main else None, progress=main, on_adapt=on_adapt if main else None)
        small = timed(
            "compress", lambda: api.compress(model, args.ratio, calibration=calibration, method=args.method, **kw)
        )
        if not main:
            return rd.out  # the same model as rank 0's: rank 0 evaluates and writes it
        if "on_shot" not in kw:
            on_shot(1, small, small.surgeon_fx_plan)
        if args.sparsity is not None:
            report = small.surgeon_fx_sparsity
            rd.state["sparsity"] = _sparsity_record(small, report.params, args.sparsity, args.method, report.target)
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
        "processes": world,
        "dense": dense,
        "compressed": comp,
        "sparsity": rd.state.get("sparsity"),
        "eval": rd.state.get("eval"),
        "adapted": rd.state.get("adapted"),
        "points": _points(rd.state),
        "times": times,
        "versions": _versions(),
        "plan_summary": plan.summary(),
        "files": files,
        "resumed": resumed,
        "checkpoint": {"layout": meta["layout"], "why_uneven": meta.get("why_uneven")},
    }
    write_report(rd.partial, record, layer_widths(analysis, plan))
    return rd.commit()
