"""Does a longer low-rank correction after the last shot help structured pruning? (CPU diagnostic)

Compresses SmolLM2-135M to 80% of its decoder linear parameters (4 shots, 16 correction steps after
every shot, as ``../results/ablation_cpu_session7/``), then trains more correction steps on the
result with :func:`surgeon_fx.passes.lora.apply_low_rank_correction_` (the pass used on its own) and
scores WikiText-2 after each variant. A model ``compress(..., shots=4)`` returns is the same as the
one an extra final-correction option would start from, so this measures that option without it.

    python benchmarks/diag_final_correction.py --out benchmarks/results/ablation_cpu_session10/final_correction
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from _env import artefact, machine, versions
from surgeon_fx.passes.lora import apply_low_rank_correction_

import surgeon_fx as sf
from surgeon_fx.evaluate import perplexity
from surgeon_fx.models import load_smollm2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-pt", default=".stage/calib.pt")
    ap.add_argument("--eval-pt", default=".stage/eval.pt")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--final-steps", default="64,128", help="extra steps after the last shot, comma-separated")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, _ = load_smollm2()
    calib = torch.load(args.calib_pt)[: args.calib_n, : args.calib_len]
    ev = torch.load(args.eval_pt)[: args.eval_windows]
    result = {
        "command": " ".join(["python", *sys.argv]),
        "versions": versions(),
        "machine": machine(torch.device("cpu")),
    }
    result["dense_ppl"] = perplexity(model, ev, progress=False)
    t = time.perf_counter()
    kw = dict(method="surgeon", basis="linear", shots=args.shots, lora_steps=16, output="graph", progress=False)
    gm = sf.compress(model, args.ratio, calibration=calib, **kw)
    result["compress_s"] = time.perf_counter() - t
    rows = {"after the shots (16 steps per shot)": perplexity(gm, ev, progress=False)}
    print(rows, flush=True)
    variants = []
    for n in (int(x) for x in args.final_steps.split(",")):
        variants += [
            (f"+{n} next-token steps, lr 3e-4", n, 3e-4, None),
            (f"+{n} distilled steps, lr 1e-3", n, 1e-3, model),
        ]
    for name, steps, lr, teacher in variants:
        g = copy.deepcopy(gm)
        done = apply_low_rank_correction_(g, calib, steps=steps, lr=lr, seed=1000, teacher=teacher, progress=False)
        rows[name] = perplexity(g, ev, progress=False)
        print(name, f"{rows[name]:.3f}", f"training loss {done.losses[0]:.4f} -> {done.losses[-1]:.4f}", flush=True)
        del g
    result["rows"] = rows
    artefact(args.out, ".json").parent.mkdir(parents=True, exist_ok=True)
    artefact(args.out, ".json").write_text(json.dumps(result, indent=2))
    md = [f"Dense {result['dense_ppl']:.2f}; {1 - args.ratio:.0%} of the decoder linear parameters kept.", ""]
    md += ["| variant | PPL |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in rows.items()]
    md += ["", f"Command: `{result['command']}`"]
    artefact(args.out, ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
