"""Quality of every structured method on SmolLM2-135M: WikiText-2 perplexity at target sizes.

Compresses to 90/80/70/60/50% of the decoder linear parameters (``basis="linear"``) with each
method and scores WikiText-2 by the papers' protocol (non-overlapping windows of L tokens). The
curvature methods run one multi-shot schedule to the smallest size and are evaluated when each
size is reached (``shots_per_step`` shots per 10%); magnitude is one shot per size. Also times one
curvature sweep against a bare forward+backward over the same tokens (``--speed``).

Writes ``<out>.json`` and ``<out>.md`` with the command, versions and machine.
Typical GPU run (token windows prepared on a machine with ``datasets``, see ``--save-tokens``)::

    python benchmarks/bench_quality.py --model SmolLM2.gguf --calib-pt calib.pt --eval-pt eval.pt \\
        --device cuda --methods surgeon,magnitude --out benchmarks/results/quality_smollm2_h200_a
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from _env import ShotLog, artefact, correction_variant, machine, synthetic_cache, versions

import surgeon_fx as sf
from surgeon_fx.evaluate import perplexity


def tokens(args, tok):
    from surgeon_fx.data import calibration_windows, eval_windows, wikitext2_text

    if args.calib_pt and Path(args.calib_pt).exists():
        calib = torch.load(args.calib_pt)
    else:
        calib = calibration_windows("wiki", tok, n=args.calib_n, seq_len=args.calib_len, seed=0)
    if args.eval_pt and Path(args.eval_pt).exists():
        ev = torch.load(args.eval_pt)
    else:
        ev = eval_windows(tok, wikitext2_text(args.wikitext), seq_len=args.eval_len)
    return calib[: args.calib_n, : args.calib_len], ev[: args.eval_windows] if args.eval_windows else ev


def speed(model, calib, device, precision: str = "fp32", batch_size: int = 1) -> dict:
    """Seconds for one curvature sweep vs a bare forward+backward (parameter gradients) over ``calib``,
    both in the same arithmetic (``precision``: fp32 or tf32) and with ``batch_size`` windows per pass."""
    import torch.nn.functional as F
    from surgeon_fx.passes import annotate_groups
    from surgeon_fx.passes.curvature import annotate_curvature, sweep_precision

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    gm = sf.trace(model)
    annotate_groups(gm)
    annotate_curvature(gm, calib[:batch_size], progress=False, precision=precision, batch_size=batch_size)  # warm-up
    sync()
    t = time.perf_counter()
    annotate_curvature(gm, calib, progress=False, precision=precision, batch_size=batch_size)
    sync()
    sweep = time.perf_counter() - t
    for p in model.parameters():
        p.requires_grad_(True)
    with sweep_precision(precision, device):
        model(input_ids=calib[:batch_size].to(device), use_cache=False).logits.float().sum().backward()  # warm-up
    sync()
    t = time.perf_counter()
    for i in range(0, len(calib), batch_size):
        ids = calib[i : i + batch_size].to(device)
        with sweep_precision(precision, device):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        loss.backward()
    sync()
    bare = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "precision": precision,
        "curvature_sweep_s": sweep,
        "bare_fwd_bwd_s": bare,
        "ratio": sweep / bare,
        "windows": len(calib),
        "seq_len": calib.shape[1],
        "batch_size": batch_size,
    }


CURVATURE_METHODS = ("surgeon", "kobd", "lobd", "published")


def method_problem(method: str) -> str | None:
    """What is wrong with one ``--methods`` entry (``None`` if nothing), checked before any loading."""
    base, *opts = method.split(":")
    if base == "magnitude":
        return f"{method!r}: magnitude takes no options" if opts else None
    if base == "torch_pruning":
        if len(opts) > 1 or (opts and opts[0] not in ("taylor", "magnitude")):
            return f"{method!r}: torch_pruning takes one importance, taylor or magnitude (it runs once per size)"
        return None
    if base not in CURVATURE_METHODS:
        return f"unknown method {base!r}; use one of {(*CURVATURE_METHODS, 'magnitude', 'torch_pruning')}"
    fixed = {"noupdate", "true", "none", "columns", "rows", "both", "all", "consumers", "nores", "uniform"}
    fixed |= {"tf32", "fp32", "mixed"}
    for o in opts:
        if o in fixed or (o[:1] in ("d", "s") and o[1:].replace(".", "", 1).replace("e-", "", 1).isdigit()):
            continue
        try:  # the correction's options: one parser for the check and the run
            if correction_variant(o):
                continue
        except ValueError:  # a malformed number, e.g. "lrx"
            pass
        return f"{method!r}: unknown option {o!r} (see the variants listed in bench_quality.py)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--methods",
        default="surgeon,kobd,lobd,magnitude,published,torch_pruning",
        help="comma-separated; torch_pruning needs the `baselines` extra",
    )
    ap.add_argument("--targets", default="0.9,0.8,0.7,0.6,0.5", help="kept fractions of decoder linear parameters")
    ap.add_argument("--shots-per-step", type=int, default=2, help="shots per 10%% of parameters removed")
    ap.add_argument("--calib-pt"), ap.add_argument("--eval-pt")
    ap.add_argument("--calib-n", type=int, default=128), ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--eval-len", type=int, default=2048), ap.add_argument("--eval-windows", type=int, default=0)
    ap.add_argument("--wikitext", default=os.environ.get("SURGEON_FX_WIKITEXT"))
    ap.add_argument("--fisher", default="empirical"), ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=1, help="calibration windows per curvature forward/backward")
    ap.add_argument("--kinds", default="heads,mlp,residual")
    ap.add_argument("--update", default="columns", choices=("none", "columns", "rows", "both"))
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=sf.api.PRECISIONS,
        help="arithmetic of the curvature sweeps and the correction",
    )
    ap.add_argument("--speed", default="", help="time a curvature sweep against a bare fwd+bwd in these precisions")
    ap.add_argument("--speed-only", action="store_true", help="skip the quality table (with --speed)")
    ap.add_argument("--save-tokens", default=None, help="write calib.pt and eval.pt to this folder and exit")
    ap.add_argument(
        "--dense-lora-steps", type=int, default=0, help="also score the dense model after this many correction steps"
    )
    ap.add_argument("--dense-lora-lr", type=float, default=3e-4, help="their learning rate (default 3e-4)")
    ap.add_argument(
        "--synthetic-cache",
        default=None,
        help="folder where runs with the same teacher share their synthetic windows (':syn<N>' variants)",
    )
    ap.add_argument("--out", default="benchmarks/results/quality_smollm2")
    args = ap.parse_args()
    for method in args.methods.split(","):
        problem = method_problem(method)
        if problem:
            ap.error(f"--methods: {problem}")

    from surgeon_fx.models import load_model

    device = torch.device(args.device)
    model, tok = load_model(args.model)
    calib, ev = tokens(args, tok)
    if args.save_tokens:
        Path(args.save_tokens).mkdir(parents=True, exist_ok=True)
        torch.save(calib, Path(args.save_tokens) / "calib.pt")
        torch.save(ev, Path(args.save_tokens) / "eval.pt")
        print(f"saved {tuple(calib.shape)} calibration and {tuple(ev.shape)} evaluation windows")
        return 0
    model = model.to(device).eval()
    targets = sorted((float(x) for x in args.targets.split(",")), reverse=True)
    kinds = tuple(args.kinds.split(","))
    result = {
        "command": " ".join(["python", *sys.argv]),
        "device": str(device),
        "targets": targets,
        "calibration": list(calib.shape),
        "eval": list(ev.shape),
        "fisher": args.fisher,
        "precision": args.precision,
        "kinds": kinds,
        "methods": {},
    }
    t = time.perf_counter()
    result["dense_ppl"] = perplexity(model, ev, progress=False)
    print(f"dense: ppl {result['dense_ppl']:.3f} ({time.perf_counter() - t:.1f}s)", flush=True)
    out = Path(args.out)
    if args.dense_lora_steps:  # reference: the same correction on the unpruned model
        import copy

        from surgeon_fx.passes import annotate_groups
        from surgeon_fx.passes.lora import apply_low_rank_correction_

        tuned = copy.deepcopy(model)
        gm = sf.trace(tuned)
        annotate_groups(gm)
        steps, lr, rank = args.dense_lora_steps, args.dense_lora_lr, sf.CompressConfig.lora_rank  # compress's default
        apply_low_rank_correction_(gm, calib, steps=steps, rank=rank, lr=lr, batch_size=args.batch_size, progress=False)
        result["dense_lora"] = {"steps": steps, "lr": lr, "rank": rank, "ppl": perplexity(tuned, ev, progress=False)}
        print(f"dense + {steps} correction steps (lr {lr}): ppl {result['dense_lora']['ppl']:.3f}", flush=True)
        del tuned, gm
    if args.speed:
        result["speed"] = []
        for prec in args.speed.split(","):
            result["speed"].append(speed(model, calib, device, prec, args.batch_size))
            print("speed", result["speed"][-1], flush=True)
            save(out, result)
    for method in [] if args.speed_only else args.methods.split(","):
        rows = {}
        timing = None
        adapted: list[float] = []  # the adapted dense model's PPL, with an ":ad<N>" variant
        shot_log: list[str] = []
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if method == "magnitude" or method.startswith("torch_pruning"):
            for keep in targets:
                if method == "magnitude":
                    small = sf.compress(
                        model, 1 - keep, method="magnitude", basis="linear", kinds=kinds, progress=False
                    )
                    rows[keep] = _row(small, ev, time.perf_counter() - t0)
                else:  # "torch_pruning" (Taylor importance) or "torch_pruning:magnitude", one run per size
                    from surgeon_fx.baselines import torch_pruning_compress

                    importance = method.split(":")[1] if ":" in method else "taylor"
                    small = torch_pruning_compress(
                        model, 1 - keep, calib, importance=importance, basis="linear", progress=False
                    )
                    rep = small.surgeon_fx_baseline
                    rows[keep] = {
                        "ppl": perplexity(small, ev, progress=False),
                        "linear_kept": rep.basis_after / rep.basis_before,
                        "params": rep.params_after,
                        "seconds": time.perf_counter() - t0,
                        "shot": None,
                    }
                del small
                print(method, keep, rows[keep], flush=True)
                result["methods"][method] = {"rows": {str(k): v for k, v in rows.items()}, "partial": True}
                save(out, result)
        else:
            steps = round((1 - targets[-1]) * 10)
            shots = steps * args.shots_per_step
            pending = list(targets)

            eval_s = [0.0]

            def on_shot(shot, m, plan, rows=rows, pending=pending, method=method, t0=t0, log=shot_log, ev_s=eval_s):
                while pending and plan.linear_after <= pending[0] * plan.linear_before + 1:
                    keep = pending.pop(0)
                    te = time.perf_counter()
                    rows[keep] = _row(m, ev, te - t0, plan, shot)
                    rows[keep]["compress_s"] = te - t0 - ev_s[0]  # wall time without the evaluations
                    ev_s[0] += time.perf_counter() - te
                    print(method, keep, rows[keep], flush=True)
                    result["methods"][method] = {
                        "rows": {str(k): v for k, v in rows.items()},
                        "partial": True,
                        "shot_log": log,
                    }
                    save(out, result)

            handler = ShotLog(shot_log)
            logging.getLogger("surgeon_fx").addHandler(handler)
            logging.getLogger("surgeon_fx").setLevel(logging.INFO)

            # variants: "surgeon:noupdate" (costs only), "surgeon:d0.1" (damping 0.1), "surgeon:true" (true
            # Fisher), "surgeon:s4" (4 shots per 10%), "surgeon:nores" (no residual channels), "surgeon:all"
            # (producer rows in the costs too), "surgeon:both" (update rows too), "surgeon:tf32",
            # "surgeon:l16" (16 low-rank correction steps after every shot; ":r8" its rank, ":rfull" the weights
            # themselves, ":lr1e-3" its rate (":lre1e-3" the last shot's), ":lb8" windows per step, ":h8"
            # windows held out as its guard, ":distill" trained on the original model's predictions,
            # ":distillnt" on the mean of that and the next-token loss, ":ntw0.25" on both with the next-token
            # share 0.25, ":ntwe0" that share going down to 0 by the last shot, ":norms" the 1-D parameters
            # trained too, ":cos" a cosine-decayed rate, ":ad32" 32 next-token steps on the unpruned model
            # before the first shot, which is then the teacher too, ":adlr3e-4" their rate, ":syn256" 256
            # windows of the teacher's own text trained on too),
            # "surgeon:uniform" (same widths in every layer)
            base, *opts = method.split(":")
            extra = {
                "update": "none" if "noupdate" in opts else args.update,
                "damping": args.damping,
                "fisher": args.fisher,
                "precision": args.precision,
                "kinds": kinds,
                "batch_size": args.batch_size,
            }
            for o in opts:
                if correction := correction_variant(o):  # low-rank correction steps, rate, rank
                    extra |= correction
                elif o.startswith("d"):
                    extra["damping"] = float(o[1:])
                elif o == "true":
                    extra["fisher"] = "true"
                elif o == "uniform":  # the same widths in every layer
                    extra["uniform"] = True
                elif o in ("none", "columns", "rows", "both"):
                    extra["update"] = o
                elif o.startswith("s"):  # shots per 10%
                    shots = steps * int(o[1:])
                elif o in ("all", "consumers"):
                    extra["sides"] = o
                elif o == "nores":
                    extra["kinds"] = tuple(k for k in kinds if k != "residual")
                elif o in ("tf32", "fp32", "mixed"):
                    extra["precision"] = o
            opts = dict(method=base, basis="linear", shots=shots, **extra)
            cache = synthetic_cache(args.synthetic_cache, args.model, calib, 1 - targets[-1], opts)
            small = sf.compress(
                model,
                1 - targets[-1],
                calibration=calib,
                progress=False,
                on_shot=on_shot,
                on_adapt=lambda m, into=adapted: into.append(score_adapted(m, ev)),
                **opts,
                **cache,
            )
            logging.getLogger("surgeon_fx").removeHandler(handler)
            timings = getattr(small, "surgeon_fx_timings", None)
            if timings:
                stages = {k: sum(t.get(k, 0.0) for t in timings) / len(timings) for k in timings[0]}
                timing = {"shots": shots, "mean_stage_s": stages, "per_shot_s": [sum(t.values()) for t in timings]}
            del small
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
        result["methods"][method] = {
            "rows": {str(k): v for k, v in rows.items()},
            "total_s": time.perf_counter() - t0,
            "peak_gpu_gb": peak,
            "timing": timing,
            "shot_log": shot_log,
            "adapted_ppl": adapted[0] if adapted else None,
        }
        save(out, result)
    result["versions"] = versions()
    result["machine"] = machine(device)
    save(out, result)
    print(markdown(result))
    return 0


def score_adapted(model, ev) -> float:
    """WikiText-2 perplexity of the adapted dense model (``compress``'s ``on_adapt``), printed."""
    ppl = perplexity(model, ev, progress=False)
    print(f"adapted dense: ppl {ppl:.3f}", flush=True)
    return ppl


def save(out: Path, result: dict) -> None:
    """Write ``<out>.json`` and ``<out>.md`` (after every row, so a cut-short run keeps its rows)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    artefact(out, ".json").write_text(json.dumps(result, indent=2))
    artefact(out, ".md").write_text(markdown(result))


def _row(model, ev, seconds, plan=None, shot=None) -> dict:
    plan = plan or model.surgeon_fx_plan
    ppl = perplexity(model, ev, progress=False)
    return {
        "ppl": ppl,
        "linear_kept": plan.linear_after / plan.linear_before,
        "params": plan.params_after,
        "seconds": seconds,
        "shot": shot,
        # where the removals went: [out, in] of every linear layer (kept heads, units, residual width)
        "linear_shapes": {n: list(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)},
    }


def markdown(result: dict) -> str:
    targets = result["targets"]
    dense = result["dense_ppl"]
    head = "| method | " + " | ".join(f"{int(round(k * 100))}%" for k in targets) + " |"
    lines = [
        f"Dense WikiText-2 PPL {dense:.2f}; cells: PPL (ratio to dense).",
        "",
    ]
    if "dense_lora" in result:
        d = result["dense_lora"]
        lines += [f"Dense after {d['steps']} correction steps (lr {d['lr']}, rank {d['rank']}): {d['ppl']:.2f}.", ""]
    lines += [
        head,
        "|" + "---|" * (len(targets) + 1),
    ]
    for method, res in result["methods"].items():
        cells = []
        for k in targets:
            r = res["rows"].get(str(k))
            cells.append(f"{r['ppl']:.2f} (x{r['ppl'] / dense:.2f})" if r else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Command: `{result['command']}`",
        f"Calibration {result['calibration']}, eval {result['eval']}, "
        f"fisher {result['fisher']}, kinds {result['kinds']}",
    ]
    for s in result.get("speed", []):
        lines.append(
            f"Curvature sweep ({s['precision']}) {s['curvature_sweep_s']:.1f}s vs bare forward+backward "
            f"{s['bare_fwd_bwd_s']:.1f}s (x{s['ratio']:.2f}) over {s['windows']} x {s['seq_len']} tokens"
        )
    for method, res in result["methods"].items():
        if res.get("partial"):
            lines.append(f"{method}: cut short (rows so far)")
            continue
        lines.append(f"{method}: total {res['total_s']:.0f}s, peak GPU memory {res['peak_gpu_gb']} GB")
        if res.get("adapted_ppl"):
            lines.append(f"  dense model after its adaptation (adapt_steps): PPL {res['adapted_ppl']:.2f}")
        if res.get("timing"):
            tm = res["timing"]
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in tm["mean_stage_s"].items())
            lines.append(f"  {tm['shots']} shots, {sum(tm['per_shot_s']):.0f}s in shots; mean per shot: {stages}")
    lines.append(f"Versions: {result.get('versions')}; machine: {result.get('machine')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
