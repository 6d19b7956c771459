"""Export a (compressed) language model as ONNX or as a ``torch.export`` program (``.pt2``), verified.

Reads: a model mapping token ids ``(batch, sequence)`` to logits (a Hugging Face causal LM, uneven widths
included). Writes: ``model.onnx`` (plus ``model.onnx.data`` when the weights are external) or ``model.pt2``.
Invariant: batch and sequence stay dynamic; every export is checked against the eager model on fresh
inputs of two sizes that differ from the tracing example, and a mismatch is an error, not a warning.

Tolerance: logits must agree within ``atol`` times ``max(1, max |logit|)``. Where that fails, the check
falls back to a float64 reference: the exported program passes when it is at most 10 times farther from
float64 than the float32 eager model is (a deep, narrow model such as SmolLM2 differs from itself in float64
by ~1e-4 relative, more once pruned; both float32 runtimes are then right within float32 precision).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .keys import SurgeonError
from .tracing import LogitsWrapper, vocab_size_of

__all__ = ["export_onnx", "export_pt2", "check_export", "VERIFY_SIZES"]

VERIFY_SIZES = ((1, 7), (3, 19))
"""(batch, sequence) of the fresh inputs every export is checked on."""
_EXAMPLE = (2, 16)
_NAMES = ("batch", "sequence")
_NOISE = 10.0
"""How many times farther from float64 than eager float32 an export may be: two float32 programs that sum in
different orders differ by a small multiple of float32's own error (measured up to ~3x on a magnitude-pruned
SmolLM2); a wrong weight or shape is off by the size of the logits, far beyond."""


def _ids(model: nn.Module, batch: int, seq: int, seed: int) -> torch.Tensor:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size_of(model) or 2, (batch, seq), generator=g).to(device)


def _dynamic():
    auto = torch.export.Dim.AUTO
    return {"input_ids": {0: auto, 1: auto}}


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's registry chatter (e.g. 'torchvision is not installed')."""
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.onnx._internal.exporter._registration")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _name_dims(program) -> None:
    """Rename the symbolic input/output dimensions to 'batch' and 'sequence' (ONNX metadata only)."""
    try:
        import onnx_ir as ir
    except ImportError:  # pragma: no cover - older onnxscript ships it as onnxscript.ir
        from onnxscript import ir
    graph = program.model.graph
    names = {}
    for axis, dim in enumerate(graph.inputs[0].shape):
        if not isinstance(dim, int) and dim.value is not None and axis < len(_NAMES):
            names[dim.value] = _NAMES[axis]
    for v in [*graph.inputs, *graph.outputs]:
        if v.shape is not None:
            v.shape = ir.Shape(
                [names.get(getattr(d, "value", None), d) if not isinstance(d, int) else d for d in v.shape]
            )


def check_export(run, model: nn.Module, *, atol: float = 1e-4, sizes=VERIFY_SIZES, seed: int = 1234) -> float:
    """Compare ``run(ids) -> logits`` with the eager model on fresh token ids of each size in ``sizes``.

    Args:
        run: callable mapping an int64 ``(batch, sequence)`` tensor to a logits tensor or array.
        model: the eager reference.
        atol: tolerance relative to ``max(1, max |logit|)``.
        sizes: (batch, sequence) pairs to check.
        seed: seed of the fresh inputs.

    Returns:
        The largest absolute difference seen.

    Raises:
        SurgeonError: a size where the export is outside the tolerance and more than 10 times farther from
            float64 than the eager float32 model.
    """
    worst = 0.0
    ref64 = None
    for i, (b, s) in enumerate(sizes):
        ids = _ids(model, b, s, seed + i)
        with torch.no_grad():
            ref = LogitsWrapper(model)(ids).float()
        out = torch.as_tensor(run(ids)).float().to(ref.device)
        if out.shape != ref.shape:
            raise SurgeonError(
                f"exported logits have shape {tuple(out.shape)} for input {(b, s)}, expected {tuple(ref.shape)}"
            )
        err, scale = (out - ref).abs().max().item(), max(1.0, ref.abs().max().item())
        worst = max(worst, err)
        if err <= atol * scale:
            continue
        if ref64 is None:
            ref64 = LogitsWrapper(copy.deepcopy(model).double())
        with torch.no_grad():
            exact = ref64(ids)
        own, theirs = (ref.double() - exact).abs().max().item(), (out.double() - exact).abs().max().item()
        if theirs > _NOISE * own + atol * scale:
            raise SurgeonError(
                f"exported model disagrees with torch on input {(b, s)}: max abs difference {err:.3g} "
                f"(float64 reference: export off by {theirs:.3g}, torch float32 by {own:.3g})"
            )
    return worst


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Export ``model`` as ONNX (``input_ids -> logits``) with ``torch.onnx.export(dynamo=True)``.

    Args:
        model: a Hugging Face causal LM or a module mapping token ids to logits; not modified.
        path: the ``.onnx`` file to write (parent folders are created).
        external_data: keep the weights in ``<path>.data`` next to the graph; ``None``: when they exceed
            1 GiB (the protobuf limit is 2 GiB).
        opset: ONNX opset (default: the exporter's).
        verify: run the file in onnxruntime on fresh inputs of two sizes and compare with torch.
        atol: tolerance of the check (see :func:`check_export`).

    Returns:
        The path of the ``.onnx`` file.

    Raises:
        ImportError: onnx, onnxscript or onnxruntime is missing (``pip install surgeon-fx[onnx]``).
        SurgeonError: the exporter failed, or the file disagrees with torch.
    """
    wrapper = LogitsWrapper(model).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > 2**30
    kw = {} if opset is None else {"opset_version": opset}
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as e:
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'surgeon-fx[onnx]'") from e
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (_ids(model, *_EXAMPLE, seed=0),),
                dynamo=True,
                dynamic_shapes=_dynamic(),
                input_names=["input_ids"],
                output_names=["logits"],
                optimize=False,  # measured: halves SmolLM2's export time; onnxruntime optimises at load anyway
                verbose=False,
                **kw,
            )
    except Exception as e:
        raise SurgeonError(f"torch.onnx.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from e
    _name_dims(program)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    program.save(str(path), external_data=external_data)
    if verify:
        check_export(_ort_runner(path), model, atol=atol)
    return path


def _ort_runner(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda ids: session.run(None, {"input_ids": ids.cpu().numpy()})[0]


def export_pt2(model: nn.Module, path: str | os.PathLike, *, verify: bool = True, atol: float = 1e-4) -> Path:
    """Export ``model`` as a ``torch.export`` program (``input_ids -> logits``) saved with ``torch.export.save``.

    Load it with ``torch.export.load(path).module()``; batch and sequence are dynamic.

    Args:
        model: a Hugging Face causal LM or a module mapping token ids to logits; not modified.
        path: the ``.pt2`` file to write.
        verify: load the file back and compare with the eager model on fresh inputs of two sizes.
        atol: tolerance of the check (see :func:`check_export`).

    Returns:
        The path written.

    Raises:
        SurgeonError: ``torch.export`` failed, or the loaded program disagrees with the model.
    """
    wrapper = LogitsWrapper(model).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            ep = torch.export.export(
                wrapper, (_ids(model, *_EXAMPLE, seed=0),), dynamic_shapes=_dynamic(), strict=False
            )
    except Exception as e:
        raise SurgeonError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from e
    torch.export.save(ep, str(path))
    if verify:
        loaded = torch.export.load(str(path)).module()
        check_export(lambda ids: loaded(ids), model, atol=atol)
    return path
