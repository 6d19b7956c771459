"""The report of a compression run: ``report.md``, ``report.json`` and PNG plots.

Reads: the dependency analysis of the dense model and the composed plan (what was removed per group), and a
run record (a plain dict the CLI fills: command, settings, sizes, perplexities, times, versions; see
:func:`write_report`). Writes: ``report.md``, ``report.json``, ``widths.png`` and ``perplexity.png`` in one
folder. Invariant: every number in the report comes from the record or from the plan and the analysis;
nothing is recomputed here, so the report says exactly what the run measured.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .ir import Analysis, Plan

__all__ = ["Width", "layer_widths", "plot_widths", "plot_perplexity", "write_report"]


@dataclass(frozen=True)
class Width:
    """Atoms (and indices) one group had before and keeps after the plan."""

    group: str
    module: str
    kind: str
    atoms_before: int
    atoms_after: int
    atom_width: int

    @property
    def width_before(self) -> int:
        return self.atoms_before * self.atom_width

    @property
    def width_after(self) -> int:
        return self.atoms_after * self.atom_width


def layer_widths(analysis: Analysis, plan: Plan) -> list[Width]:
    """One :class:`Width` per group of the dense model, in graph order (so layers come in order).

    Args:
        analysis: ``annotate_groups`` on the dense model the plan was made for.
        plan: the composed plan (``compressed.surgeon_fx_plan``); atoms removed per group are counted.

    Returns:
        The widths; groups the plan does not name keep all their atoms.
    """
    return [
        Width(g.name, g.module, g.kind, g.n_atoms, g.n_atoms - len(plan.removed.get(g.name, ())), g.atom_width)
        for g in analysis.groups
    ]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_widths(widths: list[Width], path: str | os.PathLike) -> Path | None:
    """Bar chart of the kept width per layer, one panel per structure kind (residual: one bar).

    Returns:
        The PNG's path, or ``None`` when matplotlib is not installed (``pip install 'surgeon-fx[report]'``).
    """
    plt = _pyplot()
    if plt is None or not widths:
        return None
    kinds = [k for k in ("heads", "mlp", "residual") if any(w.kind == k for w in widths)]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, 2.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        rows = [w for w in widths if w.kind == kind]
        x = list(range(len(rows)))
        ax.bar(x, [w.width_before for w in rows], color="#d9d9d9", label="before")
        ax.bar(x, [w.width_after for w in rows], color="#3b75af", label="kept")
        unit = "channels" if kind == "residual" else ("heads x head_dim" if kind == "heads" else "units")
        ax.set_ylabel(f"{kind}\n({unit})")
        ax.set_xticks(x if len(x) <= 40 else x[:: max(1, len(x) // 20)])
        ax.set_xlim(-0.6, len(rows) - 0.4)
        kept = sum(w.width_after for w in rows) / max(1, sum(w.width_before for w in rows))
        ax.set_title(f"{kind}: {100 * kept:.1f}% of the width kept", fontsize=10)
    axes[-1, 0].set_xlabel("group, in graph order (layer index for per-layer structures)")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_perplexity(points: list[dict], path: str | os.PathLike) -> Path | None:
    """Perplexity (log scale) against parameter count for the dense model and every shot that was evaluated.

    Args:
        points: ``{"label", "parameters", "perplexity"}`` dicts in run order.
        path: the PNG to write.

    Returns:
        The PNG's path, or ``None`` when matplotlib is missing or no point has a perplexity.
    """
    plt = _pyplot()
    pts = [p for p in points if p.get("perplexity") is not None]
    if plt is None or not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs, ys = [p["parameters"] / 1e6 for p in pts], [p["perplexity"] for p in pts]
    ax.plot(xs, ys, "o-", color="#3b75af")
    for x, y, p in zip(xs, ys, pts):
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if max(ys) / min(ys) > 10:
        ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("perplexity")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _change(a, b) -> str:
    return f"{100 * (b / a - 1):+.1f}%" if a and b is not None else ""


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _sparsity_lines(sp: dict | None) -> list[str]:
    """The sparsity the run reached, in one paragraph (nothing without ``--sparsity``)."""
    if not sp:
        return []
    text = (
        f"Sparsity ({sp['pattern']}, {sp['method']}): **{100 * sp['reached']:.2f}%** of the {sp['weights']:,} "
        f"weights of {sp['layers']} decoder linear layers are zero ({sp['zero_weights']:,}; target "
        f"{100 * sp['target']:.2f}%)."
    )
    if sp.get("nm_valid") is True:
        text += f" Every one of these layers is valid {sp['pattern']}."
    elif sp.get("nm_valid") is False:
        bad = sp["nm_invalid_layers"]
        text += f" **{len(bad)} layers break {sp['pattern']}**: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}."
    return ["", text]


def write_report(folder: str | os.PathLike, record: dict, widths: list[Width] | None = None) -> Path:
    """Write ``report.md``, ``report.json`` and the plots into ``folder``.

    Args:
        folder: an existing folder (the run's output).
        record: ``command`` (str), ``model`` (str), ``settings`` (dict), ``dense`` / ``compressed`` (dicts
            with ``parameters``, ``linear_parameters``, ``file_bytes``, ``perplexity``), ``eval`` (dict:
            ``text``, ``windows``, ``seq_len``), ``points`` (see :func:`plot_perplexity`), ``times``
            ({stage: seconds}), ``versions`` (dict), ``plan_summary`` (str), ``files`` ({name: bytes}),
            ``sparsity`` (``None`` or a dict: ``pattern``, ``method``, ``target``, ``reached``,
            ``zero_weights``, ``weights``, ``layers``, ``nm_valid``, ``nm_invalid_layers``), ``processes``.
            Missing entries are shown as "-".
        widths: from :func:`layer_widths`, for the per-layer table and plot.

    Returns:
        The path of ``report.md``.
    """
    folder = Path(folder)
    widths = widths or []
    plots = {
        "widths.png": plot_widths(widths, folder / "widths.png"),
        "perplexity.png": plot_perplexity(record.get("points", []), folder / "perplexity.png"),
    }
    d, c = record.get("dense", {}), record.get("compressed", {})
    ev = record.get("eval") or {}
    ppl = "perplexity" + (f" ({ev.get('windows')} x {ev.get('seq_len')} tokens of {ev.get('text')})" if ev else "")

    def num(x, fmt="{:,}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"# surgeon-fx compress: {record.get('model', '?')}", "", "```", record.get("command", "?"), "```", ""]
    lines += _table(
        ["", "dense", "compressed", "change"],
        [
            [
                "parameters (whole model)",
                num(d.get("parameters")),
                num(c.get("parameters")),
                _change(d.get("parameters"), c.get("parameters")),
            ],
            [
                "parameters (decoder linear)",
                num(d.get("linear_parameters")),
                num(c.get("linear_parameters")),
                _change(d.get("linear_parameters"), c.get("linear_parameters")),
            ],
            [
                "weights file (MB, safetensors)",
                _mb(d.get("file_bytes")),
                _mb(c.get("file_bytes")),
                _change(d.get("file_bytes"), c.get("file_bytes")),
            ],
            [
                ppl,
                num(d.get("perplexity"), "{:.3f}"),
                num(c.get("perplexity"), "{:.3f}"),
                f"x{c['perplexity'] / d['perplexity']:.2f}" if d.get("perplexity") and c.get("perplexity") else "",
            ],
        ],
    )
    adapted = record.get("adapted") or {}
    if adapted.get("perplexity"):
        ratio = (
            f"; the compressed model is x{c['perplexity'] / adapted['perplexity']:.2f} of it"
            if c.get("perplexity")
            else ""
        )
        lines += [
            "",
            f"Dense model after the adaptation (`--adapt-steps`, before the first shot): perplexity "
            f"{adapted['perplexity']:.3f}{ratio}.",
        ]
    ckpt = record.get("checkpoint") or {}
    if ckpt:
        how = (
            "stock `AutoModelForCausalLM.from_pretrained`"
            if ckpt["layout"] == "stock"
            else "`surgeon_fx.load_pretrained`"
        )
        lines += ["", f"Checkpoint layout: **{ckpt['layout']}**, loads with {how}."]
        lines += [f"Why not stock: {ckpt['why_uneven']}"] if ckpt.get("why_uneven") else []
    lines += _sparsity_lines(record.get("sparsity"))
    lines += ["", "## Settings", ""] + [f"- {k}: `{v}`" for k, v in record.get("settings", {}).items()]
    lines += ["", "## Plan", "", "```", record.get("plan_summary", "-"), "```"]
    for name, title in (("widths.png", "Kept width per layer"), ("perplexity.png", "Perplexity against size")):
        lines += ["", f"## {title}", "", f"![{title}]({name})" if plots[name] else "(matplotlib is not installed)"]
    if record.get("points"):
        lines += ["", "## Shots", ""]
        lines += _table(
            ["", "parameters", "perplexity"],
            [[p["label"], f"{p['parameters']:,}", num(p.get("perplexity"), "{:.3f}")] for p in record["points"]],
        )
    if widths:
        lines += ["", "## Removed per layer", ""]
        rows = [
            [
                w.module or "<model>",
                w.kind,
                f"{w.atoms_after} / {w.atoms_before}",
                f"{w.width_after} / {w.width_before}",
                f"{100 * (1 - w.atoms_after / w.atoms_before):.1f}%",
            ]
            for w in widths
        ]
        lines += _table(["module", "kind", "atoms kept", "width kept", "removed"], rows)
    lines += ["", "## Time", ""] + _table(
        ["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in record.get("times", {}).items()]
    )
    lines += ["", "## Files", ""] + _table(
        ["file", "MB"], [[k, _mb(v)] for k, v in sorted(record.get("files", {}).items())]
    )
    lines += ["", "## Versions", ""] + [f"- {k}: {v}" for k, v in record.get("versions", {}).items()]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    full = {**record, "widths": [asdict(w) for w in widths], "plots": [k for k, v in plots.items() if v]}
    (folder / "report.json").write_text(json.dumps(full, indent=2, default=str))
    return folder / "report.md"
