"""Curvature pass: K-FAC factors A = E[a a^T] and G = E[g g^T] of every layer the groups touch.

Reads: a graph annotated by ``annotate_groups`` and calibration token windows. Writes:
``gm.meta[CURVATURE]``, a :class:`Curvature`. Leaves ``gm.code`` unchanged: the sweep runs on an
instrumented copy of the graph that shares the parameters. Invariant: one forward and one backward
per batch; factors accumulate in float32 on the model's device; activations are never kept beyond
their batch; every token is one sample (loss summed over tokens, factors divided by the token count).

A layer is a ``linear`` / ``addmm`` / ``mm`` / ``embedding`` node whose weight is a parameter in
some group. Its bias is an extra input column whose activation is 1. Factors larger than
``max_dense`` on a side are kept diagonal (the one-hot input of an embedding, the vocabulary-sized
output of an LM head). Layers reading the same input share one ``A``.

Under ``torch.distributed`` (an initialised default process group: gloo on CPU, NCCL on GPUs,
launched e.g. with ``torchrun``), each rank sweeps its own contiguous block of the batches and the
factor sums and token counts are all-reduced before normalising, so every rank holds the same
factors and, downstream, makes the same plan and the same weight updates. Sampled labels (true
Fisher) are seeded per batch, so they do not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from surgeon_fx.keys import CURVATURE, require
from surgeon_fx.launch import rank_and_world

from .groups import get_groups

__all__ = [
    "Layer",
    "Curvature",
    "annotate_curvature",
    "collect_inputs",
    "find_layers",
    "MAX_DENSE",
    "get_curvature",
    "single_use",
    "sweep_precision",
]

aten = torch.ops.aten

MAX_DENSE = 16384
"""Largest factor side kept as a dense matrix (1 GiB in float32); larger sides are diagonal. Dense up to
16384 keeps the MLP factors of 7B-class models (11008 for Llama-2-7B, 14336 for Mistral-7B) exact;
vocabulary-sized sides (32000 and up) stay diagonal."""


@dataclass(eq=False)
class Layer:
    """One weight-carrying op and its factors.

    ``layout`` says how the weight maps to the (R outputs x C inputs) matrix of the formulas:
    ``"out_in"`` (linear: W), ``"in_out"`` (addmm/mm: W^T), ``"embedding"`` (W^T; inputs one-hot).
    ``a_key`` names the (possibly shared) input factor; ``a``/``g`` are filled by the sweep.
    """

    node: str
    weight: str
    bias: str | None
    layout: str
    rows: int
    cols: int
    a_key: str
    g: torch.Tensor | None = None

    @property
    def row_axis(self) -> int:
        return 0 if self.layout == "out_in" else 1

    @property
    def col_axis(self) -> int:
        return 1 - self.row_axis


@dataclass(eq=False)
class Curvature:
    """K-FAC factors of a graph: ``layers`` by node name, input factors ``a`` by ``a_key``."""

    layers: dict[str, Layer]
    a: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    fisher: str = "empirical"
    inverses: dict = field(default_factory=dict, repr=False)
    """Damped inverses computed from these factors, by (side, key, damping); shared by the passes."""
    collected: set[str] = field(default_factory=set)
    """Names of the layers whose factors were collected (all of them unless swept block by block)."""
    cache_bytes: int | None = None
    """Most bytes ``inverses`` may hold (``None``: no bound); beyond it inverses are recomputed."""

    def roles(self) -> dict[tuple[str, int], list[tuple[Layer, str]]]:
        """``(param FQN, axis) -> [(layer, "row" | "col")]``: where each parameter axis enters a layer."""
        out: dict[tuple[str, int], list[tuple[Layer, str]]] = {}
        for lay in self.layers.values():
            out.setdefault((lay.weight, lay.row_axis), []).append((lay, "row"))
            out.setdefault((lay.weight, lay.col_axis), []).append((lay, "col"))
        return out

    def factor_a(self, layer: Layer) -> torch.Tensor:
        return self.a[layer.a_key]


def single_use(layers: Iterable[Layer]) -> list[Layer]:
    """The layers whose weight no other layer reads (a tied embedding / LM head weight is read twice)."""
    layers = list(layers)
    uses = Counter(lay.weight for lay in layers)
    return [lay for lay in layers if uses[lay.weight] == 1]


def find_layers(gm: fx.GraphModule) -> dict[str, tuple[Layer, fx.Node]]:
    """The weight-carrying ops whose weight some group touches, with their input node."""
    analysis = get_groups(gm)
    params = dict(gm.named_parameters(remove_duplicate=False))
    canon = {id(params[t]): f for f, t in analysis.param_targets.items()}
    fqn_of = {t: canon[id(p)] for t, p in params.items() if id(p) in canon}
    touched = {m.param for g in analysis.groups for m in g.members}
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        packet = getattr(n.target, "overloadpacket", None)
        if packet is aten.linear:
            x, w = n.args[0], n.args[1]
            b = n.args[2] if len(n.args) > 2 else None
            layout = "out_in"
        elif packet is aten.addmm:
            b, x, w = n.args[:3]
            layout = "in_out"
        elif packet is aten.mm:
            x, w = n.args[:2]
            b, layout = None, "in_out"
        elif packet is aten.embedding:
            w, x = n.args[:2]
            b, layout = None, "embedding"
        else:
            continue
        if not isinstance(w, fx.Node) or w.target not in fqn_of or fqn_of[w.target] not in touched:
            continue
        bias = fqn_of.get(b.target) if isinstance(b, fx.Node) and b.op == "get_attr" else None
        shape = tuple(int(d) for d in w.meta["val"].shape)
        rows, cols = (shape[0], shape[1]) if layout == "out_in" else (shape[1], shape[0])
        a_key = f"{x.name}{'+1' if bias else ''}"
        out[n.name] = (Layer(n.name, fqn_of[w.target], bias, layout, rows, cols + (1 if bias else 0), a_key), x)
    return out


@contextlib.contextmanager
def _factor_precision(precision: str):
    """The arithmetic of the factor products: full float32, or TF32 products with float32 sums."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "mixed")
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class _Enough(Exception):
    """Raised inside a forward-only sweep once every wanted input has been seen: the rest is not run."""


