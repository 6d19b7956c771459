"""Unstructured 50% and 2:4 sparsity on SmolLM2-135M: quality of every method, and 2:4 speed on the GPU.

Quality: each method (surgeon, magnitude, wanda, sparsegpt) sparsifies the decoder linear weights
(``sf.compress(model, 0.0, sparsity=..., method=...)``) and WikiText-2 is scored by the papers'
protocol (non-overlapping windows of L tokens). Speed: forward latency of the dense fp16 model vs the
same model with 2:4 weights in PyTorch's semi-structured sparse format (``sf.to_semi_structured_``,
CUDA sm80+), for the decoder linear layers alone and for the whole model (``torch.utils.benchmark``).

Writes ``<out>.json``, ``<out>.md`` and ``<out>.log`` with the command, versions and machine.
GPU run (token windows prepared with ``benchmarks/bench_quality.py --save-tokens``)::

    python benchmarks/bench_sparse.py --model SmolLM2.gguf --calib-pt calib.pt --eval-pt eval.pt \\
        --device cuda --out benchmarks/results/sparse_smollm2_h200

``--smoke`` runs everything at tiny scale on a random model (CPU is fine; speed then times dense only).

``--random-llama N`` times speed only, on a random model of the Llama-2-7B shape (4096 wide, MLP
11008) with N decoder layers, where the linear layers are large enough for the 2:4 kernels::

    python benchmarks/bench_sparse.py --device cuda --random-llama 8 --out benchmarks/results/sparse_speed_llama7b_h200
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from _env import ShotLog, artefact, correction_variant, machine, synthetic_cache, versions

import surgeon_fx as sf
from surgeon_fx.evaluate import perplexity

LOG: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


def smoke_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def random_llama(layers: int):
    """A random ``LlamaForCausalLM`` of the Llama-2-7B shape with ``layers`` decoder layers (speed only)."""
    from bench_scale import add_shape_args, llama_config

    shape = argparse.ArgumentParser()
    add_shape_args(shape)
    shape_args = shape.parse_args(["--layers", str(layers)])
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(shape_args)).eval()


def load(args):
    if args.random_llama:
        return random_llama(args.random_llama), None, None
    if args.smoke:
        gen = torch.Generator().manual_seed(0)
        return (
            smoke_model(),
            torch.randint(0, 256, (4, 64), generator=gen),
            torch.randint(0, 256, (2, 64), generator=gen),
        )
    from surgeon_fx.data import calibration_windows, eval_windows, wikitext2_text
    from surgeon_fx.models import load_model

    model, tok = load_model(args.model)
    if args.calib_pt and Path(args.calib_pt).exists():
        calib = torch.load(args.calib_pt)
    else:
        calib = calibration_windows("wiki", tok, n=args.calib_n, seq_len=args.calib_len, seed=0)
    if args.eval_pt and Path(args.eval_pt).exists():
        ev = torch.load(args.eval_pt)
    else:
        ev = eval_windows(tok, wikitext2_text(args.wikitext), seq_len=args.eval_len)
    ev = ev[: args.eval_windows] if args.eval_windows else ev
    return model, calib[: args.calib_n, : args.calib_len], ev


def spread(per_param: dict[str, float]) -> str:
    """Per-layer sparsity in short: min / median / max over the layers and the mean per projection kind."""
    if not per_param:
        return "-"
    vals = sorted(per_param.values())
    kinds: dict[str, list[float]] = {}
    for name, v in per_param.items():
        kinds.setdefault(name.rsplit(".", 2)[-2], []).append(v)
    by_kind = " ".join(f"{k} {100 * sum(v) / len(v):.0f}%" for k, v in sorted(kinds.items()))
    return f"min {100 * vals[0]:.1f}% median {100 * vals[len(vals) // 2]:.1f}% max {100 * vals[-1]:.1f}%; {by_kind}"


def quality(model, calib, ev, args, on_cell=None) -> dict:
    """PPL of every (pattern, method) cell; ``on_cell(out)`` after each one (partial results reach disk)."""
    out = {}
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            # variants: "surgeon:independent" (rows treated independently), "surgeon:layer" (same sparsity in every layer), "surgeon:bandnone" (unstructured:
            # one global threshold, no per-layer bounds; "surgeon:band0.2" other bounds), "surgeon:d0.1" (damping), "surgeon:s8"
            # (shots), "surgeon:noupdate" (no OBS update), "surgeon:l16" (16 low-rank correction steps after every
            # shot, zeros kept; ":lr3e-4" its rate (":lre1e-3" the last shot's), ":r8" its rank (":rfull": masked fine-tuning), ":h8" held-out guard, ":distill" on the original's predictions, ":norms" 1-D parameters too, ":cos" cosine-decayed rate, ":ntw0.25" distilled + next-token at share 0.25, ":ntwe0" that share down to 0 by the last shot, ":ad32" next-token steps on the unpruned model first (then the teacher; ":adlr3e-4" their rate), ":syn256" 256 windows of the teacher's own text trained on too, ":b8"
            # windows per step); combine them: "surgeon:layer:d0.1"
            base, *opts = method.split(":")
            kw = {"damping": args.damping, "sparsity_scope": args.scope, "precision": args.precision}
            shots = args.shots if base == "surgeon" else 1
            for o in opts:
                if o == "noupdate":  # fixed-weight costs 1/2 W^2 G_rr A_cc, no OBS update
                    kw["update"] = "none"
                elif o in ("layer", "global"):
                    kw["sparsity_scope"] = o
                elif o.startswith("band"):  # each layer's sparsity within ratio +- band (default 0.1)
                    kw["sparsity_band"] = None if o == "bandnone" else float(o[4:])
                elif o in ("independent", "coupled"):  # rows of the element costs and update
                    kw["sparsity_rows"] = o
                elif correction := correction_variant(o):  # low-rank correction steps, rate, rank
                    kw |= correction
                elif o.startswith("b") and o[1:].isdigit():
                    kw["batch_size"] = int(o[1:])
                elif o.startswith("d"):
                    kw["damping"] = float(o[1:])
                elif o.startswith("s"):
                    shots = int(o[1:])
                else:
                    raise SystemExit(f"unknown method variant {o!r} in {method!r}")
            shot_log: list[str] = []  # the per-shot correction lines (training / held-out loss)
            adapted: list[float] = []  # the adapted dense model's PPL, with an ":ad<N>" variant
            handler = ShotLog(shot_log, echo=say)
            logging.getLogger("surgeon_fx").addHandler(handler)
            logging.getLogger("surgeon_fx").setLevel(logging.INFO)
            try:
                opts = dict(sparsity=pattern, method=base, shots=shots, chunk_size=args.chunk_size, **kw)
                cache = synthetic_cache(args.synthetic_cache, args.model, calib, 0.0, opts, say=say)
                sparse = sf.compress(
                    model,
                    0.0,
                    calibration=calib,
                    progress=False,
                    on_adapt=lambda m, into=adapted: into.append(perplexity(m, ev, progress=False)),
                    **opts,
                    **cache,
                )
            finally:
                logging.getLogger("surgeon_fx").removeHandler(handler)
            seconds = time.perf_counter() - t0
            rep = sparse.surgeon_fx_sparsity
            nm = sf.patterns.parse_sparsity(pattern)
            bad = sum(sf.check_nm(sparse, *nm, params=rep.params).values()) if isinstance(nm, tuple) else None
            ppl = perplexity(sparse, ev, progress=False)
            out.setdefault(pattern, {})[method] = {
                "ppl": ppl,
                "reached": rep.reached,
                "nm_violations": bad,
                "shots": shots,
                "seconds": seconds,
                "per_param": rep.per_param,
                "shot_log": shot_log,
                "adapted_ppl": adapted[0] if adapted else None,
            }
            if adapted:
                say(f"{pattern} {method}: the dense model after its adaptation (adapt_steps): ppl {adapted[0]:.3f}")
            say(
                f"{pattern} {method}: ppl {ppl:.3f}, zero {100 * rep.reached:.2f}%, {seconds:.0f}s, nm violations {bad}"
            )
            say(f"  per-layer sparsity: {spread(rep.per_param)}")
            if on_cell is not None:
                on_cell(out)
            del sparse
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def _graphed(fn):
    """``fn`` captured in a CUDA graph (its replay), or None when capture fails."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            fn()
        return graph.replay
    except Exception as e:  # e.g. ops that cannot be captured
        say(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); eager timing only")
        return None


