"""The ``surgeon-fx`` command line: ``compress``, ``eval``, ``export``, ``inspect`` and ``demo``.

Reads: models from local Hugging Face folders, surgeon_fx checkpoints, GGUF files, the packaged SmolLM2-135M
or Hub names (where reachable); text from WikiText-2 JSONL files, local text files or the packaged Wikipedia
corpus. Writes: ``compress``: one output folder (see :mod:`surgeon_fx.pipeline`); ``export``: one file;
the others: tables on stdout (``demo``: optional JSON). Invariant: the exit codes below mean the same for
every command, and every error is one line on stderr saying what is wrong and what to do.

Exit codes: 0 success; 1 unexpected failure (a bug: the traceback is printed); 2 bad arguments or input
(missing files, bad ratio, unknown model, ...); 3 the output exists and --force was not given, or an
interrupted run in ``<out>.partial`` has other settings (use --restart); 130 interrupted (Ctrl-C): the
partial output is kept and the same command resumes it. Under ``torchrun`` every rank exits with the same
code when rank 0 refuses (exit 3) or the options are bad (exit 2); ``python -m surgeon_fx.cli`` runs ``main``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_EXISTS", "EXIT_INTERRUPTED"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_EXISTS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _file_size(model: torch.nn.Module) -> int:
    """Bytes of the model's weights written as one safetensors file (tied tensors stored once)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_model(model, path)
        return os.path.getsize(path)


def _text(args) -> tuple[str, str]:
    from .data import wiki_calibration_text, wikitext2_text

    path = args.wikitext or os.environ.get("SURGEON_FX_WIKITEXT")
    if path:
        return wikitext2_text(path), f"WikiText-2 test ({Path(path).name})"
    return wiki_calibration_text(), "Wikipedia lead paragraphs (packaged corpus; pass --wikitext for WikiText-2)"


def _measure(model, windows, label: str) -> dict:
    from .evaluate import count_parameters, perplexity

    t = time.perf_counter()
    ppl = perplexity(model, windows, progress=True)
    return {
        "parameters": count_parameters(model),
        "file_bytes": _file_size(model),
        "perplexity": ppl,
        "eval_seconds": time.perf_counter() - t,
        "label": label,
    }


