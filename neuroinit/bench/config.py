"""What the bench runs: methods, model variants, sizes and the BenchConfig with its --quick preset."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuroinit.profiles import load_profile

SCHEMA_VERSION = 3  # 2: chunk_steps, own_roofline_fraction, roofline.chunked; 3: threads per row, calibrations
# per thread count, background_load_window
METHODS = ("neuroinit-fused", "neuroinit-torch", "autograd-eprop", "neuroinit-bptt", "bptt", "snntorch-bptt",
           "norse-bptt")
# model variants: rate voltage form (factorised e-prop), rate form (RFLO, N x N traces), LIF (e-prop), adaptive LIF
# (e-prop with two eligibility components; no fused kernel: PyTorch path; norse's LSNNRecurrent as peer)
MODEL_VARIANTS = {"rate-voltage": ("rate", "voltage"), "rate-rflo": ("rate", "rate"), "lif": ("lif", None),
                  "alif": ("alif", None)}
N_IN, N_OUT = 8, 2


# ------------------------------------------------------------------------------------------ configuration
@dataclass
class BenchConfig:
    """What to run. ``models``: 'rate' (voltage and RFLO forms), 'lif' or 'both'."""

    profile: str = "ideal"
    models: str = "both"
    hidden: tuple[int, ...] = (128, 256, 512, 1024)
    batch: tuple[int, ...] = (1, 16, 64)
    steps: int = 100
    device: str = "cpu"
    repeats: int = 5
    quick: bool = False
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    memory_scaling: bool = True       # peak memory of online vs BPTT at T and 10 T (one configuration)
    recalibrate: bool = False
    max_seconds_per_method: float = 30.0  # fewer repeats for a method whose first trial is slower than this / 3
    # "best": every method timed at one thread and at all available CPUs (repeats interleaved), the faster
    # reported with its count; a tuple of counts: every method at each count, one row per count
    threads: str | tuple[int, ...] = "best"

    def validate(self) -> None:
        if self.models not in ("rate", "lif", "alif", "both"):
            raise ValueError(f"Invalid model {self.models!r}: allowed rate, lif, alif, both")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"Invalid device {self.device!r}: allowed cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("Invalid device 'cuda': no CUDA device is available here; allowed: cpu")
        for name, vals in (("hidden", self.hidden), ("batch", self.batch)):
            if not vals or any(not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"Invalid {name} {vals!r}: allowed a comma-separated list of integers >= 1")
        if not (isinstance(self.steps, int) and self.steps >= 2):
            raise ValueError(f"Invalid steps {self.steps!r}: allowed integers >= 2")
        if not (isinstance(self.repeats, int) and self.repeats >= 1):
            raise ValueError(f"Invalid repeats {self.repeats!r}: allowed integers >= 1")
        if self.threads != "best" and (not isinstance(self.threads, tuple) or not self.threads or any(
                not isinstance(t, int) or t < 1 for t in self.threads)):
            raise ValueError(f"Invalid threads {self.threads!r}: allowed 'best' or a comma-separated list of "
                             "integers >= 1")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"Invalid method {bad[0]!r}: allowed {', '.join(METHODS)}")
        load_profile(self.profile)

    def thread_counts(self, cpus: int) -> tuple[int, ...]:
        """The thread counts every method is timed at on a machine with ``cpus`` available CPUs."""
        if self.threads == "best":
            return tuple(sorted({1, cpus}))
        return tuple(dict.fromkeys(self.threads))

    def variants(self) -> list[str]:
        return {"rate": ["rate-voltage", "rate-rflo"], "lif": ["lif"], "alif": ["alif"],
                "both": ["rate-voltage", "rate-rflo", "lif"]}[self.models]


def quick_config(profile: str = "ideal", **overrides) -> BenchConfig:
    """The ``--quick`` configuration: N = 64, B = 1 and 16, T = 40, 3 repeats (well under 2 minutes)."""
    cfg = dict(profile=profile, hidden=(64,), batch=(1, 16), steps=40, repeats=3, quick=True,
               max_seconds_per_method=5.0)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**cfg)
