"""Curvature memory of a model shape under ``max_memory``, without weights (meta device).

Traces a ``LlamaForCausalLM`` of the given shape on the meta device, runs the dependency analysis and
prints, for several ``max_memory`` bounds, how :func:`surgeon_fx.shots.curvature_blocks` splits the
layers (sweeps per shot) and the bytes of the float32 K-FAC factors. Defaults: the Llama-2-7B shape.

    python benchmarks/plan_memory.py --out benchmarks/results/plan_memory_llama2_7b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _env import artefact, versions
from bench_scale import add_shape_args, llama_config
from surgeon_fx.passes import annotate_groups
from surgeon_fx.passes.curvature import MAX_DENSE, find_layers

import surgeon_fx as sf
from surgeon_fx.shots import _factor_bytes, curvature_blocks


def main() -> int:
    from transformers import LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--bounds", default="100,70,60,50,40,35", help="max_memory values in GB")
    ap.add_argument("--out", default="benchmarks/results/plan_memory_llama2_7b")
    args = ap.parse_args()
    cfg = llama_config(args)
    t = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    gm = sf.trace(model)
    annotate_groups(gm)
    layers = [lay for lay, _ in find_layers(gm).values()]
    a_bytes = {lay.a_key: _factor_bytes(lay, MAX_DENSE)[0] for lay in layers}
    g_bytes = sum(_factor_bytes(lay, MAX_DENSE)[1] for lay in layers)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "shape": vars(args),
        "layers": len(layers),
        "max_dense": MAX_DENSE,
        "a_gb": sum(a_bytes.values()) / 1e9,
        "g_gb": g_bytes / 1e9,
        "analysis_s": time.perf_counter() - t,
        "bounds": [],
        "versions": versions(),
    }
    print(f"{len(layers)} layers: A {result['a_gb']:.2f} GB, G {result['g_gb']:.2f} GB (float32)")
    for gb in (float(x) for x in args.bounds.split(",")):
        try:
            blocks, cache = curvature_blocks(gm, int(gb * 1e9))
            row = {"max_memory_gb": gb, "sweeps_per_shot": len(blocks), "cache_gb": cache / 1e9}
        except ValueError as e:
            row = {"max_memory_gb": gb, "error": str(e)}
        result["bounds"].append(row)
        print(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    artefact(out, ".json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
