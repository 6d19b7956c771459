"""Time and memory of structured surgery on a Llama-2-7B-shaped model (random weights) — issue 6.

Builds ``LlamaForCausalLM`` with the given shape directly on the device (random init, default
bfloat16), random calibration tokens, and runs the surgeon's shots to ``--ratio`` of the decoder
linear parameters with ``--max-memory`` bounding the curvature state. Records wall time and peak
GPU memory per shot (and each shot's stage timings), the whole run's time, and the settings.

The model is compressed in place through :func:`surgeon_fx.shots.run_shots` (``compress`` would
first copy it, which on one GPU doubles the weights' memory; the shots are the same code).

Full run on the H200 (about 13.5 GB of bf16 weights)::

    python benchmarks/bench_scale.py --device cuda --max-memory 40GB --out benchmarks/results/scale_7b_h200

Several GPUs of one host (each rank sweeps its share of the calibration windows; factors are
all-reduced, so every rank makes the same plan; rank 0 records)::

    torchrun --nproc-per-node 2 benchmarks/bench_scale.py --device cuda --max-memory 48GB --out benchmarks/results/scale_7b_h200x2

CPU smoke run of the same code path (tiny shape; add ``torchrun --nproc-per-node 2`` for two gloo ranks)::

    python benchmarks/bench_scale.py --device cpu --layers 2 --hidden 64 --heads 4 --kv-heads 4 --mlp 160 \\
        --vocab 256 --calib-n 4 --calib-len 32 --shots 2 --max-memory 3MB --out /tmp/scale_smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from _env import artefact, machine, versions


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model-shape options (defaults: Llama-2-7B), shared with ``plan_memory.py``."""
    ap.add_argument("--layers", type=int, default=32), ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32), ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--mlp", type=int, default=11008), ap.add_argument("--vocab", type=int, default=32000)


def llama_config(args, max_positions: int = 4096):
    """A ``LlamaConfig`` of the shape in ``args`` (see :func:`add_shape_args`), untied LM head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def build(args, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    cfg = llama_config(args, max(4096, args.calib_len))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def main() -> int:
    from surgeon_fx.launch import process_group

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    add_shape_args(ap)
    ap.add_argument("--calib-n", type=int, default=128), ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.2, help="fraction of decoder linear parameters removed")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--method", default="surgeon")
    ap.add_argument("--precision", default="tf32", choices=("fp32", "tf32", "mixed"))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-memory", default=None, help="curvature memory bound, e.g. 40GB (default: none)")
    ap.add_argument("--out", default="benchmarks/results/scale_7b")
    args = ap.parse_args()
    with process_group(args.device) as device:  # one process, or one rank of torchrun
        return run(args, torch.device(device))


def run(args, device: torch.device) -> int:
    from surgeon_fx.api import CompressConfig
    from surgeon_fx.launch import is_main, rank_and_world
    from surgeon_fx.shots import run_shots

    main = is_main()
    dtype = getattr(torch, args.dtype)
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")
    result = {"command": " ".join(["python", *sys.argv]), "settings": vars(args), "world_size": rank_and_world()[1]}
    out = Path(args.out)
    t0 = time.perf_counter()
    model = build(args, device, dtype)
    result["build_s"] = time.perf_counter() - t0
    result["params"] = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, args.vocab, (args.calib_n, args.calib_len), generator=gen)
    cfg = CompressConfig(
        ratio=args.ratio,
        method=args.method,
        basis="linear",
        shots=args.shots,
        precision=args.precision,
        batch_size=args.batch_size,
        max_memory=args.max_memory,
    )
    cuda = device.type == "cuda"
    shots: list[dict] = []
    last = [time.perf_counter()]

    def on_shot(shot, m, plan):
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        stages = dict(m._surgeon_fx_timings[-1])
        row = {
            "shot": shot,
            "seconds": sum(stages.values()),
            "wall_since_previous_s": now - last[0],
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "linear_kept": plan.linear_after / plan.linear_before,
            "stages": stages,
        }
        shots.append(row)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        last[0] = time.perf_counter()
        result["shots"] = shots
        if main:  # every rank holds the same model; rank 0 records (its own memory)
            print(json.dumps(row), flush=True)
            save(out, result)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    plan = run_shots(model, calib, cfg, progress=False, on_shot=on_shot)
    result["run_s"] = time.perf_counter() - t1
    result["outside_shots_s"] = result["run_s"] - sum(r["seconds"] for r in shots)  # trace, first analysis
    result["linear_kept"] = plan.linear_after / plan.linear_before
    result["params_after"] = plan.params_after
    result["peak_gpu_gb_max"] = max((r["peak_gpu_gb"] or 0) for r in shots) if cuda else None
    result["versions"], result["machine"] = versions(), machine(device)
    if main:
        save(out, result)
        print(json.dumps({k: v for k, v in result.items() if k != "shots"}, indent=1))
    return 0


def save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    artefact(out, ".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
