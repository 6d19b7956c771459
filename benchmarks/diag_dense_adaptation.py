"""How much does the unpruned model gain from the correction's next-token steps on the calibration text?

Runs the library's adaptation (:func:`surgeon_fx.shots.adapt_`, what ``compress(..., adapt_steps=N)``
does before its first shot: the low-rank correction on the next-token loss, no teacher) on the dense
model in rounds, merging after each, and scores WikiText-2 after every round. A gain here is adaptation to the calibration text, not repair
of pruning damage: it says whether a teacher adapted first (distilling from it instead of the
original) has room to help, and how many steps it takes before the calibration windows are overfit.

    python benchmarks/diag_dense_adaptation.py --model $MODEL --calib-pt .stage/calib.pt \
        --eval-pt .stage/eval.pt --device cuda --precision mixed --rounds 16,16,32 --out /root/res/dense_adapt
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _env import artefact, machine, versions

import surgeon_fx as sf
from surgeon_fx.evaluate import perplexity
from surgeon_fx.models import load_model
from surgeon_fx.shots import adapt_


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib-pt", required=True, help="(N, L) calibration token ids (bench_quality --save-tokens)")
    ap.add_argument("--eval-pt", required=True, help="(M, L) WikiText-2 windows (bench_quality --save-tokens)")
    ap.add_argument("--calib-n", type=int, default=0, help="first N calibration windows (0: all)")
    ap.add_argument("--calib-len", type=int, default=0, help="first L tokens of each (0: all)")
    ap.add_argument("--eval-windows", type=int, default=0, help="first M evaluation windows (0: all)")
    ap.add_argument("--rounds", default="16,16,32", help="correction steps per round, comma-separated")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=8, help="windows per step")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward/backward")
    ap.add_argument("--precision", default="mixed", choices=sf.api.PRECISIONS)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rounds = [int(x) for x in args.rounds.split(",")]
    if not rounds or min(rounds) < 1:
        ap.error(f"--rounds: positive step counts, got {args.rounds!r}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, _ = load_model(args.model)
    model = model.to(device).eval()
    calib = torch.load(args.calib_pt)
    calib = calib[: args.calib_n or len(calib), : args.calib_len or calib.shape[1]]
    ev = torch.load(args.eval_pt)
    ev = ev[: args.eval_windows or len(ev)]
    result = {
        "command": " ".join(["python", *sys.argv]),
        "versions": versions(),
        "machine": machine(device),
        "calibration": list(calib.shape),
        "eval": list(ev.shape),
        "settings": {k: getattr(args, k) for k in ("rank", "lr", "batch_size", "micro_batch_size", "precision")},
        "rows": [],
    }
    t = time.perf_counter()
    result["rows"].append({"steps": 0, "ppl": perplexity(model, ev, progress=False)})
    print(f"dense: ppl {result['rows'][-1]['ppl']:.3f} ({time.perf_counter() - t:.1f}s)", flush=True)
    done = 0
    for i, steps in enumerate(rounds):
        t = time.perf_counter()
        cfg = sf.CompressConfig(
            ratio=0.0,
            adapt_steps=steps,
            adapt_rank=args.rank,
            adapt_lr=args.lr,
            lora_batch_size=args.batch_size,
            batch_size=args.micro_batch_size,
            precision=args.precision,
            seed=i,
        )
        corr = adapt_(model, calib, cfg, progress=False)
        done += steps
        trained = time.perf_counter() - t
        ppl = perplexity(model, ev, progress=False)
        loss = sum(corr.losses[-4:]) / len(corr.losses[-4:])
        result["rows"].append({"steps": done, "ppl": ppl, "train_loss_last4": loss, "seconds": trained})
        print(f"after {done} steps: ppl {ppl:.3f}, training loss {loss:.4f} (last 4), {trained:.1f}s", flush=True)
        artefact(args.out, ".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"Dense model after next-token correction steps (rank {args.rank}, lr {args.lr}, "
        f"{args.batch_size} windows per step, {args.precision}); calibration {list(calib.shape)}, "
        f"eval {list(ev.shape)}.",
        "",
        "| steps | WikiText-2 PPL | training loss (last 4 steps) |",
        "|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['steps']} | {r['ppl']:.2f} | {r.get('train_loss_last4', float('nan')):.4f} |")
    lines += ["", f"Command: `{result['command']}`", f"Versions: {result['versions']}; machine: {result['machine']}"]
    artefact(args.out, ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