class _Sweep:
    """Accumulates the factors while the instrumented graph runs forward and backward."""

    def __init__(self, curv: Curvature, max_dense: int, precision: str = "fp32", collect=None, stop_after=None):
        self.curv = curv
        self.max_dense = max_dense
        self.precision = precision
        self.collect = set(curv.layers) if collect is None else set(collect)
        self.stop_after = stop_after  # a_keys: once all are accumulated in a batch, raise _Enough
        self.leaves: list[torch.Tensor] = []
        self._seen: set[str] = set()

    def tap(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lay = self.curv.layers[key]
        mine = key in self.collect
        if mine and lay.a_key not in self._seen:  # shared inputs: accumulate A once per batch
            self._seen.add(lay.a_key)
            self._acc_a(lay, x)
            if self.stop_after is not None and self.stop_after <= self._seen:
                raise _Enough
        if lay.layout == "embedding":  # the backward starts here, collected or not: no weight gradients
            y = y.detach().requires_grad_(True)
            self.leaves.append(y)
        if mine and y.requires_grad:
            y.register_hook(lambda g, lay=lay: self._acc_g(lay, g))
        return y

    def _acc_a(self, lay: Layer, x: torch.Tensor) -> None:
        with _factor_precision(self.precision):
            self._acc_a_fp32(lay, x)

    def _acc_a_fp32(self, lay: Layer, x: torch.Tensor) -> None:
        if lay.layout == "embedding":
            flat = x.reshape(-1)  # token counts; index_add_, unlike bincount, needs no host sync on CUDA
            counts = torch.zeros(lay.cols, device=x.device).index_add_(
                0, flat, torch.ones_like(flat, dtype=torch.float)
            )
            a = self.curv.a.get(lay.a_key)
            self.curv.a[lay.a_key] = counts if a is None else a + counts
            return
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        if lay.bias is not None:
            xf = torch.cat([xf, torch.ones(xf.shape[0], 1, dtype=xf.dtype, device=xf.device)], 1)
        upd = (xf * xf).sum(0) if lay.cols > self.max_dense else xf.T @ xf
        a = self.curv.a.get(lay.a_key)
        self.curv.a[lay.a_key] = upd if a is None else a.add_(upd)

    def _acc_g(self, lay: Layer, g: torch.Tensor) -> None:
        with _factor_precision(self.precision):
            self._acc_g_fp32(lay, g)

    def _acc_g_fp32(self, lay: Layer, g: torch.Tensor) -> None:
        gf = g.detach().reshape(-1, g.shape[-1]).float()
        upd = (gf * gf).sum(0) if lay.rows > self.max_dense else gf.T @ gf
        lay.g = upd if lay.g is None else lay.g.add_(upd)


PRECISIONS = ("fp32", "tf32", "mixed")
"""Sweep arithmetic: full float32; TF32 matmuls (CUDA); TF32 matmuls plus bfloat16 attention."""


def _sdpa_bf16(q, k, v, attn_mask=None, *args, **kwargs):
    """``aten.scaled_dot_product_attention`` with its core in bfloat16 and float32 in and out.

    The attention kernels have no TF32 path: in float32 they are the memory-efficient kernel
    without tensor cores, most of the sweep's GPU time on SmolLM2 at 2048 tokens (profile in
    ``benchmarks/profile_sweep.py``). In bfloat16 they run the flash / tensor-core kernels.
    """
    dtype = q.dtype
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(torch.bfloat16)
    out = torch.ops.aten.scaled_dot_product_attention.default(
        q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), attn_mask, *args, **kwargs
    )
    return out.to(dtype)