def _timer(fn, label: str, min_run: float, graph: bool = False) -> float | None:
    """Median ms per call (synchronised); with ``graph`` the call is a CUDA graph replay (None if capture fails).

    Graphs remove host overhead: in torch <= 2.11 every semi-structured matmul sets up and tears down
    its cuSPARSELt descriptors on the host (~0.5 ms per call, pytorch/pytorch#153825).
    """
    from torch.utils import benchmark

    cuda = torch.cuda.is_available()
    if graph:
        fn = _graphed(fn)
        if fn is None:
            return None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        fn()  # warm-up (kernel selection)
        sync()
        m = benchmark.Timer(stmt="fn(); sync()", globals={"fn": fn, "sync": sync}, label=label).blocked_autorange(
            min_run_time=min_run
        )
    return m.median * 1e3


def speed(model, args) -> dict:
    """ms per forward: dense fp16 vs semi-structured 2:4, decoder linears alone and the whole model."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sparse = sf.compress(model, 0.0, sparsity="2:4", method="magnitude", progress=False)  # pattern only matters
    params = list(sparse.surgeon_fx_sparsity.params)
    dense = copy.deepcopy(model).to(device, dtype).eval()
    sparse = sparse.to(device, dtype).eval()
    result = {"dtype": str(dtype), "device": str(device), "rows": {}}
    semi = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    converted = []
    if semi:
        try:
            converted = sf.to_semi_structured_(sparse, params)
        except Exception as e:  # record why, keep the dense numbers
            result["semi_structured_error"] = f"{type(e).__name__}: {e}"
            semi = False
    else:
        result["semi_structured_error"] = "needs a CUDA GPU of sm80+ (dense timings only)"
    result["converted"] = len(converted)
    result["linear_layers"] = len(params)
    shapes: dict[tuple[int, int], int] = {}
    for p in params:
        shapes[tuple(dense.get_parameter(p).shape)] = shapes.get(tuple(dense.get_parameter(p).shape), 0) + 1
    modes = ("eager", "graph") if device.type == "cuda" else ("eager",)
    for batch, seq in [tuple(int(v) for v in s.split("x")) for s in args.speed_shapes.split(",")]:
        tokens = batch * seq
        for mode in modes:
            g = mode == "graph"
            lin_dense = lin_sparse = 0.0
            for (r, c), count in shapes.items():
                x = torch.randn(tokens, c, device=device, dtype=dtype)
                w = torch.randn(r, c, device=device, dtype=dtype)
                lin_dense += count * (_timer(lambda x=x, w=w: F.linear(x, w), "dense", args.min_run, g) or float("nan"))
                if semi:
                    mask = torch.tensor([1, 1, 0, 0], device=device, dtype=dtype).repeat(r, c // 4)
                    ws = torch.sparse.to_sparse_semi_structured(w * mask)
                    t = _timer(lambda x=x, ws=ws: F.linear(x, ws), "2:4", args.min_run, g)
                    lin_sparse += count * (t or float("nan"))
            ids = torch.randint(0, 100, (batch, seq), device=device)
            m_dense = _timer(lambda ids=ids: dense(input_ids=ids, use_cache=False), "model dense", args.min_run, g)
            m_sparse = (
                _timer(lambda ids=ids: sparse(input_ids=ids, use_cache=False), "model 2:4", args.min_run, g)
                if semi
                else None
            )
            row = {
                "linear_dense_ms": lin_dense,
                "linear_2to4_ms": lin_sparse if semi else None,
                "model_dense_ms": m_dense,
                "model_2to4_ms": m_sparse,
            }
            result["rows"][f"{batch}x{seq} {mode}"] = row
            say(f"speed {batch}x{seq} {mode}: {row}")
    return result


def markdown(r: dict) -> str:
    dense = r["dense_ppl"]
    methods = [m for p in r["quality"].values() for m in p]
    methods = list(dict.fromkeys(methods))
    lines = []
    if r["quality"]:
        lines = [
            f"Dense WikiText-2 PPL {dense:.2f}; cells: PPL (ratio to dense). Sparsity over the decoder linear weights.",
            "",
            "| method | " + " | ".join(r["quality"]) + " |",
            "|" + "---|" * (len(r["quality"]) + 1),
        ]
    for m in methods:
        cells = []
        for pattern in r["quality"]:
            q = r["quality"][pattern].get(m)
            cells.append(f"{q['ppl']:.2f} (x{q['ppl'] / dense:.2f})" if q else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if r["quality"]:
        lines += [
            "",
            "Seconds per run: "
            + ", ".join(
                f"{p}/{m} {q['seconds']:.0f}s ({q['shots']} shot(s))"
                for p, d in r["quality"].items()
                for m, q in d.items()
            ),
        ]
        lines += [
            f"{p}/{m}: dense model after its adaptation (adapt_steps) PPL {q['adapted_ppl']:.2f}"
            for p, d in r["quality"].items()
            for m, q in d.items()
            if q.get("adapted_ppl")
        ]
    s = r.get("speed")
    if s:
        lines += [
            "",
            f"Forward latency, {s['dtype']} on {s['device']}, ms (median, torch.utils.benchmark); "
            f"{s['converted']}/{s['linear_layers']} decoder linears in semi-structured 2:4 format.",
            "",
            "Eager: one call per op (torch <= 2.11 adds ~0.5 ms host time per semi-structured matmul, "
            "pytorch/pytorch#153825); graph: the same calls replayed from a CUDA graph.",
            "",
            "| batch x seq, mode | linears dense | linears 2:4 | speedup | model dense | model 2:4 | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        for shape, row in s["rows"].items():
            ls, ms = row["linear_2to4_ms"], row["model_2to4_ms"]
            ld, md = row["linear_dense_ms"], row["model_dense_ms"]
            lin = f"{ls:.3f} | x{ld / ls:.2f}" if ls else "- | -"
            mod = f"{ms:.3f} | x{md / ms:.2f}" if ms and md else "- | -"
            md_s = f"{md:.3f}" if md else "-"
            lines.append(f"| {shape} | {ld:.3f} | {lin} | {md_s} | {mod} |")
        if "semi_structured_error" in s:
            lines.append(f"Semi-structured: {s['semi_structured_error']}")
    lines += ["", f"Command: `{r['command']}`", f"Calibration {r['calibration']}, eval {r['eval']}"]
    lines.append(f"Versions: {r['versions']}; machine: {r['machine']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="surgeon,magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--shots", type=int, default=4, help="surgeon shots (the baselines run one shot)")
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=sf.api.PRECISIONS,
        help="arithmetic of the curvature sweeps and of the low-rank correction",
    )
    ap.add_argument("--scope", default="global", choices=("global", "layer"), help="surgeon sparsity_scope")
    ap.add_argument("--chunk-size", type=int, default=2048, help="surgeon: weights solved jointly (GPU: 2048)")
    ap.add_argument(
        "--synthetic-cache",
        default=None,
        help="folder where runs with the same teacher share their synthetic windows (':syn<N>' variants)",
    )
    ap.add_argument("--calib-pt"), ap.add_argument("--eval-pt")
    ap.add_argument("--calib-n", type=int, default=128), ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--eval-len", type=int, default=2048), ap.add_argument("--eval-windows", type=int, default=0)
    ap.add_argument("--wikitext", default=os.environ.get("SURGEON_FX_WIKITEXT"))
    ap.add_argument("--speed-shapes", default="1x128,1x2048,16x2048", help="batch x sequence of the speed table")
    ap.add_argument("--min-run", type=float, default=1.0, help="seconds of timing per measurement")
    ap.add_argument("--no-quality", action="store_true"), ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny random model and windows (CPU is fine)")
    ap.add_argument(
        "--random-llama", type=int, default=0, help="speed only: a random Llama-2-7B-shaped model, N layers"
    )
    ap.add_argument("--append", action="store_true", help="add to <out>.json (run methods/patterns in pieces)")
    ap.add_argument("--out", default="benchmarks/results/sparse_smollm2")
    args = ap.parse_args()
    if args.smoke:
        args.speed_shapes, args.min_run, args.shots = "1x64", 0.05, 2
    if args.random_llama:
        if args.random_llama < 1 or args.no_speed:
            ap.error("--random-llama takes a number of layers >= 1 and times speed only (leave out --no-speed)")
        args.no_quality = True

    device = torch.device(args.device)
    model, calib, ev = load(args)
    model = model.to(device).eval()
    result = {
        "command": " ".join(["python", *sys.argv]),
        "device": str(device),
        "calibration": None if calib is None else list(calib.shape),
        "eval": None if ev is None else list(ev.shape),
        "damping": args.damping,
        "precision": args.precision,
        "chunk_size": args.chunk_size,
    }
    out = Path(args.out)
    old = json.loads(artefact(out, ".json").read_text()) if args.append and artefact(out, ".json").exists() else {}
    result["dense_ppl"] = None if ev is None else perplexity(model, ev, progress=False)
    if ev is not None:
        say(f"dense: ppl {result['dense_ppl']:.3f}")
    if old:
        result["command"] = old["command"] + " && " + result["command"]
    result["versions"] = versions()
    result["machine"] = machine(device)
    if "speed" in old:
        result["speed"] = old["speed"]
    base = old.get("quality", {})

    def write(cells: dict) -> str:
        """Write the JSON / markdown / log as they stand (after every cell, so a cut run keeps its table)."""
        result["quality"] = {p: {**base.get(p, {}), **cells.get(p, {})} for p in {*base, *cells}}
        out.parent.mkdir(parents=True, exist_ok=True)
        text = markdown(result)
        artefact(out, ".json").write_text(json.dumps(result, indent=2))
        artefact(out, ".md").write_text(text)
        prior = "".join(f"{line}\n" for line in previous_log)
        artefact(out, ".log").write_text(prior + "\n".join([" ".join(["python", *sys.argv]), *LOG, text]) + "\n")
        return text

    log_path = artefact(out, ".log")
    previous_log = log_path.read_text().splitlines() if args.append and log_path.exists() else []
    cells = {} if args.no_quality else quality(model, calib, ev, args, on_cell=write)
    if not args.no_speed:
        result["speed"] = speed(model, args)
    print(write(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