def cmd_demo(args) -> int:
    """Compress the packaged SmolLM2-135M (or --model) and print a before/after table."""
    from . import compress
    from .data import eval_windows
    from .models import load_model

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"loading {args.model} ...", flush=True)
    t = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer; the demo needs one to read text")
    text, source = _text(args)
    windows = eval_windows(tok, text, seq_len=args.seq_len, max_windows=args.windows)
    print(f"evaluating on {len(windows)} windows of {args.seq_len} tokens of {source}", flush=True)
    dense = _measure(model, windows, "dense")
    t = time.perf_counter()
    small = compress(model, args.ratio, method=args.method, kinds=tuple(args.kinds), basis=args.basis, seed=args.seed)
    compress_s = time.perf_counter() - t
    plan = small.surgeon_fx_plan
    pruned = _measure(small, windows, "compressed")
    rows = [
        (
            "parameters (whole model)",
            f"{dense['parameters']:,}",
            f"{pruned['parameters']:,}",
            _pct(pruned["parameters"], dense["parameters"]),
        ),
        (
            "parameters (decoder linear)",
            f"{plan.linear_before:,}",
            f"{plan.linear_after:,}",
            _pct(plan.linear_after, plan.linear_before),
        ),
        (
            "file size (MB, safetensors)",
            f"{dense['file_bytes'] / 1e6:.1f}",
            f"{pruned['file_bytes'] / 1e6:.1f}",
            _pct(pruned["file_bytes"], dense["file_bytes"]),
        ),
        (
            f"perplexity ({len(windows)}x{args.seq_len})",
            f"{dense['perplexity']:.2f}",
            f"{pruned['perplexity']:.2f}",
            f"x{pruned['perplexity'] / dense['perplexity']:.2f}",
        ),
        (
            "eval time (s)",
            f"{dense['eval_seconds']:.1f}",
            f"{pruned['eval_seconds']:.1f}",
            f"x{pruned['eval_seconds'] / dense['eval_seconds']:.2f}",
        ),
        ("time (s): load / compress", f"{load_s:.1f}", f"{compress_s:.1f}", ""),
    ]
    print()
    print(
        f"surgeon_fx demo: {args.model}, ratio {args.ratio} of {args.basis} parameters, method {args.method}, "
        f"kinds {','.join(args.kinds)}"
    )
    print(_table(("", "dense", "compressed", "change"), rows))
    print()
    print(plan.summary())
    if args.json:
        result = {
            "command": " ".join(["surgeon-fx", *sys.argv[1:]]),
            "model": args.model,
            "ratio": args.ratio,
            "method": args.method,
            "basis": args.basis,
            "kinds": args.kinds,
            "text": source,
            "windows": len(windows),
            "seq_len": args.seq_len,
            "dense": dense,
            "compressed": pruned,
            "compress_seconds": compress_s,
            "load_seconds": load_s,
            "plan": {
                "params_before": plan.params_before,
                "params_after": plan.params_after,
                "linear_before": plan.linear_before,
                "linear_after": plan.linear_after,
            },
            "versions": _versions(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"results written to {args.json}")
    return 0


def cmd_inspect(args) -> int:
    """Print the groups table of a model."""
    from . import trace
    from .passes import annotate_groups, get_groups
    from .pipeline import load_any

    model, _ = load_any(args.model)
    gm = trace(model)
    annotate_groups(gm, on_unknown=args.on_unknown)
    a = get_groups(gm)
    print(a.summary())
    if args.verbose:
        for g in a.groups:
            print(g.describe())
    return 0


def cmd_eval(args) -> int:
    """Print the perplexity of a model on WikiText-2 (or the packaged corpus)."""
    from .data import eval_windows
    from .evaluate import perplexity
    from .pipeline import load_any

    model, tok = load_any(args.model, args.device)
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer; eval needs one to read text")
    text, source = _text(args)
    windows = eval_windows(tok, text, seq_len=args.seq_len, max_windows=args.windows)
    ppl = perplexity(model, windows)
    print(f"perplexity {ppl:.3f} on {len(windows)} windows of {args.seq_len} tokens of {source}")
    return 0


def cmd_compress(args) -> int:
    """Compress a model into an output folder: checkpoint, tokenizer, exports, report (see surgeon_fx.pipeline).

    Under ``torchrun`` (``WORLD_SIZE > 1``) the options are checked first, then the default process group is
    initialised (NCCL for ``--device cuda``, each rank on ``cuda:LOCAL_RANK``; gloo on CPU) and destroyed at
    the end; rank 0 writes and prints (see :mod:`surgeon_fx.launch`).
    """
    from .launch import is_main, process_group
    from .options import check_compress_args
    from .pipeline import run_compress

    check_compress_args(args)
    torch.manual_seed(args.seed)
    with process_group(args.device) as device:
        args.device = device
        out = run_compress(args, args.argv)
        if is_main():
            print(f"done: {out} (report: {out / 'report.md'})")
    return EXIT_OK


def cmd_export(args) -> int:
    """Export a model (e.g. a compressed checkpoint) as ONNX or a torch.export program, verified."""
    from .export import export_onnx, export_pt2
    from .pipeline import load_any

    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"surgeon-fx export: {out} already exists; pass --force to replace it", file=sys.stderr)
        return EXIT_EXISTS
    model, _ = load_any(args.model, args.device)
    if args.format == "onnx":
        export_onnx(model, out, external_data=True if args.external_data else None, verify=not args.no_verify)
    else:
        export_pt2(model, out, verify=not args.no_verify)
    print(f"wrote {out}" + ("" if args.no_verify else " (checked against torch on two fresh input sizes)"))
    return EXIT_OK


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%" if b else ""


