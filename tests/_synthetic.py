"""Synthetic trials shared by the kernel tests (test_fused, test_fused_bptt): a task that only defines a loss, and a
random masked batch for it."""

from __future__ import annotations

import torch

from neuroinit.tasks.base import Batch, Task


class LossOnlyTask(Task):
    """A task with ``n_in`` inputs, ``n_out`` outputs and the loss ``kind`` ("mse" or "ce"), no trial generator."""

    def __init__(self, n_in: int, n_out: int, kind: str) -> None:
        self.name, self.n_in, self.n_out, self.loss_kind, self.dt_ms = "t", n_in, n_out, kind, 1.0

    def batch(self, batch_size, *, generator, dtype=torch.float32, device="cpu"):
        raise NotImplementedError

    def accuracy(self, y, batch):
        return 0.0


def random_trials(t_len: int, b: int, kind: str, generator: torch.Generator, *, dtype=torch.float32,
                  drive: float = 1.0, n_in: int = 3, n_out: int = 2) -> tuple[Batch, LossOnlyTask]:
    """Gaussian inputs times ``drive``, targets for ``kind`` and a random 0/1 mask (about 70% ones)."""
    x = torch.randn(t_len, b, n_in, generator=generator, dtype=dtype) * drive
    if kind == "mse":
        targets = torch.randn(t_len, b, n_out, generator=generator, dtype=dtype)
    else:
        targets = torch.randint(0, n_out, (t_len, b), generator=generator)
    mask = (torch.rand(t_len, b, generator=generator) > 0.3).to(dtype)
    return Batch(x, targets, mask), LossOnlyTask(n_in, n_out, kind)
