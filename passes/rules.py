"""Per-op coupling rules for the dependency analysis, one table keyed by ATen op.

Reads: one FX node and the slot spaces of its inputs. Writes: unions between slots (coupled tensor
indices), frozen slots (indices that may never be removed, with the reason) and approximation marks.
Invariant: a rule never assumes an op is elementwise unless it is listed as such; an op without a
rule that touches a concrete (non-symbolic, size > 1) axis is reported by the analysis.

A slot is one index of one axis of one tensor in the graph. Two slots are united when removing one
forces removing the other. Symbolic axes (batch, sequence) and axes of size 1 carry no slots.
Users extend the table by passing ``rules={**DEFAULT_RULES, op: fn}`` to ``annotate_groups``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
from torch import fx

__all__ = ["SlotContext", "DEFAULT_RULES", "Rule"]

aten = torch.ops.aten


class SlotContext:
    """Slot bookkeeping for one graph: spaces per node axis, unions, frozen and approximate slots."""

    def __init__(self) -> None:
        self.spaces: dict[str, tuple[tuple[int, int] | None, ...]] = {}
        self.n = 0
        self._u: list[np.ndarray] = []
        self._v: list[np.ndarray] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.approx: list[tuple[np.ndarray, str]] = []
        self.heads: list[np.ndarray] = []  # carrier slots of an (H*D) <-> (H, D) reshape

    # -- spaces ---------------------------------------------------------------------------------
    def add_node(self, node: fx.Node) -> None:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return
        axes = []
        for d in val.shape:
            if isinstance(d, int) and d > 1:
                axes.append((self.n, d))
                self.n += d
            else:
                axes.append(None)
        self.spaces[node.name] = tuple(axes)

    def is_tensor(self, x) -> bool:
        return isinstance(x, fx.Node) and x.name in self.spaces

    def rank(self, x: fx.Node) -> int:
        return len(self.spaces[x.name])

    def shape(self, x: fx.Node) -> tuple:
        return tuple(x.meta["val"].shape)

    def space(self, x: fx.Node, axis: int) -> tuple[int, int] | None:
        axes = self.spaces[x.name]
        return axes[axis % len(axes)]

    def slots(self, x: fx.Node, axis: int) -> np.ndarray | None:
        sp = self.space(x, axis)
        return None if sp is None else np.arange(sp[0], sp[0] + sp[1])

    # -- relations ------------------------------------------------------------------------------
    def unite_slots(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a):
            self._u.append(np.asarray(a, dtype=np.int64))
            self._v.append(np.asarray(b, dtype=np.int64))

    def unite(self, x: fx.Node, ax: int, y: fx.Node, ay: int) -> None:
        """Couple index i of axis ``ax`` of x with index i of axis ``ay`` of y (same size)."""
        a, b = self.space(x, ax), self.space(y, ay)
        if a is None or b is None:
            return  # broadcast (size 1) or symbolic: nothing prunable to couple
        if a[1] != b[1]:
            raise ValueError(f"cannot couple {x.name}[{ax}] (size {a[1]}) with {y.name}[{ay}] (size {b[1]})")
        self.unite_slots(np.arange(a[0], a[0] + a[1]), np.arange(b[0], b[0] + b[1]))

    def freeze(self, x: fx.Node, axis: int | None, reason: str) -> None:
        axes = range(self.rank(x)) if axis is None else [axis]
        for ax in axes:
            s = self.slots(x, ax)
            if s is not None:
                self.frozen.append((s, reason))

    def mark_approx(self, x: fx.Node, axis: int, reason: str) -> None:
        s = self.slots(x, axis)
        if s is not None:
            self.approx.append((s, reason))

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._u:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(self._u), np.concatenate(self._v)

    # -- helpers for rules ----------------------------------------------------------------------
    def broadcast(self, out: fx.Node, inputs) -> None:
        """Elementwise with numpy broadcasting: right-aligned axes of equal size couple."""
        r = self.rank(out)
        for x in inputs:
            if not self.is_tensor(x):
                continue
            rx = self.rank(x)
            for i in range(1, rx + 1):
                self.unite(x, rx - i, out, r - i)


Rule = Callable[[SlotContext, fx.Node], None]


def _tensor_args(ctx: SlotContext, node: fx.Node):
    flat = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, (list, tuple)):
            flat.extend(a)
        else:
            flat.append(a)
    return [a for a in flat if ctx.is_tensor(a)]


def _dim(d: int, rank: int) -> int:
    return d % rank if rank else 0


# -- elementwise ---------------------------------------------------------------------------------
def elementwise(ctx: SlotContext, node: fx.Node) -> None:
    """All tensor operands broadcast against the output (add, mul, where, unary ops, casts...)."""
    ctx.broadcast(node, _tensor_args(ctx, node))


def first_arg_elementwise(ctx: SlotContext, node: fx.Node) -> None:
    """Output has the shape of the first argument; other arguments are not tensors of interest."""
    ctx.broadcast(node, [node.args[0]])


# -- shape ops -----------------------------------------------------------------------------------
def _blocks(in_shape, out_shape):
    """Split a reshape into blocks of input axes and output axes with equal products.

    Sizes may be symbolic (``SymInt``); products are compared as sympy expressions. Axes of size 1
    join the block before them. Returns a list of (input axis list, output axis list).
    """
    import sympy

    def expr(d):
        return sympy.Integer(d) if isinstance(d, int) else d.node.expr

    blocks, i, j = [], 0, 0
    n, m = len(in_shape), len(out_shape)
    while i < n or j < m:
        bi, bj = [], []
        pi, pj = sympy.Integer(1), sympy.Integer(1)
        if i < n:
            bi.append(i)
            pi = pi * expr(in_shape[i])
            i += 1
        if j < m:
            bj.append(j)
            pj = pj * expr(out_shape[j])
            j += 1
        while sympy.simplify(pi - pj) != 0:
            num, den = sympy.fraction(sympy.simplify(pi / pj))
            if den == 1 and j < m:  # input side is a multiple: grow the output side
                bj.append(j)
                pj = pj * expr(out_shape[j])
                j += 1
            elif i < n:
                bi.append(i)
                pi = pi * expr(in_shape[i])
                i += 1
            elif j < m:
                bj.append(j)
                pj = pj * expr(out_shape[j])
                j += 1
            else:
                break
        # trailing size-1 axes belong to this block
        while i < n and in_shape[i] == 1 and (j >= m or out_shape[j] != 1):
            bi.append(i)
            i += 1
        while j < m and out_shape[j] == 1 and (i >= n or in_shape[i] != 1):
            bj.append(j)
            j += 1
        blocks.append((bi, bj))
    return blocks


def reshape(ctx: SlotContext, node: fx.Node) -> None:
    """view / reshape / flatten: an axis of size H*D splits into (H, D) and back.

    Within a block of axes with equal products, the outermost axis of size > 1 on each side is the
    *carrier*: input carrier index a couples with every output carrier index whose flat range
    overlaps it (index i of a (H*D) axis <-> head i // D). The inner axes (head_dim) are frozen:
    removing one head_dim index would cut every head, which is not a structure this tool removes.
    """
    x = node.args[0]
    ishape, oshape = ctx.shape(x), ctx.shape(node)
    for bi, bj in _blocks(ishape, oshape):
        ci = [a for a in bi if ctx.space(x, a) is not None]
        cj = [a for a in bj if ctx.space(node, a) is not None]
        sym_i = any(not isinstance(ishape[a], int) for a in bi)
        sym_j = any(not isinstance(oshape[a], int) for a in bj)
        if not ci and not cj:
            continue
        if sym_i or sym_j or not ci or not cj:
            for a in ci:
                ctx.freeze(x, a, f"{node.name}: reshape mixes this axis with a symbolic one")
            for a in cj:
                ctx.freeze(node, a, f"{node.name}: reshape mixes this axis with a symbolic one")
            continue
        a0, b0 = ci[0], cj[0]
        inner_i = int(np.prod([ishape[a] for a in bi if a > a0])) if len(bi) else 1
        inner_j = int(np.prod([oshape[b] for b in bj if b > b0])) if len(bj) else 1
        si, sj = ctx.slots(x, a0), ctx.slots(node, b0)
        if inner_i == inner_j:
            ctx.unite_slots(si, sj)
        elif inner_i < inner_j:  # output carrier is coarser: input index a -> output index a*inner_i//inner_j
            ctx.unite_slots(si, sj[(np.arange(len(si)) * inner_i) // inner_j])
            ctx.heads.append(sj)
        else:
            ctx.unite_slots(sj, si[(np.arange(len(sj)) * inner_j) // inner_i])
            ctx.heads.append(si)
        for a in ci[1:]:
            ctx.freeze(x, a, f"{node.name}: inner axis of a reshape (e.g. head_dim)")
        for b in cj[1:]:
            ctx.freeze(node, b, f"{node.name}: inner axis of a reshape (e.g. head_dim)")


def expand(ctx: SlotContext, node: fx.Node) -> None:
    """expand / broadcast_to: right-aligned axes of equal size couple; new or size-1 axes are fresh.

    The fresh axes (e.g. the query heads per KV head under grouped-query attention) are frozen:
    they replicate data, so their indices cannot be removed on their own.
    """
    x = node.args[0]
    rx, r = ctx.rank(x), ctx.rank(node)
    for i in range(1, r + 1):
        if i <= rx and ctx.space(x, rx - i) is not None:
            ctx.unite(x, rx - i, node, r - i)
        else:
            ctx.freeze(node, r - i, f"{node.name}: axis created by expand (replicated data)")


def unsqueeze(ctx: SlotContext, node: fx.Node) -> None:
    x, d = node.args[0], _dim(node.args[1], ctx.rank(node))
    for a in range(ctx.rank(x)):
        ctx.unite(x, a, node, a if a < d else a + 1)


def squeeze(ctx: SlotContext, node: fx.Node) -> None:
    x = node.args[0]
    ishape = ctx.shape(x)
    keep = [a for a in range(len(ishape)) if ishape[a] != 1 or _squeeze_keeps(node, a, len(ishape))]
    for o, a in enumerate(keep):
        ctx.unite(x, a, node, o)


def _squeeze_keeps(node, a, rank) -> bool:
    if len(node.args) < 2:
        return False
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    return a not in {_dim(d, rank) for d in dims}


def transpose(ctx: SlotContext, node: fx.Node) -> None:
    x = node.args[0]
    r = ctx.rank(x)
    if r < 2:
        return elementwise(ctx, node)
    d0, d1 = (_dim(node.args[1], r), _dim(node.args[2], r)) if len(node.args) > 2 else (0, 1)
    perm = list(range(r))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    for o, a in enumerate(perm):
        ctx.unite(x, a, node, o)


def permute(ctx: SlotContext, node: fx.Node) -> None:
    x = node.args[0]
    for o, a in enumerate(node.args[1]):
        ctx.unite(x, _dim(a, ctx.rank(x)), node, o)


def slice_(ctx: SlotContext, node: fx.Node) -> None:
    """slice(x, dim, start, end, step): output index j <-> input index start + j * step."""
    x = node.args[0]
    r = ctx.rank(x)
    d = _dim(node.args[1] if len(node.args) > 1 else 0, r)
    for a in range(r):
        if a != d:
            ctx.unite(x, a, node, a)
    si, so = ctx.slots(x, d), ctx.slots(node, d)
    size = ctx.shape(x)[d]
    if si is None:
        if so is not None:
            ctx.freeze(node, d, f"{node.name}: slice of a symbolic axis")
        return
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    if not isinstance(start, int) or not isinstance(step, int):
        ctx.freeze(x, d, f"{node.name}: slice bounds are not constants")
        ctx.freeze(node, d, f"{node.name}: slice bounds are not constants")
        return
    start = max(0, start + size if start < 0 else min(start, size))
    n_out = ctx.shape(node)[d]
    if step != 1:
        ctx.freeze(x, d, f"{node.name}: strided slice")
    if so is None:
        if n_out:  # one index selected: it may not be removed
            ctx.frozen.append((si[start : start + 1], f"{node.name}: slice keeps a single index"))
        return
    ctx.unite_slots(si[start : start + step * n_out : step], so)


def select(ctx: SlotContext, node: fx.Node) -> None:
    x = node.args[0]
    r = ctx.rank(x)
    d = _dim(node.args[1], r)
    ctx.freeze(x, d, f"{node.name}: select picks one index of this axis")
    for a in range(r):
        if a != d:
            ctx.unite(x, a, node, a if a < d else a - 1)


def cat(ctx: SlotContext, node: fx.Node) -> None:
    """cat(tensors, dim): piece k's indices sit at an offset in the output's axis."""
    pieces = [t for t in node.args[0] if ctx.is_tensor(t)]
    r = ctx.rank(node)
    d = _dim(node.args[1] if len(node.args) > 1 else 0, r)
    so = ctx.slots(node, d)
    off = 0
    for t in pieces:
        if ctx.rank(t) != r:  # legacy empty tensors
            continue
        for a in range(r):
            if a != d:
                ctx.unite(t, a, node, a)
        n = ctx.shape(t)[d]
        st = ctx.slots(t, d)
        if so is None or not isinstance(n, int):
            ctx.freeze(t, d, f"{node.name}: concatenated along a symbolic axis")
            ctx.freeze(node, d, f"{node.name}: concatenated along a symbolic axis")
            return
        if st is not None:
            ctx.unite_slots(st, so[off : off + n])
        else:
            ctx.frozen.append((so[off : off + n], f"{node.name}: size-1 piece of a cat"))
        off += n


def getitem(ctx: SlotContext, node: fx.Node) -> None:
    """getitem(split(x, ...), k): output index j <-> input index offset_k + j along the split axis."""
    src, k = node.args
    if not isinstance(src, fx.Node) or src.op != "call_function":
        return
    packet = getattr(src.target, "overloadpacket", None)
    if packet not in (aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split):
        # an output of a multi-output op without a rule (reported at that op): keep it whole
        ctx.freeze(node, None, f"{node.name}: output of {src.target}, which has no dependency rule")
        return
    x = src.args[0]
    r = ctx.rank(x)
    d = _dim(src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0), r)
    if packet is aten.unbind:
        d = _dim(src.args[1] if len(src.args) > 1 else 0, r)
        ctx.freeze(x, d, f"{src.name}: unbind")
        for a in range(r):
            if a != d:
                ctx.unite(x, a, node, a if a < d else a - 1)
        return
    vals = src.meta["val"]
    off = sum(int(v.shape[d]) for v in vals[:k])
    for a in range(r):
        if a != d:
            ctx.unite(x, a, node, a)
    si, so = ctx.slots(x, d), ctx.slots(node, d)
    n = int(vals[k].shape[d])
    if si is None:
        return
    if so is None:
        ctx.frozen.append((si[off : off + n], f"{src.name}: split piece of size 1"))
        return
    ctx.unite_slots(si[off : off + n], so)


# -- contractions --------------------------------------------------------------------------------
def linear(ctx: SlotContext, node: fx.Node) -> None:
    """linear(x, W, b): x[..., i] ~ W[:, i]; out[..., o] ~ W[o] ~ b[o]; leading axes pass through."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    r = ctx.rank(x)
    for a in range(r - 1):
        ctx.unite(x, a, node, a)
    ctx.unite(x, r - 1, w, 1)
    ctx.unite(w, 0, node, r - 1)
    if ctx.is_tensor(b):
        ctx.unite(b, 0, node, r - 1)


def addmm(ctx: SlotContext, node: fx.Node) -> None:
    """addmm(bias, m1, m2) = bias + m1 @ m2 (GPT-2's Conv1D)."""
    bias, m1, m2 = node.args[:3]
    ctx.unite(m1, 0, node, 0)
    ctx.unite(m1, 1, m2, 0)
    ctx.unite(m2, 1, node, 1)
    ctx.broadcast(node, [bias])


def mm(ctx: SlotContext, node: fx.Node) -> None:
    a, b = node.args[:2]
    ctx.unite(a, 0, node, 0)
    ctx.unite(a, 1, b, 0)
    ctx.unite(b, 1, node, 1)


def matmul(ctx: SlotContext, node: fx.Node) -> None:
    """matmul / bmm: batch axes broadcast, a[..., k] ~ b[..., k, :]."""
    a, b = node.args[:2]
    ra, rb, r = ctx.rank(a), ctx.rank(b), ctx.rank(node)
    if ra < 2 or rb < 2:
        raise NotImplementedError(f"matmul with a 1-D operand: {node.format_node()}")
    ctx.unite(a, ra - 1, b, rb - 2)
    ctx.unite(a, ra - 2, node, r - 2)
    ctx.unite(b, rb - 1, node, r - 1)
    for i in range(3, r + 1):
        if ra - i >= 0:
            ctx.unite(a, ra - i, node, r - i)
        if rb - i >= 0:
            ctx.unite(b, rb - i, node, r - i)


def baddbmm(ctx: SlotContext, node: fx.Node) -> None:
    inp, b1, b2 = node.args[:3]
    ctx.unite(b1, 2, b2, 1)
    ctx.unite(b1, 1, node, 1)
    ctx.unite(b2, 2, node, 2)
    ctx.unite(b1, 0, node, 0)
    ctx.unite(b2, 0, node, 0)
    ctx.broadcast(node, [inp])


def sdpa(ctx: SlotContext, node: fx.Node) -> None:
    """scaled_dot_product_attention(q, k, v, mask, ...): heads couple (KV head h // r under GQA).

    q (..., Hq, L, E), k (..., Hk, S, E), v (..., Hk, S, Ev) -> out (..., Hq, L, Ev).
    """
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    r = ctx.rank(q)
    for a in range(r - 3):
        for t in (k, v):
            ctx.unite(t, a, node, a)
        ctx.unite(q, a, node, a)
    ctx.unite(q, r - 1, k, r - 1)
    ctx.unite(v, r - 1, node, r - 1)
    ctx.unite(q, r - 3, node, r - 3)
    # head_dim is kept whole: a model's attention module has one head size for q, k and v
    for t in (q, k, v):
        ctx.freeze(t, r - 1, f"{node.name}: head_dim of attention (kept whole)")
    hq, hk = ctx.space(q, r - 3), ctx.space(k, r - 3)
    if hk is not None and hq is not None and hq[1] != hk[1]:
        rep = hq[1] // hk[1]
        qs = np.arange(hq[0], hq[0] + hq[1])
        for t in (k, v):
            ts = ctx.slots(t, r - 3)
            ctx.unite_slots(qs, ts[np.arange(hq[1]) // rep])
    elif hk is None and hq is not None:
        ctx.freeze(q, r - 3, f"{node.name}: query heads share a single KV head")
    else:
        ctx.unite(q, r - 3, k, r - 3)
        ctx.unite(q, r - 3, v, r - 3)
    if ctx.is_tensor(mask):
        ctx.broadcast(node, [mask])


def embedding(ctx: SlotContext, node: fx.Node) -> None:
    """embedding(W, ids): out[..., c] ~ W[:, c]; the rows of W are token ids (never removed)."""
    w, ids = node.args[:2]
    ctx.freeze(w, 0, f"{node.name}: embedding rows are indexed by token ids")
    ctx.unite(w, 1, node, ctx.rank(node) - 1)
    for a in range(ctx.rank(ids)):
        ctx.unite(ids, a, node, a)


# -- normalisations and reductions ---------------------------------------------------------------
def layer_norm(ctx: SlotContext, node: fx.Node) -> None:
    """layer_norm(x, shape, w, b) / rms_norm(x, shape, w, eps): per-channel weight and bias couple
    to the normalised axes; the statistic mixes channels, which is recorded as an approximation."""
    x, shape = node.args[:2]
    w = node.args[2] if len(node.args) > 2 else None
    b = node.args[3] if len(node.args) > 3 else None
    r = ctx.rank(x)
    for a in range(r):
        ctx.unite(x, a, node, a)
    k = len(shape)
    for i in range(k):
        ax = r - k + i
        ctx.mark_approx(node, ax, f"{node.name}: layer_norm statistics are taken over this axis")
        for p in (w, b):
            if ctx.is_tensor(p):
                ctx.unite(p, i, node, ax)


def reduction(ctx: SlotContext, node: fx.Node) -> None:
    """mean / sum over some axes: kept axes pass through; reduced axes are marked approximate."""
    x = node.args[0]
    r = ctx.rank(x)
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        dims = list(range(r))
    dims = {_dim(d, r) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    o = 0
    for a in range(r):
        if a in dims:
            ctx.mark_approx(x, a, f"{node.name}: a statistic (mean/sum) is taken over this axis")
            if keepdim:
                o += 1
            continue
        ctx.unite(x, a, node, o)
        o += 1


def softmax(ctx: SlotContext, node: fx.Node) -> None:
    x = node.args[0]
    ctx.broadcast(node, [x])
    ctx.freeze(x, _dim(node.args[1], ctx.rank(x)), f"{node.name}: softmax normalises over this axis")


def creation(ctx: SlotContext, node: fx.Node) -> None:
    """arange / zeros / ones / full / empty: fresh tensors, nothing to couple."""


def noop(ctx: SlotContext, node: fx.Node) -> None:
    """Ops whose outputs are not tensors (asserts, sym_size)."""


_UNARY = """abs neg exp log log1p sqrt rsqrt sin cos tanh sigmoid relu gelu silu erf square reciprocal
sign clone contiguous alias detach dropout native_dropout to _to_copy type_as lift_fresh_copy
pow clamp clamp_min clamp_max hardtanh leaky_relu elu mish softplus hardswish hardsigmoid
_assert_tensor_metadata logical_not bitwise_not nan_to_num fill zeros_like ones_like full_like
empty_like rand_like randn_like""".split()
_BINARY = """add sub rsub mul div true_divide floor_divide remainder maximum minimum where
masked_fill eq ne lt le gt ge logical_and logical_or bitwise_and bitwise_or __and__ __or__ addcmul
addcdiv lerp copy""".split()


def _table() -> dict:
    t: dict = {}
    for name in _UNARY + _BINARY:
        packet = getattr(aten, name, None)
        if packet is not None:
            t[packet] = elementwise
    for name, rule in {
        "view": reshape,
        "reshape": reshape,
        "_unsafe_view": reshape,
        "flatten": reshape,
        "unflatten": reshape,
        "expand": expand,
        "broadcast_to": expand,
        "unsqueeze": unsqueeze,
        "squeeze": squeeze,
        "transpose": transpose,
        "t": transpose,
        "permute": permute,
        "slice": slice_,
        "narrow": None,
        "select": select,
        "cat": cat,
        "concat": cat,
        "linear": linear,
        "addmm": addmm,
        "mm": mm,
        "bmm": matmul,
        "matmul": matmul,
        "baddbmm": baddbmm,
        "scaled_dot_product_attention": sdpa,
        "embedding": embedding,
        "layer_norm": layer_norm,
        "rms_norm": layer_norm,
        "mean": reduction,
        "sum": reduction,
        "softmax": softmax,
        "_softmax": softmax,
        "log_softmax": softmax,
        "_log_softmax": softmax,
        "arange": creation,
        "zeros": creation,
        "ones": creation,
        "full": creation,
        "empty": creation,
        "new_zeros": creation,
        "new_ones": creation,
        "new_full": creation,
        "new_empty": creation,
        "scalar_tensor": creation,
        "sym_size": noop,
        "sym_numel": noop,
        "split": noop,
        "split_with_sizes": noop,
        "chunk": noop,
        "unbind": noop,
        "tensor_split": noop,
        "_assert_tensor_metadata": noop,
    }.items():
        packet = getattr(aten, name, None)
        if packet is not None and rule is not None:
            t[packet] = rule
    t[operator.getitem] = getitem
    return t


DEFAULT_RULES: dict = _table()
"""ATen op (overload packet, e.g. ``torch.ops.aten.add``) or Python callable -> rule."""
