"""Romo two-interval discrimination task (Schuessler et al. 2020; science.md section 6.1).

Trial layout, durations in units of the neuron time constant tau (converted to steps below)::

    fixation 3 | f1 1 | gap U[2, 8] (test: 5) | f2 1 | decision delay 5 | decision 10 | unused tail

* One input channel: amplitude ``a1`` during f1, ``a2`` during f2, 0 elsewhere. ``a1, a2 ~ U(0.5, 1.5)``,
  the pair redrawn until ``|a1 - a2| >= 0.2`` (the check is made in float64, before casting to ``dtype``).
* Two outputs: output 0 stands for "f1 was larger", output 1 for "f2 was larger". In the decision window the
  output of the larger stimulus has target 0.5; every other target is 0.
* Mask: 1 from the first step up to the end of f2 (target 0: stay quiet) and in the decision window; 0 in the
  decision delay and in the unused tail after the decision window (trials with a short gap end early).
* Every trial fits one fixed array length, computed with the longest gap: 56 steps at ``dt_tau = 0.5``.

Durations to steps (ours): ``steps(d) = floor(d / dt_tau + 0.5)`` (round to nearest, halves up), so
``dt_tau = 0.5`` gives fixation 6, f1 2, gap 4..16, f2 2, delay 10, decision 20 steps. The per-trial gap of the
"train" variant is drawn uniformly from the integers ``steps(2) .. steps(8)`` inclusive (every representable
gap equally likely; ours, the paper's U[2, 8] on the step grid).

Test variant (ours, deterministic, no random draws): gap ``steps(5)`` and the amplitude pairs of
:attr:`RomoTask.TEST_PAIRS`, the 30 ordered pairs of distinct levels ``0.5, 0.7, 0.9, 1.1, 1.3, 1.5``
(row-major: ``(0.5, 0.7), (0.5, 0.9), ..., (1.5, 1.3)``); trial ``i`` of a batch uses pair ``i mod 30``, so a
batch of 30 (or a multiple) covers the grid evenly, half "f1 larger" and half "f2 larger".
"""

from __future__ import annotations

import math
from typing import Final, final

import numpy as np
import torch

from neuroinit.tasks.base import Batch, Task, _check_batch_size

__all__ = ["RomoTask"]

# Durations in units of tau (science.md 6.1).
FIXATION_TAU: Final = 3.0
STIMULUS_TAU: Final = 1.0
GAP_MIN_TAU: Final = 2.0
GAP_MAX_TAU: Final = 8.0
GAP_TEST_TAU: Final = 5.0
DELAY_TAU: Final = 5.0
DECISION_TAU: Final = 10.0
AMP_LOW: Final = 0.5
AMP_HIGH: Final = 1.5
MIN_AMP_DIFF: Final = 0.2
TARGET_LEVEL: Final = 0.5
VARIANTS: Final = ("train", "test")
_TEST_LEVELS: Final = (0.5, 0.7, 0.9, 1.1, 1.3, 1.5)


def _steps(duration_tau: float, dt_tau: float) -> int:
    """Round ``duration_tau / dt_tau`` to the nearest step, halves up (tolerant to float noise)."""
    return math.floor(duration_tau / dt_tau + 0.5 + 1e-9)


