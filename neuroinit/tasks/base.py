"""Task contract shared by every task: time-major batches with masks, masked losses and their per-step gradients.

Conventions
-----------
* Sequences are time-major: ``inputs`` is ``(T, B, n_in)``.
* ``mask`` is ``(T, B)``, 0/1 in the batch's float dtype; a step with mask 0 contributes nothing to the loss.
* Both losses are normalised by the total mask ``M = sum(mask)`` of the whole batch, so the loss is a mean
  over counted steps and trials. ``M`` is known at the start of a trial, which is what lets an online learning
  rule compute the exact per-step output error (:meth:`Task.output_error`) without seeing the future.
* An all-zero mask gives a loss of exactly 0 (the denominator is clamped to the dtype's smallest normal number,
  which changes nothing when at least one step is counted).
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LOSS_KINDS", "Batch", "Task", "masked_cross_entropy", "masked_mse"]

LOSS_KINDS = ("mse", "ce")


class Batch(NamedTuple):
    """One batch of trials, time-major.

    inputs:  ``(T, B, n_in)`` float.
    targets: ``(T, B, n_out)`` float for loss ``"mse"``; ``(T, B)`` int64 class labels for loss ``"ce"``.
    mask:    ``(T, B)`` float 0/1: which steps count in the loss.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def _mask_total(mask: torch.Tensor, dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """``sum(mask)`` (over ``dim`` if given), clamped away from 0 so an empty mask yields a zero loss rather than
    NaN."""
    total = mask.sum() if dim is None else mask.sum(dim=dim)
    if total.is_floating_point():
        return total.clamp_min(torch.finfo(total.dtype).tiny)
    return total.clamp_min(1)


def _check_mask(mask: torch.Tensor, lead: torch.Size, what: str) -> None:
    if mask.dim() != 2 or mask.shape != lead:
        raise ValueError(
            f"Invalid mask shape {tuple(mask.shape)}: expected (T, B) = {tuple(lead)} from {what}"
        )


def masked_mse(y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``0.5 * sum_{t,b,k} mask_tb (y_tbk - y*_tbk)^2 / sum(mask)``; ``y``, ``target`` are ``(T, B, n_out)``."""
    if y.shape != target.shape:
        raise ValueError(
            f"Invalid output shape {tuple(y.shape)}: expected {tuple(target.shape)} (the targets)"
        )
    _check_mask(mask, y.shape[:2], "the output")
    diff = y - target
    return 0.5 * (mask.unsqueeze(-1) * diff * diff).sum() / _mask_total(mask)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{t,b} mask_tb * CE(logits_tb, label_tb) / sum(mask)``.

    ``logits`` is ``(T, B, C)`` (unnormalised; softmax is applied here), ``labels`` ``(T, B)`` int64 in ``[0, C)``.
    Labels at masked-out steps must still be valid class indices (the adapters use 0 there).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"Invalid shapes: logits {tuple(logits.shape)} must be (T, B, C) and labels {tuple(labels.shape)} (T, B)"
        )
    _check_mask(mask, logits.shape[:2], "the logits")
    n_classes = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, n_classes), labels.reshape(-1), reduction="none")
    return (mask.reshape(-1).to(ce.dtype) * ce).sum() / _mask_total(mask).to(ce.dtype)


class Task(abc.ABC):
    """A supervised sequence task. Abstract; concrete tasks are final classes.

    Attributes (set by every concrete task):
        name: task identifier (``"romo"`` or the neurogym id).
        n_in, n_out: input channels and outputs (classes for ``"ce"``).
        loss_kind: ``"mse"`` (float targets, :func:`masked_mse`) or ``"ce"`` (class labels,
            :func:`masked_cross_entropy`).
        dt_ms: the time step, in ms, the batches are generated at.
    """

    name: str
    n_in: int
    n_out: int
    loss_kind: str
    dt_ms: float

    @abc.abstractmethod
    def batch(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Batch:
        """Draw ``batch_size`` trials using only ``generator``: the same generator state gives the same batch."""

    @abc.abstractmethod
    def accuracy(self, y: torch.Tensor, batch: Batch) -> float:
        """Task-specific fraction of correct trials in ``[0, 1]`` for outputs ``y`` of shape ``(T, B, n_out)``."""

    def loss(self, y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Scalar loss of outputs ``y`` ``(T, B, n_out)`` on ``batch`` (see the module docstring)."""
        if self.loss_kind == "mse":
            return masked_mse(y, batch.targets, batch.mask)
        if self.loss_kind == "ce":
            return masked_cross_entropy(y, batch.targets, batch.mask)
        raise ValueError(f"Invalid loss_kind {self.loss_kind!r}: allowed {LOSS_KINDS}")

    def output_error(self, y_t: torch.Tensor, batch: Batch, t: int) -> torch.Tensor:
        """``d loss / d y_t`` ``(B, n_out)`` for the single step ``t``.

        Exactly the slice ``t`` of ``torch.autograd.grad(self.loss(y, batch), y)``:
        ``mask_tb (y_tb - y*_tb) / M`` for ``"mse"`` and ``mask_tb (softmax(y_tb) - onehot(label_tb)) / M`` for
        ``"ce"``, with ``M = sum(batch.mask)`` over the whole batch. An ensemble's stacked batches (fields with a
        member dimension after time: mask (T, K, B)) and outputs ``(K, B, n_out)`` give each member its own error.
        """
        if y_t.dim() != batch.mask.dim() or tuple(y_t.shape[:-1]) != tuple(batch.mask.shape[1:]):
            raise ValueError(
                f"Invalid y_t shape {tuple(y_t.shape)}: expected (B, n_out) with B = {batch.mask.shape[-1]}"
            )
        if batch.mask.dim() == 2:
            total = _mask_total(batch.mask)
        else:  # an ensemble's stacked batches: mask (T, K, B), one total per member
            total = _mask_total(batch.mask, dim=(0, 2))[:, None]
        scale = (batch.mask[t] / total).to(y_t.dtype).unsqueeze(-1)
        if self.loss_kind == "mse":
            return scale * (y_t - batch.targets[t])
        if self.loss_kind == "ce":
            probs = torch.softmax(y_t, dim=-1)
            onehot = F.one_hot(batch.targets[t], num_classes=y_t.shape[-1]).to(y_t.dtype)
            return scale * (probs - onehot)
        raise ValueError(f"Invalid loss_kind {self.loss_kind!r}: allowed {LOSS_KINDS}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n_in={self.n_in}, n_out={self.n_out}, "
            f"loss_kind={self.loss_kind!r}, dt_ms={self.dt_ms})"
        )


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size {batch_size!r}: must be a positive int")
    return batch_size
