"""Why a 2:4 model can be slower than its 2:4 linear layers suggest: one layer in several call forms,
and a profile of the whole model's forward (CUDA, sm80+).

The speed table of ``bench_sparse.py --random-llama 8`` (H200, torch 2.11) showed the decoder
linears alone 1.3-1.5x faster in 2:4 form, yet the whole model 2.4x slower. This script times one
Llama-2-7B-sized layer as a bare semi-structured tensor with 2-D input, with the 3-D input a model
passes, inside ``nn.Linear`` as a parameter, and with a per-row magnitude mask instead of a fixed
one; then it profiles a 2-layer random Llama of that shape (``sf.compress(..., "2:4", "magnitude")``
and ``sf.to_semi_structured_``) and prints the ops that take the GPU time, dense and 2:4::

    python benchmarks/profile_2to4.py --out benchmarks/results/profile_2to4_h200

``--hooks-only`` instead times a ``--layers``-layer model of that shape under CUDA graphs with the
contiguous-output copy after every 2:4 layer, after none, and after all but the MLP gate/up layers.

Writes ``<out>.log`` (the printed tables) with the command, versions and machine.
"""

from __future__ import annotations

import argparse
import copy
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from _env import machine, versions
from bench_sparse import _timer, random_llama

import surgeon_fx as sf

LOG: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


def ms(fn, min_run: float) -> float:
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        t = benchmark.Timer(stmt="fn(); torch.cuda.synchronize()", globals={"fn": fn, "torch": torch})
        return t.blocked_autorange(min_run_time=min_run).median * 1e3


