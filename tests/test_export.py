"""ONNX and .pt2 exports of compressed (uneven) models match torch on fresh inputs of other sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, ids, logits, tiny_model

import surgeon_fx as sf
from surgeon_fx.export import check_export, export_onnx, export_pt2
from surgeon_fx.keys import SurgeonError


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_matches_torch_at_two_sizes(family, tmp_path):
    """Dynamic batch and sequence: onnxruntime agrees with torch to 1e-4 on (1, 5) and (4, 23) fresh ids."""
    import onnx
    import onnxruntime as ort

    small = sf.compress(tiny_model(family), 0.3, progress=False)
    external = family == "llama"
    path = export_onnx(small, tmp_path / "model.onnx", external_data=external)
    assert (tmp_path / "model.onnx.data").is_file() == external
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (graph.input[0], graph.output[0])
    ]
    assert dims == [["batch", "sequence"], ["batch", "sequence", small.config.vocab_size]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, s in ((1, 5), (4, 23)):
        x = ids(b, s, seed=100 + s)
        out = session.run(None, {"input_ids": x.numpy()})[0]
        assert np.abs(out - logits(small, x).numpy()).max() < 1e-4


def test_pt2_round_trip(tmp_path):
    """torch.export.save -> load runs at other sizes and matches eager."""
    small = sf.compress(tiny_model("qwen2"), 0.3, progress=False)
    path = export_pt2(small, tmp_path / "model.pt2")
    loaded = torch.export.load(str(path)).module()
    for b, s in ((1, 6), (3, 17)):
        x = ids(b, s, seed=s)
        assert torch.allclose(loaded(x), logits(small, x), atol=1e-5)


def test_check_export_reports_a_wrong_program():
    """A runtime that is off by more than float32 noise is an error naming the input size and the gap."""
    model = tiny_model("llama")
    assert check_export(lambda x: logits(model, x), model) == 0.0
    with pytest.raises(SurgeonError, match=r"disagrees with torch on input \(1, 7\): max abs difference 0.5"):
        check_export(lambda x: logits(model, x) + 0.5, model)
    with pytest.raises(SurgeonError, match="shape"):
        check_export(lambda x: logits(model, x)[:, :-1], model)