@final
class RomoTask(Task):
    """Romo task; see the module docstring for the trial layout and the documented choices.

    Args:
        dt_tau: time step in units of tau, in ``(0, 1]`` (default 0.5; smaller for LIF nets at finer dt).
        tau_ms: tau in ms (default 100, ours: the paper works in units of tau); only sets ``dt_ms``.
        variant: ``"train"`` (random gap and amplitudes) or ``"test"`` (fixed gap 5, fixed amplitude grid).
    """

    TEST_PAIRS: Final[tuple[tuple[float, float], ...]] = tuple(
        (a, b) for a in _TEST_LEVELS for b in _TEST_LEVELS if a != b
    )

    def __init__(self, dt_tau: float = 0.5, tau_ms: float = 100.0, variant: str = "train") -> None:
        if isinstance(dt_tau, bool) or not isinstance(dt_tau, int | float) or not 0.0 < dt_tau <= 1.0:
            raise ValueError(
                f"Invalid dt_tau {dt_tau!r}: must be a number in (0, 1] (time step in units of tau)"
            )
        if (
            isinstance(tau_ms, bool)
            or not isinstance(tau_ms, int | float)
            or not tau_ms > 0
            or math.isinf(tau_ms)
        ):
            raise ValueError(f"Invalid tau_ms {tau_ms!r}: must be a finite number > 0")
        if variant not in VARIANTS:
            raise ValueError(f"Invalid variant {variant!r}: allowed {VARIANTS}")
        self.name = "romo"
        self.n_in = 1
        self.n_out = 2
        self.loss_kind = "mse"
        self.variant = variant
        self.dt_tau = float(dt_tau)
        self.tau_ms = float(tau_ms)
        self.dt_ms = self.dt_tau * self.tau_ms

        self.fixation_steps = _steps(FIXATION_TAU, self.dt_tau)
        self.stimulus_steps = _steps(STIMULUS_TAU, self.dt_tau)
        self.gap_min_steps = _steps(GAP_MIN_TAU, self.dt_tau)
        self.gap_max_steps = _steps(GAP_MAX_TAU, self.dt_tau)
        self.gap_test_steps = _steps(GAP_TEST_TAU, self.dt_tau)
        self.delay_steps = _steps(DELAY_TAU, self.dt_tau)
        self.decision_steps = _steps(DECISION_TAU, self.dt_tau)
        # One array length for both variants (sized by the longest gap), so every trial fits and train and
        # test batches line up.
        self.n_steps = (
            self.fixation_steps
            + 2 * self.stimulus_steps
            + self.gap_max_steps
            + self.delay_steps
            + self.decision_steps
        )

    def __repr__(self) -> str:
        return f"RomoTask(dt_tau={self.dt_tau}, tau_ms={self.tau_ms}, variant={self.variant!r})"

    def _draw(self, batch_size: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-trial ``(a1, a2, gap_steps)`` as float64 / int64 arrays. The random numbers come from
        ``generator`` (on its device); the bookkeeping runs in NumPy (a few us per op instead of ~10)."""
        gdev = generator.device
        if self.variant == "test":
            pairs = np.asarray(self.TEST_PAIRS, dtype=np.float64)
            idx = np.arange(batch_size) % len(self.TEST_PAIRS)
            return pairs[idx, 0], pairs[idx, 1], np.full(batch_size, self.gap_test_steps, dtype=np.int64)
        gap = torch.randint(
            self.gap_min_steps, self.gap_max_steps + 1, (batch_size,), generator=generator, device=gdev
        ).cpu().numpy()
        span = AMP_HIGH - AMP_LOW

        def uniform(n: int) -> np.ndarray:
            r = torch.rand(n, 2, generator=generator, dtype=torch.float64, device=gdev).cpu().numpy()
            return AMP_LOW + span * r

        amps = uniform(batch_size)
        bad = np.abs(amps[:, 0] - amps[:, 1]) < MIN_AMP_DIFF
        while bad.any():
            amps[bad] = uniform(int(bad.sum()))
            bad = np.abs(amps[:, 0] - amps[:, 1]) < MIN_AMP_DIFF
        return amps[:, 0], amps[:, 1], gap

    def batch(
        self,
        batch_size: int,
        *,
        generator: torch.Generator,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Batch:
        """A batch of ``(n_steps, batch_size)`` trials; the test variant ignores ``generator`` (no draws)."""
        _check_batch_size(batch_size)
        a1, a2, gap = self._draw(batch_size, generator)
        a2_larger = a2 > a1  # decided on float64 before any cast
        t = np.arange(self.n_steps)[:, None]  # (T, 1)
        f1_start = self.fixation_steps
        f1_end = f1_start + self.stimulus_steps
        f2_start = f1_end + gap  # (B,)
        f2_end = f2_start + self.stimulus_steps
        dec_start = f2_end + self.delay_steps
        dec_end = dec_start + self.decision_steps

        in_f1 = (t >= f1_start) & (t < f1_end)  # (T, 1)
        in_f2 = (t >= f2_start) & (t < f2_end)  # (T, B)
        in_dec = (t >= dec_start) & (t < dec_end)  # (T, B)

        def out(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(dtype=dtype, device=device)

        # the two stimuli never overlap: each input step is exactly one amplitude (rounded once to dtype) or 0
        inputs = out(np.where(in_f1, a1, np.where(in_f2, a2, 0.0))[..., None])
        # (B, 2) one-hot of the larger stimulus: output 0 = "f1 larger", output 1 = "f2 larger"
        chosen = np.stack([~a2_larger, a2_larger], axis=-1)
        targets = out(TARGET_LEVEL * (in_dec[..., None] & chosen).astype(np.float64))
        mask = out(((t < f2_end) | in_dec).astype(np.float64))
        return Batch(inputs=inputs, targets=targets, mask=mask)

    def accuracy(self, y: torch.Tensor, batch: Batch) -> float:
        """Fraction of trials whose output for the larger stimulus, averaged over the decision window, is strictly
        larger than the other output's average. The decision window and the correct output are read from the
        batch's targets (the steps and output where the target is nonzero)."""
        if y.dim() != 3 or y.shape != batch.targets.shape:
            raise ValueError(f"Invalid output shape {tuple(y.shape)}: expected {tuple(batch.targets.shape)}")
        in_dec = (batch.targets != 0).any(dim=-1)  # (T, B)
        correct_out = (batch.targets != 0).any(dim=0).to(torch.int64).argmax(dim=-1)  # (B,)
        n_dec = in_dec.sum(dim=0).clamp_min(1).to(y.dtype)
        y_mean = (y * in_dec.unsqueeze(-1).to(y.dtype)).sum(dim=0) / n_dec.unsqueeze(-1)  # (B, 2)
        right = y_mean.gather(1, correct_out.unsqueeze(1)).squeeze(1)
        wrong = y_mean.gather(1, (1 - correct_out).unsqueeze(1)).squeeze(1)
        return float((right > wrong).to(torch.float64).mean())
