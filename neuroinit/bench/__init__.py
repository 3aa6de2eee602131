"""Throughput of online learning (e-prop, RFLO) next to autograd e-prop, BPTT, snntorch and norse.

For every configuration (model x hidden size N x batch B, T steps) each method runs whole trials of the same
network, input and loss; the time per trial over T is the time per step. The methods of a configuration are timed
together, their repeats interleaved, each at one thread and at all CPUs (``threads="best"``: the count with the
lower median is reported) or at given counts. Reported per method: the thread count, median and spread
(quartiles, min, max) of the time per step over ``repeats`` trials, sample-steps/s (B / step time), synaptic
updates/s (B N (N + I + O) / step time: every weight's gradient advances once per sample-step), peak memory of
the first trial, the background CPU load during the repeats, and, for neuroinit's online rules, the fraction of
the machine's roofline reached.

Methods (``METHODS``):
    neuroinit-fused  online e-prop / RFLO, one native call per trial (:mod:`neuroinit.learning.fused`), under the
                     chosen profile (chip-precision traces where it learns on chip) and under ``ideal``; ALIF
                     (no kernel): the recorded PyTorch path, ``ideal``, in a row named ``neuroinit-recorded``
    neuroinit-torch  the same rule through the plain PyTorch step (the fallback), ``ideal``
    autograd-eprop   the paper's method (detach where the state enters W_rec), autograd
    neuroinit-bptt   backpropagation through time, fused (:mod:`neuroinit.learning.fused_bptt`: records, the backward
                     recursion, weight gradients as GEMMs over all steps; what ``train`` runs for BPTT)
    bptt             backpropagation through time, autograd
    snntorch-bptt    snntorch ``RLeaky`` (all-to-all recurrent, reset by subtraction) + leaky readout, BPTT
    norse-bptt       norse ``LIFRecurrent`` (its recurrent LIF cell, reset to zero) + leaky readout, BPTT
Peers run the same sizes, input and T; ``ratio`` is a method's time over neuroinit-fused (ideal) of the same
configuration. Before timing, :func:`check_gradients` verifies on a small case that every method timed computes
the gradient it should (so the bench never times a wrong kernel).

Roofline (``roofline``): per step, an online rule with stored eligibility traces (RFLO, LIF) reads and writes
every trace once, ``8 B N (N + I)`` bytes; a factorised one (voltage form) reads and writes the gradient,
``8 N (N + I)``. FLOPs: the network step ``2 B N (N + I + O)``, trace update ``3 B N (N + I)`` (stored traces),
gradient ``2 B N (N + I)``. The lower bound is ``max(bytes / bandwidth, flops / matmul rate)`` with the
bandwidth of the memory level the bytes live in (L2, L3 or DRAM, by working set), all measured at start-up
(:func:`calibrate`, per thread count, cached per machine where it passes :func:`calibration_problems`).
"""

# ruff: noqa: F401  (re-exports: callers and tests reach every name as neuroinit.bench.<name>)
from neuroinit.bench.config import (
    METHODS,
    MODEL_VARIANTS,
    N_IN,
    N_OUT,
    SCHEMA_VERSION,
    BenchConfig,
    quick_config,
)
from neuroinit.bench.machine import (
    CALIB_ATTEMPTS,
    CALIB_TOLERANCE,
    CPUINFO,
    MATMUL_GFLOPS_RANGE,
    SYS_CACHE,
    available_cpus,
    calibrate,
    calibration_problems,
    environment,
    roofline,
    using_threads,
    working_sets,
)
from neuroinit.bench.peers import (
    NorseNet,
    SnnTorchNet,
    SyntheticTask,
    check_gradients,
    make_batch,
    make_bench_cell,
    method_applies,
    reference_lif_grads,
    trial_fn,
)
from neuroinit.bench.report import (
    TABLE_HEADER,
    format_table,
    table_row,
)
from neuroinit.bench.timing import (
    Result,
    memory_scaling,
    planned_rows,
    run_bench,
    time_configuration,
    time_method,
    trial_memory,
)
from neuroinit.learning.autograd import BPTT

__all__ = [
           "METHODS",
           "MODEL_VARIANTS",
           "SCHEMA_VERSION",
           "BenchConfig",
           "SyntheticTask",
           "calibrate",
           "calibration_problems",
           "check_gradients",
           "environment",
           "format_table",
           "roofline",
           "run_bench",
]

