"""The compiler passes of surgeon_fx, in pipeline order.

``annotate_groups`` (dependency analysis) -> ``annotate_scores`` (removal costs) ->
``annotate_plan`` / ``make_plan`` (what to remove) -> ``apply_plan`` (rewrite the graph) and
``apply_plan_to_module`` (rewrite the eager model). Analysis passes (``annotate_*``) only write
``gm.meta``; transform passes (``apply_*``) return a new module.
"""

from .groups import annotate_groups, get_groups, param_aliases, param_fqns
from .module import apply_plan_to_module_
from .plan import annotate_plan, make_plan, plan_from_removed
from .rewrite import ARG_RULES, apply_plan
from .rules import DEFAULT_RULES, SlotContext
from .scores import SCORE_METHODS, annotate_scores

__all__ = [
    "annotate_groups",
    "get_groups",
    "param_aliases",
    "param_fqns",
    "annotate_scores",
    "SCORE_METHODS",
    "annotate_plan",
    "make_plan",
    "plan_from_removed",
    "apply_plan",
    "apply_plan_to_module_",
    "ARG_RULES",
    "DEFAULT_RULES",
    "SlotContext",
]
