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
    k steps (k = 1: one-step truncated BPTT).

    ``fast`` (:mod:`neuroinit.learning.fused_bptt`): ``True`` or ``"auto"`` compute untruncated BPTT without
    autograd's tape (forward with records, backward recursion, weight gradients as GEMMs over all steps) where
    the cell allows it (rate cells, plain LIF; float32, CPU), equal to autograd's gradients up to float32
    rounding; elsewhere, and with ``False`` (default), autograd. ``uses_fast_path`` says which path the last
    :meth:`backward` took, ``fast_path_reason`` why it was not the fused one."""

    name = "bptt"

    def __init__(self, cell: RecurrentCell, *, truncation: int | None = None, fast: bool | str = False) -> None:
        super().__init__(cell)
        if truncation is not None and not (isinstance(truncation, int) and truncation >= 1):
            raise ValueError(f"Invalid truncation {truncation!r}: allowed None or an integer >= 1")
        if fast not in (True, False, "auto"):
            raise ValueError(f"Invalid fast {fast!r}: allowed True, False, 'auto'")
        self.truncation = truncation
        self.fast = fast
        self.uses_fast_path = False
        self.fast_path_reason: str | None = None
        self.workspace = None  # the fused BPTT's record buffers (fused_bptt.Workspace), kept across trials

    @property
    def step_path(self) -> str:
        """What a run file records (``/summary/step_path``): ``fused-bptt`` or ``torch`` (autograd)."""
        return "fused-bptt" if self.uses_fast_path else "torch"

    def backward(self, batch: Batch, task: Task) -> Trial:
        self.uses_fast_path = False
        self.fast_path_reason = "fast=False" if not self.fast else None
        if self.fast:
            from neuroinit.learning import fused_bptt

            self.fast_path_reason = fused_bptt.supports(self.cell, truncation=self.truncation)
            if self.fast_path_reason is None:
                trial = fused_bptt.backward(self, batch, task)
                self.uses_fast_path = True
                return trial
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