def _copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``gm``'s graph (calling convention included) and the map from its nodes to the copy's."""
    graph = fx.Graph()
    with warnings.catch_warnings():  # torch's pytree deprecation noise when copying export specs
        warnings.simplefilter("ignore", FutureWarning)
        graph._codegen = copy.deepcopy(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    return graph, env


def _instrument(gm: fx.GraphModule, found: dict, sweep: _Sweep) -> fx.GraphModule:
    graph, env = _copy_graph(gm)
    for name, (_, x) in found.items():
        y = next(env[n] for n in gm.graph.nodes if n.name == name)
        with graph.inserting_after(y):
            t = graph.call_function(sweep.tap, (name, env[x], y))
        y.replace_all_uses_with(t, delete_user_cb=lambda u, t=t: u is not t)
    if sweep.precision == "mixed":  # a graph rewrite: only the sweep's copy computes attention in bf16
        _attention_in_bf16(graph)
    return fx.GraphModule(gm, graph)


def _attention_in_bf16(graph: fx.Graph) -> None:
    """Point every ``scaled_dot_product_attention`` of ``graph`` at :func:`_sdpa_bf16` (in place)."""
    for n in graph.nodes:
        if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is (
            torch.ops.aten.scaled_dot_product_attention
        ):
            n.target = _sdpa_bf16


def with_precision(gm: fx.GraphModule, precision: str) -> fx.GraphModule:
    """``gm`` itself, or for ``"mixed"`` a copy of its graph (sharing its parameters and buffers)
    whose attention runs in bfloat16. Pair it with :func:`sweep_precision` for the TF32 matmuls."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "mixed":
        return gm
    graph, _ = _copy_graph(gm)
    _attention_in_bf16(graph)
    return fx.GraphModule(gm, graph)


def _check_windows(windows) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            "windows must be an (N, L) int64 tensor of token ids (see surgeon_fx.data.calibration_windows)"
        )
    if windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"need at least one calibration window of >= 2 tokens, got shape {tuple(windows.shape)}")


def _layer_names(found: dict, layers: Iterable[str] | None) -> list[str]:
    """``layers`` as a list (every layer of ``found`` when ``None``); unknown names are refused."""
    names = list(found) if layers is None else list(layers)
    unknown = [k for k in names if k not in found]
    if unknown:
        raise ValueError(f"layers {unknown[:3]} are not weight-carrying ops of this graph; see find_layers(gm)")
    return names


