"""CPU ablation of the OBS update policy on SmolLM2-135M: one shot to 10% of the decoder linear
parameters, 16 x 256 calibration tokens (packaged Wikipedia), 8 x 256 WikiText-2 held-out tokens.

Run: python benchmarks/ablation_update.py  (prints one line per method/policy)
"""

import time

import torch

torch.set_num_threads(2)
from surgeon_fx.passes import annotate_groups, apply_plan, get_groups, make_plan
from surgeon_fx.passes.curvature import annotate_curvature
from surgeon_fx.passes.obs import annotate_costs, apply_obs_updates_

import surgeon_fx as sf
from surgeon_fx.data import calibration_windows, eval_windows, wikitext2_text
from surgeon_fx.evaluate import perplexity
from surgeon_fx.models import load_smollm2

model, tok = load_smollm2()
calib = calibration_windows("wiki", tok, n=16, seq_len=256, seed=0)
held = eval_windows(
    tok,
    wikitext2_text(
        str(__import__("pathlib").Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/test.jsonl")
    ),
    seq_len=256,
    max_windows=8,
)
gm0 = sf.trace(model)
annotate_groups(gm0)
annotate_curvature(gm0, calib, progress=False)
sd = {k: v.clone() for k, v in model.state_dict().items()}
for method, pol in [("kobd", "none"), ("surgeon", "none"), ("surgeon", "columns"), ("surgeon", "both")]:
    model.load_state_dict(sd)
    t = time.time()
    annotate_costs(gm0, method=method, update=pol)
    plan = make_plan(get_groups(gm0), gm0.meta[sf.SCORES], 0.1, basis="linear")
    if method == "surgeon" and pol != "none":
        apply_obs_updates_(gm0, plan, rows=pol in ("rows", "both"), cols=pol in ("columns", "both"))
    new = apply_plan(gm0, plan)
    print(
        f"{method} update={pol}: ppl {perplexity(new, held, progress=False):.3f} ({time.time() - t:.0f}s)", flush=True
    )
