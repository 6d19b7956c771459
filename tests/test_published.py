"""The LLM Surgeon as published (``method="published"``): uncoupled rows and columns, masked."""

from __future__ import annotations

import pytest
import torch
from families import tiny_model

import surgeon_fx as sf


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama").eval()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    return model, calib


def _linear_zeros(model) -> int:
    return sum(int((p == 0).sum()) for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)


def test_published_masks_the_target_and_keeps_shapes(setup):
    """Zeroed decoder weights equal the reported count, reach the target within one row or column,
    shapes are unchanged and the caller's model is untouched."""
    model, calib = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = sf.compress(model, 0.3, calibration=calib, method="published", shots=3, progress=False)
    res = out.surgeon_fx_masks
    assert out.surgeon_fx_plan is None
    assert _linear_zeros(out) == res.linear_zeroed
    assert 0.3 * res.linear_before <= res.linear_zeroed < 0.3 * res.linear_before + 96
    assert {k: v.shape for k, v in out.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for fqn, rows in res.rows.items():  # masked rows are exactly zero
        assert not out.get_parameter(fqn)[sorted(rows)].any()


def test_published_is_deterministic_and_shots_keep_earlier_zeros(setup):
    """Same seed, same weights; a longer schedule never un-zeroes what an earlier shot removed."""
    model, calib = setup
    seen = []

    def on_shot(t, m, res):
        seen.append({f: (set(res.rows.get(f, ())), set(res.cols.get(f, ()))) for f in res.shape})

    a = sf.compress(model, 0.2, calibration=calib, method="published", shots=2, progress=False, on_shot=on_shot)
    b = sf.compress(model, 0.2, calibration=calib, method="published", shots=2, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for f, (r, c) in seen[0].items():
        assert r <= seen[1][f][0] and c <= seen[1][f][1]


@pytest.mark.parametrize("bad", [{"uniform": True}, {"output": "graph"}, {"checkpoint_dir": "x"}, {"sparsity": "2:4"}])
def test_published_rejects_options_it_cannot_honour(setup, bad):
    """Options that only make sense for shrinking methods are refused with a clear message."""
    model, calib = setup
    with pytest.raises(ValueError, match="published"):
        sf.compress(model, 0.2, calibration=calib, method="published", progress=False, **bad)
