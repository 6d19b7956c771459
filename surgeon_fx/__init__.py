"""surgeon_fx: second-order structured pruning of language models as passes over a torch.fx graph."""

from . import passes  # noqa: E402  (surgeon_fx.passes)
from .api import CompressConfig, check_model, compress, prune
from .checkpoint import load_pretrained, save_pretrained
from .export import export_onnx, export_pt2
from .ir import KINDS, Analysis, Group, Member, Plan, Scores, TraceInfo
from .keys import GROUPS, PLAN, SCORES, SOURCE, SurgeonError, UnsupportedGraphError, require
from .patterns import check_nm, to_semi_structured_
from .sparse_shots import SparsityReport
from .tracing import trace

__all__ = [
    "compress",
    "prune",
    "CompressConfig",
    "check_model",
    "passes",
    "trace",
    "Analysis",
    "Group",
    "Member",
    "Plan",
    "Scores",
    "TraceInfo",
    "KINDS",
    "GROUPS",
    "PLAN",
    "SCORES",
    "SOURCE",
    "SurgeonError",
    "UnsupportedGraphError",
    "require",
    "save_pretrained",
    "load_pretrained",
    "export_onnx",
    "export_pt2",
    "check_nm",
    "to_semi_structured_",
    "SparsityReport",
]
__version__ = "0.1.0"
