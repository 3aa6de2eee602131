"""Gradient alignment: how far a local rule's gradient is from the BPTT gradient (the truncation error).

For every parameter ``P`` (``w_in``, ``w_rec``, ``bias``, ``w_out``, ``b_out``) and one batch, with ``g_loc`` the
gradient a local rule (online e-prop, RFLO, LIF e-prop; :mod:`neuroinit.learning`) writes to ``.grad`` and
``g_bp`` the BPTT gradient of the same loss on the same batch and network::

    cos(P)     = <g_loc, g_bp> / (||g_loc|| ||g_bp||)
    rel_err(P) = ||g_loc - g_bp|| / ||g_bp||                (Frobenius norms)

This is the measure of claim 4 of Liu et al. 2024 (arXiv 2410.11164, science.md section 7): small gains reduce
the truncation error yet learn worse. Numbers are averaged over batches per network, then over seeds (networks).

Where theory says the two gradients are equal (each case a test):

* ``W_rec = 0`` (gain 0), rate networks, symmetric feedback (e-prop in the voltage form; RFLO's rate form with
  ``B = W_out^T``): the only recurrence left is the leak ``(1 - alpha) I``, which the eligibility traces carry
  exactly, and the learning signal equals the total derivative because no unit influences another
  (Bellec et al. 2020, Eq. 1-3; Murray 2019). Every parameter: ``cos = 1``, ``rel_err = 0``.
* ``alpha = 1`` (rate networks): e-prop is one-step truncated BPTT (science.md 2.2), so against the reference
  ``truncation = 1`` the alignment is exact for any ``W_rec``.
* ``w_out`` and ``b_out``: the readout gradient needs no backpropagation through time (the readout trace is
  exact), so it is exact for every rule, gain and model, random feedback included.
* Not exact at gain 0: random feedback (RFLO: ``B`` is not ``W_out^T``) for ``w_in``, ``w_rec``, ``bias``; LIF
  e-prop, whose traces leave out the reset's path ``-v_th psi_{t-1}`` (Bellec et al.'s e-prop does).

A zero BPTT gradient gives ``nan`` (no direction to compare with). Alignment of networks built as training
builds them, averaged over seeds and written as a report: :mod:`neuroinit.experiments.alignment_report`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from neuroinit.cells.base import PARAM_NAMES, RecurrentCell
from neuroinit.learning import BPTT, LearningRule
from neuroinit.tasks.base import Batch, Task

__all__ = [
    "ALIGN_RULES",
    "BatchAlignment",
    "NetworkAlignment",
    "alignment_with_bptt",
    "compare_grads",
    "network_alignment",
    "rule_gradients",
]

ALIGN_RULES = ("eprop", "rflo", "eprop-autograd")   # local rules compared with BPTT


class BatchAlignment(NamedTuple):
    """One batch: ``cosine[name]``, ``rel_error[name]`` per parameter, and the batch's loss."""

    cosine: dict[str, float]
    rel_error: dict[str, float]
    loss: float


@dataclasses.dataclass
class NetworkAlignment:
    """One network over several batches: per parameter, one value per batch."""

    cosine: dict[str, list[float]]
    rel_error: dict[str, list[float]]
    loss: list[float]

    def to_dict(self) -> dict:
        return {"cosine": self.cosine, "rel_error": self.rel_error, "loss": self.loss}


def _grads_of(cell: RecurrentCell) -> dict[str, torch.Tensor]:
    return {n: (torch.zeros_like(getattr(cell, n)) if getattr(cell, n).grad is None
                else getattr(cell, n).grad.detach().clone()) for n in PARAM_NAMES}


def rule_gradients(cell: RecurrentCell, rule: LearningRule, batch: Batch, task: Task
                   ) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient ``rule`` writes for ``batch`` (name -> tensor) and the batch loss; the cell's ``.grad`` is
    left as it was."""
    saved = {n: getattr(cell, n).grad for n in PARAM_NAMES}
    try:
        for n in PARAM_NAMES:
            getattr(cell, n).grad = None
        trial = rule.backward(batch, task)
        return _grads_of(cell), float(trial.loss)
    finally:
        for n in PARAM_NAMES:
            getattr(cell, n).grad = saved[n]


def compare_grads(local: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """``(cosine, rel_error)`` per parameter (module docstring), computed in float64."""
    cos, rel = {}, {}
    for n in PARAM_NAMES:
        a, b = local[n].detach().double().ravel(), reference[n].detach().double().ravel()
        nb = float(b.norm())
        na = float(a.norm())
        cos[n] = float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan
        rel[n] = float((a - b).norm()) / nb if nb > 0 else math.nan
    return cos, rel


def alignment_with_bptt(cell: RecurrentCell, local: dict[str, torch.Tensor], batch: Batch, task: Task, *,
                        truncation: int | None = None) -> BatchAlignment:
    """Compare a local gradient already computed on ``batch`` (e.g. the ``.grad`` a training step wrote) with
    BPTT's (``truncation=k``: BPTT truncated every k steps) on the same batch; ``.grad`` is left as it was."""
    ref, loss = rule_gradients(cell, BPTT(cell, truncation=truncation), batch, task)
    cos, rel = compare_grads(local, ref)
    return BatchAlignment(cos, rel, loss)


def network_alignment(cell: RecurrentCell, rule: LearningRule, task: Task, batches: Iterable[Batch], *,
                      truncation: int | None = None) -> NetworkAlignment:
    """:class:`BatchAlignment` of ``rule`` against BPTT on each batch, collected per parameter."""
    out = NetworkAlignment({n: [] for n in PARAM_NAMES}, {n: [] for n in PARAM_NAMES}, [])
    for batch in batches:
        local, _ = rule_gradients(cell, rule, batch, task)
        a = alignment_with_bptt(cell, local, batch, task, truncation=truncation)
        for n in PARAM_NAMES:
            out.cosine[n].append(a.cosine[n])
            out.rel_error[n].append(a.rel_error[n])
        out.loss.append(a.loss)
    return out