def _my_batches(n: int, batch_size: int) -> list[int]:
    """The first window of each batch this rank runs: contiguous blocks of batches, one per rank."""
    rank, world = rank_and_world()
    starts = list(range(0, n, batch_size))
    per = -(-len(starts) // world)
    return starts[rank * per : (rank + 1) * per]


@torch.no_grad()
def collect_inputs(
    gm: fx.GraphModule,
    windows: torch.Tensor,
    layers: Iterable[str],
    *,
    batch_size: int = 1,
    precision: str = "fp32",
    max_dense: int = MAX_DENSE,
    progress: bool = True,
) -> Curvature:
    """The input factors ``A = E[x x^T]`` of ``layers`` alone, from forward passes only.

    Each forward pass stops as soon as the last of those inputs has been computed, so layers early
    in the graph cost a fraction of a pass. No gradients and no output factors (``G`` stays
    ``None``). This serves layer-wise methods run layer after layer on the outputs of layers
    already changed (SparseGPT: :func:`surgeon_fx.passes.sparsity.apply_sparsegpt_` with ``windows``).
    Under ``torch.distributed`` every rank runs its block of batches and the sums are all-reduced.

    Args:
        gm: an annotated graph (``annotate_groups`` first); nothing on it changes.
        windows: (N, L) token ids. layers: node names (see :func:`find_layers`).
        batch_size, precision, max_dense, progress: as in :func:`annotate_curvature`.

    Returns:
        A :class:`Curvature` whose ``a`` holds the (token-averaged) factors of ``layers``.

    Raises:
        ValueError: bad windows or options, or an unknown layer name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check_windows(windows)
    found = find_layers(gm)
    names = _layer_names(found, layers)
    if not names:
        raise ValueError("collect_inputs needs at least one layer name; see find_layers(gm)")
    curv = Curvature({k: lay for k, (lay, _) in found.items()})
    curv.collected = set(names)
    sweep = _Sweep(curv, max_dense, precision, names, stop_after={found[k][0].a_key for k in names})
    inst = _instrument(gm, found, sweep)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    mine = _my_batches(len(windows), batch_size)
    for i in tqdm(mine, desc="inputs", disable=not progress or rank_and_world()[0] != 0, leave=False):
        ids = windows[i : i + batch_size].to(device)
        sweep.leaves.clear()
        sweep._seen.clear()
        with sweep_precision(precision, device):
            try:
                inst(ids)
            except _Enough:
                pass
        curv.tokens += ids.numel()
    if rank_and_world()[1] > 1:
        _all_reduce_(curv, max_dense, device, with_g=False)
    for k in curv.a:
        curv.a[k].div_(curv.tokens)
    return curv


def annotate_curvature(
    gm: fx.GraphModule,
    windows: torch.Tensor,
    *,
    fisher: str = "empirical",
    batch_size: int = 1,
    seed: int = 0,
    max_dense: int = MAX_DENSE,
    precision: str = "fp32",
    progress: bool = True,
    layers: Iterable[str] | None = None,
) -> None:
    """Collect K-FAC factors over ``windows`` (int64 token ids, (N, L)) and store them on ``gm``.

    Args:
        gm: an annotated graph (``annotate_groups`` first); its parameters are not changed.
        windows: calibration token windows on any device (moved to the model's device per batch).
        fisher: ``"empirical"`` (labels are the data's next tokens) or ``"true"`` (labels sampled
            from the model's own predictive distribution, seeded).
        batch_size: windows per forward/backward.
        seed: seed of the sampled labels.
        max_dense: factors with more rows than this are kept diagonal (default :data:`MAX_DENSE`).
        precision: arithmetic of the forward/backward and of the factor products: ``"fp32"``,
            ``"tf32"`` (TensorFloat-32 matmuls and convolutions on CUDA; no effect on CPU), or
            ``"mixed"`` (``"tf32"`` plus the core of every ``scaled_dot_product_attention`` in
            bfloat16, on any device; its inputs and output stay float32). The factors always
            accumulate in float32 buffers from float32 copies of the activations and gradients;
            under ``"tf32"``/``"mixed"`` each batch's product ``X^T X`` rounds its inputs to TF32
            (10-bit mantissa).
        progress: show a progress bar.
        layers: node names (see :func:`find_layers`) whose factors are collected; default all.
            The others stay in ``Curvature.layers`` without factors (``collected`` says which
            have them), so a caller can sweep block by block and merge (``shots`` does, under
            ``max_memory``).

    Raises:
        ValueError: bad windows or options, or an unknown layer name.
    """
    if fisher not in ("empirical", "true"):
        raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check_windows(windows)
    found = find_layers(gm)
    curv = Curvature({k: lay for k, (lay, _) in found.items()}, fisher=fisher)
    collect = _layer_names(found, layers)
    curv.collected = set(collect)
    sweep = _Sweep(curv, max_dense, precision, collect)
    inst = _instrument(gm, found, sweep)
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    rank, world = rank_and_world()
    mine = _my_batches(len(windows), batch_size)
    params = [p for p in gm.parameters()]
    need_param_grads = not any(lay.layout == "embedding" for lay in curv.layers.values())
    old_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(need_param_grads)
    try:
        for i in tqdm(mine, desc="curvature sweep", disable=not progress or rank != 0, leave=False):
            ids = windows[i : i + batch_size].to(device)
            sweep.leaves.clear()
            sweep._seen.clear()
            with torch.enable_grad(), sweep_precision(precision, device):
                logits = inst(ids).float()
                if fisher == "empirical":
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                else:
                    with torch.no_grad():  # labels seeded per batch: the same on any number of ranks
                        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
                        probs = torch.softmax(logits.flatten(0, 1), -1)
                        labels = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                    loss = F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum")
                inputs = params if need_param_grads else sweep.leaves
                torch.autograd.grad(loss, inputs, allow_unused=True)
            curv.tokens += ids.numel()
    finally:
        for p, f in zip(params, old_flags):
            p.requires_grad_(f)
    if world > 1:
        _all_reduce_(curv, max_dense, device)
    for k in curv.a:
        curv.a[k].div_(curv.tokens)  # in place: no second copy of the factors at the peak
    for lay in (curv.layers[k] for k in curv.collected):
        if lay.g is None:  # no gradient reached it: a dead layer costs nothing
            shape = (lay.rows,) if lay.rows > max_dense else (lay.rows, lay.rows)
            lay.g = torch.zeros(shape, device=device)
        else:
            lay.g.div_(curv.tokens)
    gm.meta[CURVATURE] = curv


def _all_reduce_(curv: Curvature, max_dense: int, device: torch.device, with_g: bool = True) -> None:
    """Sum every factor (``G`` too unless not ``with_g``) and the token count over the ranks (in one
    fixed order on every rank)."""
    import torch.distributed as dist

    for lay in (curv.layers[k] for k in sorted(curv.collected)):  # a rank without batches has no factors yet
        if lay.a_key not in curv.a:
            side = lay.cols
            curv.a[lay.a_key] = torch.zeros(
                (side,) if side > max_dense or lay.layout == "embedding" else (side, side), device=device
            )
        if lay.g is None and with_g:
            lay.g = torch.zeros((lay.rows,) if lay.rows > max_dense else (lay.rows, lay.rows), device=device)
    for k in sorted(curv.a):
        dist.all_reduce(curv.a[k])
    for name in sorted(curv.collected) if with_g else ():
        dist.all_reduce(curv.layers[name].g)
    tokens = torch.tensor([float(curv.tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(tokens)
    curv.tokens = int(tokens.item())


@contextlib.contextmanager
def sweep_precision(precision: str, device: torch.device):
    """The arithmetic of a forward/backward: fp32, or TF32 matmuls and convolutions on CUDA
    (``"tf32"`` and ``"mixed"``; the bfloat16 attention of ``"mixed"`` is a graph rewrite).

    (bfloat16 autocast is not offered: on CUDA an op of the exported Llama graph rejected mixed
    float/bfloat16 inputs under autocast; see the session notes of issue 3.)
    """
    if precision in ("tf32", "mixed") and device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def get_curvature(gm: fx.GraphModule) -> Curvature:
    return require(gm, CURVATURE, producer="annotate_curvature")