def _table(head, rows) -> str:
    rows = [tuple(head), *rows]
    w = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def _versions() -> dict:
    from .pipeline import _versions as versions

    return versions()


def build_parser() -> argparse.ArgumentParser:
    from .options import add_basis_kinds, add_compress_parser

    p = argparse.ArgumentParser(
        prog="surgeon-fx",
        description="Structured pruning of language models as torch.fx passes. `surgeon-fx COMMAND --help` "
        "explains every option of a command.",
        epilog=_EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp):
        sp.add_argument(
            "--model",
            default="smollm2-135m",
            help="local Hugging Face folder (also a surgeon-fx output folder), .gguf file, 'smollm2-135m' (the "
            "packaged model; default), or a Hub name where the Hub is reachable",
        )

    def device_arg(sp):
        sp.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda:0 (default cpu)")

    def text_args(sp, windows: int, seq_len: int):
        sp.add_argument(
            "--wikitext",
            default=None,
            help="WikiText-2 test JSONL (rows of {'text': ...}); default: $SURGEON_FX_WIKITEXT, else the "
            "packaged Wikipedia corpus",
        )
        sp.add_argument("--windows", type=int, default=windows, help=f"evaluation windows (default {windows})")
        sp.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per window (default {seq_len})")

    d = sub.add_parser("demo", help="compress a model and print a before/after table")
    model_arg(d)
    text_args(d, 8, 512)
    d.add_argument("--ratio", type=float, default=0.3, help="fraction of parameters to remove (default 0.3)")
    d.add_argument("--method", default="magnitude", help="atom scoring method (default magnitude)")
    add_basis_kinds(d)
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--json", default=None, help="also write the results as JSON to this path")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="print the coupled structures (groups) of a model")
    model_arg(i)
    i.add_argument(
        "--on-unknown",
        default="error",
        choices=("error", "freeze"),
        help="ops without a dependency rule: fail (default) or keep what they touch",
    )
    i.add_argument("-v", "--verbose", action="store_true", help="describe every group")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="perplexity of a model", epilog=_EXIT_HELP)
    model_arg(e)
    device_arg(e)
    text_args(e, 8, 512)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a model as ONNX or .pt2 (verified against torch)", epilog=_EXIT_HELP)
    model_arg(x)
    device_arg(x)
    x.add_argument("--format", choices=("onnx", "pt2"), default="onnx", help="onnx (default) or pt2 (torch.export)")
    x.add_argument("-o", "--output", required=True, help="file to write, e.g. model.onnx")
    x.add_argument("--external-data", action="store_true", help="ONNX: always keep weights in <output>.data")
    x.add_argument("--no-verify", action="store_true", help="skip the check against torch on fresh inputs")
    x.add_argument("--force", action="store_true", help="replace an existing output file")
    x.set_defaults(func=cmd_export)

    add_compress_parser(sub, model_arg, device_arg, text_args, cmd_compress, _EXIT_HELP)
    return p


_EXIT_HELP = (
    "exit codes: 0 success; 1 unexpected failure (traceback printed); 2 bad arguments or input; 3 output "
    "exists (no --force) or an interrupted run has other settings (--restart); 130 interrupted (the same "
    "command resumes)"
)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    import traceback

    from .keys import SurgeonError
    from .rundir import OutputExistsError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: 0 for --help, 2 for bad arguments
        return int(e.code or 0)
    args.argv = argv
    try:
        return args.func(args)
    except OutputExistsError as e:
        print(f"surgeon-fx {args.command}: {e}", file=sys.stderr)
        return EXIT_EXISTS
    except KeyboardInterrupt:
        print(f"surgeon-fx {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError, KeyError, ImportError, SurgeonError) as e:
        print(f"surgeon-fx {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        traceback.print_exc()
        print(f"surgeon-fx {args.command}: unexpected error ({type(e).__name__}); please report it", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
