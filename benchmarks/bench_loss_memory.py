"""Peak memory of the low-rank correction's loss: the chunked, checkpointed loss of
``surgeon_fx.passes.lora`` against the same loss written directly over the whole logits tensor.

Each measurement runs in a process of its own (on CPU the peak is the process's maximum resident
set size, on CUDA ``torch.cuda.max_memory_allocated``), from the moment the hidden states and the
LM-head weight exist: the logits ``h @ W.T``, the loss (next-token cross-entropy, or the KL
divergence from a teacher's logits that exist beforehand, as in the correction), its backward.

    python benchmarks/bench_loss_memory.py --windows 2 --length 2048 --vocab 49152
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _env import artefact, machine, versions
from surgeon_fx.passes import lora


def whole_loss(logits, ids, teacher_logits):
    """The loss as one expression over every position (the code before chunking)."""
    if teacher_logits is None:
        targets = F.pad(ids[:, 1:], (0, 1), value=-100).flatten()
        return F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100)
    target = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    log_p = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(log_p, target, log_target=True, reduction="batchmean")


def one(args) -> None:
    """Measure one (loss, implementation) in this process and print its peak in bytes."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.windows, args.length, args.hidden, generator=gen).to(device)
    w = torch.randn(args.vocab, args.hidden, generator=gen).to(device).requires_grad_(True)
    ids = torch.randint(args.vocab, (args.windows, args.length), generator=gen).to(device)
    teacher_logits = None
    if args.loss == "distill":
        teacher_logits = torch.randn(args.windows, args.length, args.vocab, generator=gen).to(device)
    teacher = (
        None if teacher_logits is None else type("T", (torch.nn.Module,), {"forward": lambda s, x: teacher_logits})()
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logits = h @ w.T
    if args.impl == "whole":
        loss = whole_loss(logits, ids, teacher_logits)
    else:
        loss = lora._loss(logits, ids, teacher, False)
    del logits
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start
    print(json.dumps({"peak_bytes": peak, "loss": loss.item()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=2), ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=49152), ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/loss_memory_cpu")
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "LOSS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.impl, args.loss = args.one
        return one(args)
    logits_gb = args.windows * args.length * args.vocab * 4 / 1e9
    rows, lines = [], []
    for loss in ("next_token", "distill"):
        got = {}
        for impl in ("whole", "chunked"):
            cmd = [sys.executable, __file__, "--one", impl, loss] + [
                f"--{k}={getattr(args, k)}" for k in ("windows", "length", "vocab", "hidden", "device")
            ]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            got[impl] = json.loads(out) | {"seconds": time.perf_counter() - t0}
        if abs(got["whole"]["loss"] - got["chunked"]["loss"]) > 1e-4 * abs(got["whole"]["loss"]):
            raise SystemExit(f"{loss}: the losses differ: {got}")
        rows.append({"loss": loss} | {f"{k}_peak_gb": v["peak_bytes"] / 1e9 for k, v in got.items()})
        lines.append(
            f"| {loss} | {got['whole']['peak_bytes'] / 1e9:.2f} | {got['chunked']['peak_bytes'] / 1e9:.2f} "
            f"| {got['chunked']['peak_bytes'] / got['whole']['peak_bytes']:.2f} |"
        )
        print(lines[-1], flush=True)
    command = "python " + " ".join(sys.argv)
    device = torch.device(args.device)
    md = "\n".join(
        [
            f"Peak memory (GB) of logits, loss and backward, {args.windows} x {args.length} positions, vocabulary "
            f"{args.vocab} (float32 logits: {logits_gb:.2f} GB each; the teacher's logits exist before and are "
            f"counted in neither), {args.device}.",
            "",
            "| loss | whole tensor | chunked (surgeon_fx) | ratio |",
            "|---|---|---|---|",
            *lines,
            "",
            f"Command: `{command}`",
            f"Versions: {versions()}; machine: {machine(device)}",
        ]
    )
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    artefact(out, ".md").write_text(md + "\n")
    record = {"command": command, "args": vars(args), "rows": rows, "versions": versions(), "machine": machine(device)}
    artefact(out, ".json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
