"""Latency and throughput of dense vs 30%-compressed SmolLM2-135M on CPU, in torch and in onnxruntime.

Reads: the packaged SmolLM2-135M. Writes: ``benchmarks/results/latency_smollm2_cpu.{json,md}`` with the
command, versions, machine and the load average before and after (other processes skew CPU timings).
Invariant: every variant runs the same token ids; runs are interleaved across variants (shape by shape,
repeat by repeat) so drifting machine load affects them alike; the number is the median after a warm-up.

Run: ``python benchmarks/bench_latency.py [--threads 2] [--repeats 5]``. Variants: ``dense``;
``compressed`` = ``compress(model, 0.3, method="magnitude", kinds=("heads", "mlp", "residual"))``;
``uniform-8`` / ``uniform-64`` = the same with ``uniform=True, multiple=8`` / ``64`` (same widths in every
layer, kept widths multiples of 8 / 64 atoms where possible).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import surgeon_fx as sf
from surgeon_fx.evaluate import count_parameters
from surgeon_fx.export import export_onnx
from surgeon_fx.models import load_smollm2
from surgeon_fx.tracing import LogitsWrapper

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ((1, 128), (1, 512), (8, 128), (8, 512))


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def ort_runner(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda ids: session.run(None, {"input_ids": ids.numpy()})[0]


def torch_runner(model):
    wrapper = LogitsWrapper(model).eval()

    def run(ids):
        with torch.inference_mode():
            return wrapper(ids)

    return run


def measure(runners: dict, repeats: int) -> dict:
    """``{variant: {shape: median seconds}}``, interleaving variants within every repeat."""
    out: dict[str, dict[str, float]] = {v: {} for v in runners}
    for b, s in SHAPES:
        ids = torch.randint(0, 49152, (b, s), generator=torch.Generator().manual_seed(b * 1000 + s))
        n = max(3, repeats if b * s <= 1024 else repeats - 2)
        times: dict[str, list[float]] = {v: [] for v in runners}
        for run in runners.values():
            run(ids)  # warm-up
        for _ in range(n):
            for v, run in runners.items():
                t = time.perf_counter()
                run(ids)
                times[v].append(time.perf_counter() - t)
        for v in runners:
            out[v][f"{b}x{s}"] = statistics.median(times[v])
        row = "  ".join(f"{v} {out[v][f'{b}x{s}'] * 1e3:8.1f} ms" for v in runners)
        print(f"  {b}x{s}: {row}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per shape (8x512: two fewer; default 5)")
    ap.add_argument("--ratio", type=float, default=0.3, help="fraction of parameters removed (default 0.3)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = loadavg()
    dense, _ = load_smollm2()
    kinds = ("heads", "mlp", "residual")
    models = {
        "dense": dense,
        "compressed": sf.compress(dense, args.ratio, method="magnitude", kinds=kinds, progress=False),
        **{
            f"uniform-{k}": sf.compress(dense, args.ratio, kinds=kinds, uniform=True, multiple=k, progress=False)
            for k in (8, 64)
        },
    }
    params = {v: count_parameters(m) for v, m in models.items()}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_files = {v: export_onnx(m, Path(tmp) / v / "model.onnx") for v, m in models.items()}
        onnx_mb = {v: sum(f.stat().st_size for f in p.parent.iterdir()) / 1e6 for v, p in onnx_files.items()}
        print(f"torch eager ({args.threads} threads)", flush=True)
        results["torch"] = measure({v: torch_runner(m) for v, m in models.items()}, args.repeats)
        print(f"onnxruntime ({args.threads} threads)", flush=True)
        results["onnxruntime"] = measure({v: ort_runner(p, args.threads) for v, p in onnx_files.items()}, args.repeats)
    rows = []
    for rt, table in results.items():
        for shape in table["dense"]:
            b, s = map(int, shape.split("x"))
            for v in models:
                sec = table[v][shape]
                rows.append(
                    {
                        "runtime": rt,
                        "shape": shape,
                        "variant": v,
                        "ms": sec * 1e3,
                        "tokens_per_s": b * s / sec,
                        "speedup": table["dense"][shape] / sec,
                    }
                )
    record = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "versions": {
            "surgeon_fx": sf.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "threads": args.threads,
        "load_average_before_after": [load_before, loadavg()],
        "parameters": params,
        "parameter_ratio": {v: params["dense"] / n for v, n in params.items()},
        "onnx_mb": onnx_mb,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latency_smollm2_cpu.json").write_text(json.dumps(record, indent=2))
    md = [
        "# Latency: dense vs compressed SmolLM2-135M on CPU",
        "",
        f"Command: `{record['command']}`  ",
        f"Machine: {record['machine']}; {args.threads} threads; load average (1/5/15 min) before "
        f"{record['load_average_before_after'][0]}, after {record['load_average_before_after'][1]}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()),
        "",
        "Parameters: " + ", ".join(f"{v} {n:,} (x{record['parameter_ratio'][v]:.2f} fewer)" for v, n in params.items()),
        "",
        "| runtime | batch x tokens | variant | latency (ms) | tokens/s | speedup vs dense | parameter ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['runtime']} | {r['shape']} | {r['variant']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} "
        f"| x{r['speedup']:.2f} | x{record['parameter_ratio'][r['variant']]:.2f} |"
        for r in rows
    ]
    (RESULTS / "latency_smollm2_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
