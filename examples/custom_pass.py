"""Insert your own pass between planning and rewriting, and compose with plain torch.fx passes.

The pipeline's stages are public functions over a ``GraphModule``. Here a user pass protects the
first and last decoder layers by editing the scores before planning, another pass inspects the plan,
and torch.fx's own dead-code elimination runs on the rewritten graph.

Run: ``python examples/custom_pass.py`` (a tiny random Llama; no downloads).
"""

from __future__ import annotations

import torch
import transformers
from surgeon_fx.passes import annotate_groups, annotate_plan, annotate_scores, apply_plan, get_groups
from torch import fx

import surgeon_fx as sf


def protect_layers_(gm: fx.GraphModule, *, layers: tuple[str, ...]) -> None:
    """User analysis pass: make every group owned by the given modules expensive to remove."""
    scores = gm.meta[sf.SCORES]
    values = {
        name: tuple(v * 1e6 for v in vals) if name.startswith(layers) else vals for name, vals in scores.values.items()
    }
    gm.meta[sf.SCORES] = sf.Scores(scores.method + "+protected", values)


def report_plan(gm: fx.GraphModule) -> None:
    """User analysis pass: print what the plan removes (reads gm.meta only)."""
    print(gm.meta[sf.PLAN].summary(per_group=True))


def main() -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()

    gm = sf.trace(model)
    annotate_groups(gm)
    print(get_groups(gm).summary())
    annotate_scores(gm, method="magnitude")
    protect_layers_(gm, layers=("model.layers.0.", "model.layers.3."))  # <- user pass
    annotate_plan(gm, 0.3, kinds=("heads", "mlp"))
    report_plan(gm)  # <- user pass
    small = apply_plan(gm)
    small.graph.eliminate_dead_code()  # <- a plain torch.fx pass composes as usual
    small.recompile()

    plan = gm.meta[sf.PLAN]
    assert not any(name.startswith(("model.layers.0.", "model.layers.3.")) for name in plan.removed)
    ids = torch.randint(0, 256, (2, 12))
    print("logits", tuple(small(ids).shape), "parameters", sum(p.numel() for p in small.parameters()))


if __name__ == "__main__":
    main()
