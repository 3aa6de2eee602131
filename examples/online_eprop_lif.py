"""Train a recurrent LIF network online with e-prop, in float and on a ReckOn-like chip's 8-bit grid.

The public API in five steps: build a cell from a profile, attach a rule and an optimizer (with the chip's
constraints on the optimizer step), and step through sequences online. The task is e-prop's pattern
generation (Bellec et al. 2020, Fig. 2): frozen random input spikes, a sum of sines as the target output.

    python examples/online_eprop_lif.py [--iters 100] [--hidden 100]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from neuroinit.cells import LIFRNN
from neuroinit.init import hardware_init
from neuroinit.learning import attach_chip_constraints, make_rule
from neuroinit.tasks.base import Batch, Task


class PatternTask(Task):
    """Frozen Poisson input spikes (``n_in`` channels, 10 Hz-ish) -> a fixed sum of three sines."""

    name, loss_kind, n_out = "pattern", "mse", 1

    def __init__(self, n_in: int = 20, steps: int = 200, dt_ms: float = 1.0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n_in, self.dt_ms, self.steps = n_in, dt_ms, steps
        self.spikes = (torch.rand(steps, 1, n_in, generator=g) < 0.05).float()
        t = torch.arange(steps, dtype=torch.float64) * dt_ms / 1000.0
        target = sum(0.3 * torch.sin(2 * math.pi * f * t + ph)
                     for f, ph in ((2.0, 0.3), (3.0, 1.1), (5.0, 2.0)))
        self.target = target.float().reshape(steps, 1, 1)

    def batch(self, batch_size, *, generator, dtype=torch.float32, device="cpu") -> Batch:
        t = self.steps
        return Batch(self.spikes.expand(t, batch_size, self.n_in).to(dtype=dtype, device=device),
                     self.target.expand(t, batch_size, 1).to(dtype=dtype, device=device),
                     torch.ones(t, batch_size, dtype=dtype, device=device))

    def accuracy(self, y, batch) -> float:
        return float("nan")


def train(profile: str, *, iters: int, hidden: int, lr: float, seed: int = 0) -> list[float]:
    task = PatternTask()
    gen = torch.Generator().manual_seed(seed)
    # 1. a cell whose weights are initialised on the profile's grid (gain 1, one shared scale)
    params, report = hardware_init("lif", task.n_in, hidden, task.n_out, 1.0, profile, generator=gen)
    cell = LIFRNN(params, dt=1.0, tau_m=20.0, tau_out=20.0, profile=profile)
    # 2. a local rule that writes .grad (traces at the chip's precision when the profile learns on chip),
    #    stepped by the fused native kernel (chip traces: the same rounding distribution, other random draws)
    rule = make_rule("eprop", cell, generator=gen, fast=True)
    # 3. any torch optimizer; the chip's weight grid (stochastic rounding, saturation) hooks onto its step
    opt = torch.optim.Adam(cell.parameters(), lr=lr)
    attach_chip_constraints(opt, cell, generator=gen)
    losses = []
    for _ in range(iters):
        batch = task.batch(1, generator=gen)
        # 4. one online pass: traces updated step by step, weights updated every 20 steps (a learning epoch)
        trial = rule.backward(batch, task, optimizer=opt, apply_every=20)
        losses.append(float(trial.loss))
    print(f"{profile:>12}: realised gain {report.realised_gain_std:.3f}, loss {losses[0]:.4f} -> "
          f"{sum(losses[-10:]) / 10:.4f} (mean of the last 10)")
    return losses


def per_step_time(hidden: int = 256, batch: int = 16, steps: int = 100) -> None:
    """Microseconds per step of online e-prop vs autograd e-prop (forward + backward) on this machine."""
    task = PatternTask(steps=steps)
    gen = torch.Generator().manual_seed(0)
    params, _ = hardware_init("lif", task.n_in, hidden, 1, 1.0, "ideal", generator=gen)
    for name in ("eprop", "eprop-autograd"):
        cell = LIFRNN(params, dt=1.0, tau_m=20.0, tau_out=20.0)
        rule = make_rule(name, cell, generator=gen)
        b = task.batch(batch, generator=gen)
        rule.backward(b, task)  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            rule.backward(b, task)
            times.append((time.perf_counter() - t0) / steps * 1e6)
        print(f"{name:>15}: {sorted(times)[2]:.0f} us/step (N={hidden}, B={batch}, T={steps}, median of 5)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny per-step ops: more threads only add OpenMP synchronisation
    for profile in ("ideal", "reckon-like"):
        train(profile, iters=args.iters, hidden=args.hidden, lr=args.lr)
    if not args.no_timing:
        per_step_time()


if __name__ == "__main__":
    main()
