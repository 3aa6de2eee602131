"""What every learning rule shares: it turns one trial into gradients written to ``.grad``.

Rules accumulate into ``.grad`` exactly as ``loss.backward()`` does, so any ``torch.optim`` optimizer applies
them, and ``optimizer.zero_grad()`` stays the caller's job.
"""

from __future__ import annotations

import abc
import math
from typing import NamedTuple

import torch

from neuroinit.cells.base import PARAM_NAMES, RecurrentCell
from neuroinit.tasks.base import Batch, Task

__all__ = ["Trial", "LearningRule", "feedback_matrix", "FEEDBACKS", "accumulate_grads"]

FEEDBACKS = ("symmetric", "random")


class Trial(NamedTuple):
    """Result of one trial: the scalar loss (detached) and the outputs (T, B, O) (detached)."""

    loss: torch.Tensor
    outputs: torch.Tensor


class LearningRule(abc.ABC):
    """A rule bound to a cell. :meth:`backward` runs one batch of trials and accumulates ``.grad``."""

    name: str = ""

    def __init__(self, cell: RecurrentCell) -> None:
        if not isinstance(cell, RecurrentCell):
            raise ValueError(f"Invalid cell {type(cell).__name__}: a learning rule needs a RecurrentCell")
        self.cell = cell

    @abc.abstractmethod
    def backward(self, batch: Batch, task: Task) -> Trial:
        """Run ``batch`` through the cell and add this rule's gradient of ``task.loss`` to ``.grad``."""


def feedback_matrix(cell: RecurrentCell, kind: str | torch.Tensor, *, generator: torch.Generator | None
                    ) -> torch.Tensor | None:
    """The (O, N) matrix that carries output errors to hidden units: ``None`` for ``"symmetric"`` (use the
    current ``W_out``), a fixed random matrix with the readout's initial statistics (rows of norm
    ``1/sqrt(N)``) for ``"random"``, or a given tensor."""
    if isinstance(kind, torch.Tensor):
        if tuple(kind.shape) != (cell.n_out, cell.n_hidden):
            raise ValueError(f"Invalid feedback matrix shape {tuple(kind.shape)}: expected "
                             f"({cell.n_out}, {cell.n_hidden})")
        return kind.to(dtype=cell.w_rec.dtype, device=cell.w_rec.device)
    if kind == "symmetric":
        return None
    if kind == "random":
        if generator is None:
            raise ValueError("Invalid feedback 'random' without a generator: pass generator=torch.Generator()")
        n = cell.n_hidden
        b = torch.randn(cell.n_out, n, generator=generator, dtype=torch.float64)
        b = b / b.norm(dim=1, keepdim=True) / math.sqrt(n)
        return b.to(dtype=cell.w_rec.dtype, device=cell.w_rec.device)
    raise ValueError(f"Invalid feedback {kind!r}: allowed {', '.join(FEEDBACKS)} or an (O, N) tensor")


def accumulate_grads(cell: RecurrentCell, grads: dict[str, torch.Tensor]) -> None:
    """Add ``grads`` (name -> tensor) to the cell's ``.grad``, as ``backward()`` would; removed autapses stay
    at zero."""
    for name in PARAM_NAMES:
        g = grads.get(name)
        if g is None:
            continue
        p = getattr(cell, name)
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
        if name == "w_rec" and cell.remove_autapses:
            p.grad.diagonal().zero_()
