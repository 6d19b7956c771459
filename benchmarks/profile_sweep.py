"""Profile one curvature sweep on the GPU: torch.profiler table of the top CUDA and CPU ops.

python benchmarks/profile_sweep.py --model SmolLM2.gguf --calib-pt calib.pt --batch-size 8 --windows 16
"""

import argparse
import time

import torch
from surgeon_fx.passes import annotate_groups
from surgeon_fx.passes.curvature import annotate_curvature

import surgeon_fx as sf
from surgeon_fx.models import load_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-pt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--precision", default="tf32")
    args = ap.parse_args()
    model, _ = load_model(args.model)
    model = model.cuda().eval()
    calib = torch.load(args.calib_pt)[: args.windows]
    gm = sf.trace(model)
    annotate_groups(gm)
    kw = dict(progress=False, precision=args.precision, batch_size=args.batch_size)
    annotate_curvature(gm, calib[: args.batch_size], **kw)
    torch.cuda.synchronize()
    t = time.perf_counter()
    annotate_curvature(gm, calib, **kw)
    torch.cuda.synchronize()
    print(f"sweep {args.windows} windows: {time.perf_counter() - t:.2f}s", flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        annotate_curvature(gm, calib, **kw)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
