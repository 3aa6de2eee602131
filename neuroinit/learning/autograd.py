"""Reference rules run under autograd: BPTT (the ground truth) and autograd e-prop (the paper's method)."""

from __future__ import annotations

import torch

from neuroinit.cells.base import PARAM_NAMES, RecurrentCell
from neuroinit.learning.base import LearningRule, Trial, accumulate_grads, feedback_matrix
from neuroinit.tasks.base import Batch, Task

__all__ = ["BPTT", "AutogradEprop"]


def _run_and_differentiate(rule: LearningRule, batch: Batch, task: Task, *, eprop_detach: bool,
                           feedback: torch.Tensor | None, truncation: int | None) -> Trial:
    cell = rule.cell
    params = cell.params()
    state = cell.init_state(batch.inputs.shape[1])
    ys = []
    for t, u in enumerate(batch.inputs):
        if truncation is not None and t % truncation == 0:
            state = type(state)(*(s.detach() for s in state))
        y, state = cell.step(params, state, u, eprop_detach=eprop_detach, feedback=feedback)
        ys.append(y)
    outputs = torch.stack(ys)
    loss = task.loss(outputs, batch)
    leaves = [getattr(cell, n) for n in PARAM_NAMES]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    accumulate_grads(cell, {n: g for n, g in zip(PARAM_NAMES, grads) if g is not None})
    return Trial(loss.detach(), outputs.detach())


class BPTT(LearningRule):
    """Backpropagation through time through the unrolled cell; ``truncation=k`` detaches the state every
    k steps (k = 1: one-step truncated BPTT)."""

    name = "bptt"

    def __init__(self, cell: RecurrentCell, *, truncation: int | None = None) -> None:
        super().__init__(cell)
        if truncation is not None and not (isinstance(truncation, int) and truncation >= 1):
            raise ValueError(f"Invalid truncation {truncation!r}: allowed None or an integer >= 1")
        self.truncation = truncation

    def backward(self, batch: Batch, task: Task) -> Trial:
        return _run_and_differentiate(self, batch, task, eprop_detach=False, feedback=None,
                                      truncation=self.truncation)


class AutogradEprop(LearningRule):
    """e-prop computed by autograd (Liu et al. 2024's reference implementation): the state is detached where
    it enters the recurrent weights (and the LIF reset), the leak path keeps its gradient. Symmetric feedback
    follows from autograd; random feedback goes through :func:`neuroinit.cells.base.readout`."""

    name = "eprop-autograd"

    def __init__(self, cell: RecurrentCell, *, feedback: str | torch.Tensor = "symmetric",
                 generator: torch.Generator | None = None) -> None:
        super().__init__(cell)
        self.feedback = feedback_matrix(cell, feedback, generator=generator)

    def backward(self, batch: Batch, task: Task) -> Trial:
        return _run_and_differentiate(self, batch, task, eprop_detach=True, feedback=self.feedback,
                                      truncation=None)
