"""CPU ablation of the OBS update policy, the cost sides and the norm rescaling on SmolLM2-135M.

One shot to 10% of the decoder linear parameters, 16 x 256 calibration tokens (packaged Wikipedia),
8 x 256 WikiText-2 held-out tokens. Run: ``python benchmarks/ablation_update.py [WIKITEXT_JSONL]``;
prints one line per method/policy (results: ``benchmarks/results/ablation_update_cpu.md``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from surgeon_fx.passes import annotate_groups, apply_plan, get_groups, make_plan
from surgeon_fx.passes.curvature import annotate_curvature
from surgeon_fx.passes.norms import rescale_norms_
from surgeon_fx.passes.obs import annotate_costs, apply_obs_updates_

import surgeon_fx as sf
from surgeon_fx.data import calibration_windows, eval_windows, wikitext2_text
from surgeon_fx.evaluate import perplexity
from surgeon_fx.models import load_smollm2

DEFAULT_WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/test.jsonl"


def main() -> None:
    torch.set_num_threads(2)
    model, tok = load_smollm2()
    calib = calibration_windows("wiki", tok, n=16, seq_len=256, seed=0)
    text = wikitext2_text(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_WIKITEXT)
    held = eval_windows(tok, text, seq_len=256, max_windows=8)
    gm = sf.trace(model)
    annotate_groups(gm)
    annotate_curvature(gm, calib, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    variants = [  # (method, update, sides, rescale_norms)
        ("kobd", "none", "all", False),
        ("kobd", "none", "all", True),
        ("surgeon", "columns", "all", False),
        ("surgeon", "columns", "all", True),
        ("surgeon", "columns", "consumers", False),
        ("surgeon", "columns", "consumers", True),
    ]
    for method, policy, sides, rescale in variants:
        model.load_state_dict(state)  # the graph shares the model's parameters
        t = time.time()
        annotate_costs(gm, method=method, update=policy, sides=sides)
        plan = make_plan(get_groups(gm), gm.meta[sf.SCORES], 0.1, basis="linear")
        if method == "surgeon" and policy != "none":
            apply_obs_updates_(gm, plan, rows=policy in ("rows", "both"), cols=policy in ("columns", "both"))
        if rescale:
            rescale_norms_(gm, plan)
        ppl = perplexity(apply_plan(gm, plan), held, progress=False)
        kinds = {g.kind: 0 for g in get_groups(gm).groups}
        for name, atoms in plan.removed.items():
            kinds[get_groups(gm).group(name).kind] += len(atoms)
        print(
            f"{method} update={policy} sides={sides} rescale_norms={rescale}: ppl {ppl:.3f} "
            f"(atoms removed {kinds}; {time.time() - t:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
