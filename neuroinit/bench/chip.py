"""The roofline of the chip-precision path: integer trace codes moved and random bits drawn per step.

At chip precision the fused step (:mod:`neuroinit.learning.fused`) rounds every eligibility trace at every step,
so no chunked GEMM applies: each step reads and writes every trace code once (``c`` bytes: 1 for int8, 2 for
int16) over ``E = B N (N + I + 1)`` elements, reads and writes the gradient once (``8 N (N + I + 1)``: its rows
stay in cache across the batch) and draws ``k = 8 c`` random bits per element (``E k / 32`` words of the
counter-based generator). The lower bound on a step is ``max(bytes / bandwidth, words / word rate)``, with the
bandwidth of the level the working set (codes + weights + gradient) lives in (the calibration's) and the word
rate of the generator measured on this machine (:func:`random_word_rate`, once per process).

For comparison the result also holds ``in_cache_bound_us``: the same elements at the rate the kernel itself
reaches on one row resident in L1 (:func:`in_cache_rate`): the ceiling of its per-element arithmetic (load,
update, round, store, gradient), which is what bounds it on CPUs where codes and random bits are cheap.
"""

from __future__ import annotations

import functools
import time

__all__ = ["chip_roofline", "random_word_rate"]


@functools.lru_cache(maxsize=1)
def random_word_rate() -> float | None:
    """32-bit random words per second of the fused kernel's counter-based generator on one core (best of 5 runs
    of 2^22 words); None without the native library."""
    from neuroinit.learning import fused

    lib = fused.LIBRARY.load()
    if lib is None:
        return None
    n = 1 << 22
    lib.ni_random_words(n, 1)
    best = float("inf")
    for rep in range(5):
        t0 = time.perf_counter()
        lib.ni_random_words(n, rep + 2)
        best = min(best, time.perf_counter() - t0)
    return n / best


@functools.lru_cache(maxsize=2)
def in_cache_rate(code_bytes: int) -> float | None:
    """Trace elements per second the chip kernel updates (stochastic rounding, gradient included) on one row of
    1024 codes kept in L1 (best of 5 runs); None without the native library."""
    from neuroinit.learning import fused

    lib = fused.LIBRARY.load()
    if lib is None:
        return None
    n, reps = 1024, 2000
    lib.ni_chip_probe(reps // 10, n, code_bytes)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        lib.ni_chip_probe(reps, n, code_bytes)
        best = min(best, time.perf_counter() - t0)
    return n * reps / best


def chip_roofline(n: int, b: int, n_in: int, code_bytes: int, calib: dict, *, word_rate: float | None = None
                  ) -> dict | None:
    """Lower bound (module docstring) on one chip-precision step with full traces stored in ``code_bytes``-byte
    codes; ``calib`` from :func:`neuroinit.bench.machine.calibrate` (``bandwidth_gbs`` per level, ``caches``).
    None where the word rate is unknown (no native library)."""
    from neuroinit.bench.machine import memory_level

    rate = word_rate if word_rate is not None else random_word_rate()
    if rate is None or code_bytes not in (1, 2):
        return None
    syn = n * (n + n_in + 1)
    elements = b * syn
    bytes_ = 2 * code_bytes * elements + 8 * syn
    words = elements * 8 * code_bytes / 32
    working_set = code_bytes * elements + 2 * 4 * syn
    level = memory_level(working_set, calib.get("caches") or {})
    t_mem = bytes_ / (calib["bandwidth_gbs"][level] * 1e9)
    t_rng = words / rate
    return {"code_bytes": code_bytes, "bytes_per_step": bytes_, "random_words_per_step": words,
            "working_set_bytes": working_set, "memory_level": level, "random_words_per_s": rate,
            "memory_bound_us": t_mem * 1e6, "random_bound_us": t_rng * 1e6, "bound_us": max(t_mem, t_rng) * 1e6,
            "bound_by": "memory" if t_mem >= t_rng else "random",
            "in_cache_bound_us": None if (r := in_cache_rate(code_bytes)) is None else elements / r * 1e6}


def chip_code_bytes(variant: str, n: int, profile: str) -> int | None:
    """Bytes per trace code the fused step stores for the bench network ``variant`` under ``profile`` (1 or 2),
    or None where it keeps no chip-precision full traces (float traces, or the factorised voltage form)."""
    import torch

    from neuroinit.bench.peers import make_bench_cell
    from neuroinit.learning import fused
    from neuroinit.learning.chip import make_trace_quantiser

    cell = make_bench_cell(variant, n, profile, seed=0)
    q = make_trace_quantiser(cell, generator=torch.Generator().manual_seed(0))
    if q is None or cell.trace_spec().elig_decay == 0.0:
        return None
    return fused.code_dtype(q).itemsize
