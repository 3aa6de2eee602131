"""Loss-landscape curvature and generalisation gap (Liu et al. 2022, "Beyond accuracy"; science.md section 5).

* :func:`top_hessian_eigenvalue`: the top eigenvalue of the Hessian of the task loss with respect to ``W_rec``,
  by power iteration on Hessian-vector products (double backward), on a given (held-out) batch, through the
  **untruncated** network: plain BPTT, no e-prop detach, no feedback matrix, whatever rule trained it.
* :func:`generalisation_gap`: test loss on fresh trials minus the loss on the training batch.

Choices (ours, documented):

* The point: the Hessian is taken at the recurrent weights the forward pass uses (``cell.params().w_rec``: on
  the profile's grid for a quantised profile), of the loss as a smooth function of a float ``W_rec``
  (rounding is piecewise constant; its curvature is not the landscape's). The other parameters are held at
  ``cell.params()``.
* Removed autapses stay removed: the power iteration runs in the subspace of off-diagonal entries (the mask is
  applied to the start vector and every product), so the diagonal's zero rows of the Hessian do not count.
* "Top" is the largest (most positive) eigenvalue, the sharpness. Power iteration converges to the eigenvalue
  of largest magnitude; when that one is negative (away from a minimum), a second power iteration on the
  shifted operator ``H - lambda I`` finds the largest. Stopping: the relative change
  ``|lambda_k - lambda_{k-1}| <= tol * max(|lambda_k|, 1e-12)`` (``tol = 1e-6``), at most ``max_iter = 500``
  Hessian-vector products in all. ``converged`` says which stopped it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from neuroinit.cells.base import RecurrentCell
from neuroinit.tasks.base import Batch, Task

__all__ = ["DEFAULT_TEST_TRIALS", "CurvatureResult", "batch_loss", "generalisation_gap", "top_hessian_eigenvalue"]

DEFAULT_TEST_TRIALS = 256


class CurvatureResult(NamedTuple):
    """``top_eigenvalue``: largest Hessian eigenvalue w.r.t. ``W_rec``; ``iterations``: Hessian-vector
    products used; ``converged``: whether the tolerance was met within ``max_iter``."""

    top_eigenvalue: float
    iterations: int
    converged: bool


def _check_batch(cell: RecurrentCell, batch: Batch) -> None:
    if not isinstance(batch, Batch):
        raise ValueError(f"Invalid batch {type(batch).__name__}: expected a neuroinit.tasks.Batch")
    if batch.inputs.dim() != 3 or batch.inputs.shape[-1] != cell.n_in:
        raise ValueError(f"Invalid batch inputs {tuple(batch.inputs.shape)}: expected (T, B, {cell.n_in})")


def _loss_of_w_rec(cell: RecurrentCell, w_rec: Tensor, batch: Batch, task: Task) -> Tensor:
    """Task loss of the untruncated network with recurrent weights ``w_rec`` (others as ``cell.params()``)."""
    params = cell.params()
    params = params._replace(**{n: getattr(params, n).detach() for n in params._fields if n != "w_rec"},
                             w_rec=w_rec)
    inputs = batch.inputs.to(dtype=w_rec.dtype, device=w_rec.device)
    state = cell.init_state(inputs.shape[1])
    ys = []
    for u in inputs:
        y, state = cell.step(params, state, u)
        ys.append(y)
    return task.loss(torch.stack(ys), batch)


def batch_loss(cell: RecurrentCell, batch: Batch, task: Task) -> float:
    """The task loss of ``cell`` (as the forward pass runs it) on ``batch``, without gradients."""
    _check_batch(cell, batch)
    with torch.no_grad():
        y, _ = cell(batch.inputs.to(dtype=cell.w_rec.dtype, device=cell.w_rec.device))
        return float(task.loss(y, batch))


def top_hessian_eigenvalue(cell: RecurrentCell, batch: Batch, task: Task, *, max_iter: int = 500,
                           tol: float = 1e-6, generator: torch.Generator) -> CurvatureResult:
    """Top Hessian eigenvalue of ``task.loss`` on ``batch`` w.r.t. ``W_rec`` by power iteration (module
    docstring). ``generator`` draws the start vector."""
    if not isinstance(cell, RecurrentCell):
        raise ValueError(f"Invalid cell {type(cell).__name__}: expected a RecurrentCell")
    _check_batch(cell, batch)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Invalid max_iter {max_iter!r}: must be an integer >= 1")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"Invalid tol {tol!r}: must be a positive finite number")
    w0 = cell.params().w_rec.detach().clone().requires_grad_(True)
    mask = cell.recurrent_mask()
    with torch.enable_grad():
        loss = _loss_of_w_rec(cell, w0, batch, task)
        if not bool(torch.isfinite(loss)):
            raise ValueError("Invalid network or batch: the loss is not finite")
        (grad,) = torch.autograd.grad(loss, w0, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(grad, w0, grad_outputs=v, retain_graph=True)
            return hv * mask if mask is not None else hv

        v0 = torch.randn(w0.shape, generator=generator, dtype=torch.float64).to(dtype=w0.dtype, device=w0.device)
        if mask is not None:
            v0 = v0 * mask
        eig, it, converged = _power_iteration(hvp, v0, max_iter=max_iter, tol=tol)
        if eig < 0 and it < max_iter:
            # the largest-magnitude eigenvalue is negative: find the largest one of H - eig I (>= 0), then shift back
            shifted, it2, converged = _power_iteration(lambda v: hvp(v) - eig * v, v0, max_iter=max_iter - it,
                                                       tol=tol)
            eig, it = shifted + eig, it + it2
    return CurvatureResult(top_eigenvalue=eig, iterations=it, converged=converged)


def _power_iteration(matvec, v: Tensor, *, max_iter: int, tol: float) -> tuple[float, int, bool]:
    """Largest-magnitude eigenvalue of a symmetric operator: ``(eigenvalue, products used, converged)``."""
    v = v / v.norm()
    eig, it = 0.0, 0
    for it in range(1, max_iter + 1):
        hv = matvec(v)
        new = float((hv * v).sum())
        if it > 1 and abs(new - eig) <= tol * max(abs(new), 1e-12):
            return new, it, True
        eig = new
        norm = hv.norm()
        if float(norm) == 0.0:  # v lies in the null space
            return 0.0, it, True
        v = hv.detach() / norm
    return eig, it, False


def generalisation_gap(cell: RecurrentCell, task: Task, *, train_batch: Batch, generator: torch.Generator,
                       n_trials: int = DEFAULT_TEST_TRIALS) -> float:
    """Test loss on ``n_trials`` fresh trials of ``task`` (drawn with ``generator``) minus the loss on
    ``train_batch`` (the trials the network was trained on), both through the forward pass the cell runs."""
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"Invalid n_trials {n_trials!r}: must be an integer >= 1")
    train = batch_loss(cell, train_batch, task)
    test_batch = task.batch(n_trials, generator=generator, dtype=cell.w_rec.dtype, device=cell.w_rec.device)
    return batch_loss(cell, test_batch, task) - train
