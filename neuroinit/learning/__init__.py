"""Learning rules that write ``.grad``: BPTT, autograd e-prop, online e-prop / RFLO, and chip precision.

``make_rule(name, cell)`` names: ``bptt``, ``eprop`` (online, symmetric feedback), ``eprop-autograd``
(the paper's detach implementation), ``rflo`` (online, random feedback; on a rate-form cell this is Murray's
RFLO).
"""

from __future__ import annotations

import torch

from neuroinit.cells.base import RecurrentCell
from neuroinit.learning.autograd import BPTT, AutogradEprop
from neuroinit.learning.base import FEEDBACKS, LearningRule, Trial, feedback_matrix
from neuroinit.learning.chip import attach_chip_constraints, learning_grids, make_trace_quantiser
from neuroinit.learning.online import OnlineEprop, OnlineState, Traces, trace_step

__all__ = ["BPTT", "AutogradEprop", "OnlineEprop", "OnlineState", "Traces", "trace_step", "LearningRule",
           "Trial", "FEEDBACKS", "feedback_matrix", "attach_chip_constraints", "learning_grids",
           "make_trace_quantiser", "RULES", "make_rule"]

RULES = ("bptt", "eprop", "eprop-autograd", "rflo")


def make_rule(name: str, cell: RecurrentCell, *, generator: torch.Generator | None = None,
              chip_precision: bool = True, fast: bool | str = "auto") -> LearningRule:
    """Build a rule by name. ``rflo`` draws its random feedback from ``generator``. With ``chip_precision``
    and a profile that learns on chip, the online rules hold their traces at the profile's trace precision
    (the weight grid is enforced by :func:`attach_chip_constraints` on the optimizer). ``fast`` selects the
    online rules' fused native step (see :class:`OnlineEprop`; ``"auto"``: wherever it gives the same
    results) and BPTT's fused passes (:mod:`neuroinit.learning.fused_bptt`)."""
    if name == "bptt":
        return BPTT(cell, fast=fast)
    if name == "eprop-autograd":
        return AutogradEprop(cell)
    if name in ("eprop", "rflo"):
        quantiser = None
        if chip_precision and cell.profile.learns_on_chip:
            if generator is None:
                raise ValueError(f"Invalid rule '{name}' on profile '{cell.profile.name}': chip-precision traces "
                                 "need a generator for stochastic rounding")
            quantiser = make_trace_quantiser(cell, generator=generator)
        return OnlineEprop(cell, feedback="symmetric" if name == "eprop" else "random", generator=generator,
                           trace_quantiser=quantiser, fast=fast)
    raise ValueError(f"Invalid rule {name!r}: allowed {', '.join(RULES)}")