def layer_forms(tokens: int, min_run: float) -> None:
    dev, dt = torch.device("cuda"), torch.float16
    say(f"\n## One layer, {tokens} tokens, fp16, ms (median)\n")
    say(
        "| weight (out x in) | dense | 2:4 2-D | 2:4 3-D | nn.Linear 2:4 3-D | nn.Linear, magnitude mask "
        "| fused transpose 3-D | its output contiguous, max abs error vs dense | backend |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    for r, c in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        x2 = torch.randn(tokens, c, device=dev, dtype=dt)
        x3 = x2.view(1, tokens, c)
        w = torch.randn(r, c, device=dev, dtype=dt)
        fixed = torch.tensor([1, 1, 0, 0], device=dev, dtype=dt).repeat(r, c // 4)
        ws = torch.sparse.to_sparse_semi_structured(w * fixed)
        lin = torch.nn.Linear(c, r, bias=False, device=dev, dtype=dt)
        lin.weight = torch.nn.Parameter(torch.sparse.to_sparse_semi_structured(w * fixed), requires_grad=False)
        mag = torch.nn.Linear(c, r, bias=False, device=dev, dtype=dt)
        with torch.no_grad():
            mag.weight.copy_(w)
        keep = w.abs().view(r, c // 4, 4).argsort(-1, descending=True)[..., :2]
        mmask = torch.zeros(r, c // 4, 4, device=dev, dtype=dt).scatter_(-1, keep, 1.0).view(r, c)
        mag.weight = torch.nn.Parameter(torch.sparse.to_sparse_semi_structured(w * mmask), requires_grad=False)
        wf = torch.sparse.to_sparse_semi_structured(w * fixed)
        if isinstance(wf, torch.sparse.SparseSemiStructuredTensorCUSPARSELT):
            wf.fuse_transpose_cusparselt = True
        with torch.no_grad():
            yf = F.linear(x3, wf)
            err = (yf.float() - F.linear(x3, w * fixed).float()).abs().max().item()
        row = [
            ms(partial(F.linear, x2, w), min_run),
            ms(partial(F.linear, x2, ws), min_run),
            ms(partial(F.linear, x3, ws), min_run),
            ms(partial(lin, x3), min_run),
            ms(partial(mag, x3), min_run),
            ms(partial(F.linear, x3, wf), min_run),
        ]
        cells = " | ".join(f"{v:.3f}" for v in row)
        say(f"| {r} x {c} | {cells} | {yf.is_contiguous()}, {err:.3g} | {type(ws).__name__} |")


def dense_and_2to4(layers: int, contiguous: str = "auto"):
    """A random ``layers``-layer Llama-2-7B-shaped model, fp16 on CUDA: ``(dense, 2:4 copy with
    magnitude masks in semi-structured form, its sparsified weights, the converted ones)``."""
    dev, dt = torch.device("cuda"), torch.float16
    model = random_llama(layers)
    sparse = sf.compress(model, 0.0, sparsity="2:4", method="magnitude", progress=False)
    params = list(sparse.surgeon_fx_sparsity.params)
    dense = copy.deepcopy(model).to(dev, dt).eval()
    sparse = sparse.to(dev, dt).eval()
    return dense, sparse, params, sf.to_semi_structured_(sparse, params, contiguous=contiguous)


def profile_model(tokens: int) -> None:
    dense, sparse, params, done = dense_and_2to4(2)
    say(f"\n{len(done)}/{len(params)} decoder linears converted")
    ids = torch.randint(0, 100, (1, tokens), device="cuda")
    for name, m in (("dense", dense), ("2:4", sparse)):
        say(
            f"\n## Whole model ({name}), 2 layers, 1 x {tokens} tokens: {ms(lambda m=m: m(input_ids=ids, use_cache=False), 1.0):.3f} ms\n"
        )
        with torch.no_grad():
            for _ in range(2):
                m(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                for _ in range(3):
                    m(input_ids=ids, use_cache=False)
                torch.cuda.synchronize()
        say(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def hook_variants(layers: int, shapes: list[tuple[int, int]], min_run: float) -> None:
    """Whole-model forward under CUDA graphs with the contiguous-output hook on every 2:4 layer, on
    none, and on all but the MLP's gate/up projections (whose outputs only meet elementwise ops before
    ``down_proj``, which takes a column-major input as it is). Names are used here to pick the layers
    for this experiment only."""
    dev = torch.device("cuda")
    dense, sparse, _, _ = dense_and_2to4(layers, contiguous="all")  # every hook, to switch them off below
    hooks = {n: dict(m._forward_hooks) for n, m in sparse.named_modules() if m._forward_hooks}

    def set_hooks(keep) -> None:
        for n, m in sparse.named_modules():
            if n in hooks:
                m._forward_hooks.clear()
                if keep(n):
                    m._forward_hooks.update(hooks[n])

    variants = {
        "2:4, hook on every layer": lambda n: True,
        "2:4, no hook on gate/up": lambda n: not n.endswith(("gate_proj", "up_proj")),
        "2:4, no hook": lambda n: False,
    }
    say(f"\n## Whole model, {layers} layers, CUDA graph, fp16, ms (median)\n")
    say("| batch x seq | dense | " + " | ".join(variants) + " | max abs logit diff, no hook on gate/up vs every |")
    say("|---|---|" + "---|" * len(variants) + "---|")
    for b, t in shapes:
        ids = torch.randint(0, 100, (b, t), device=dev)
        row = [_timer(lambda ids=ids: dense(input_ids=ids, use_cache=False), "dense", min_run, graph=True)]
        outs = {}
        for label, keep in variants.items():
            set_hooks(keep)
            with torch.no_grad():
                outs[label] = sparse(input_ids=ids, use_cache=False).logits.float()
            row.append(_timer(lambda ids=ids: sparse(input_ids=ids, use_cache=False), label, min_run, graph=True))
        diff = (outs["2:4, no hook on gate/up"] - outs["2:4, hook on every layer"]).abs().max().item()
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in row)
        say(f"| {b}x{t} | {cells} | {diff:.3g} |")
        del outs
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="2048,32768", help="tokens per layer call (batch x sequence)")
    ap.add_argument("--min-run", type=float, default=0.5)
    ap.add_argument("--out", default="benchmarks/results/profile_2to4")
    ap.add_argument(
        "--hooks-only",
        action="store_true",
        help="only the whole-model CUDA-graph timing with and without the contiguous-output hooks",
    )
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the hook experiment")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        print("profile_2to4.py needs a CUDA GPU of sm80+", file=sys.stderr)
        return 2
    if args.hooks_only:
        hook_variants(args.layers, [(1, 2048), (16, 2048)], args.min_run)
    else:
        for t in (int(v) for v in args.tokens.split(",")):
            layer_forms(t, args.min_run)
        profile_model(2048)
    say(f"\nCommand: `python {' '.join(sys.argv)}`")
    say(f"Versions: {versions()}; machine: {machine(torch.device('cuda'))}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.log").write_text("\n".join(LOG) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
