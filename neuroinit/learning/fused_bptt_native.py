"""The native loops of the fused BPTT (``native/bptt.c``): the forward with records and the backward recursion,
one call each, through :mod:`ctypes`; :mod:`neuroinit.learning.fused_bptt` calls them where they are faster than
its PyTorch loops.

The library is built and loaded by :class:`~neuroinit.learning.native.loader.NativeLibrary` (compiled at first
use with the machine's C compiler, cached per source, compiler, flags and CPU). Where it cannot be built,
:func:`unavailable_reason` says why (the compiler's first error line) and the PyTorch loops run.
``NEUROINIT_NO_FUSED`` disables it, as it does the fused online step.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path

import torch

from neuroinit.learning.native import loader
from neuroinit.learning.native.fused_step import ACTS, MODELS  # the codes bptt.c shares with fused_run.h
from neuroinit.learning.native.loader import NativeLibrary

__all__ = ["available", "backward", "dense_products", "fast_dense", "forward", "grad_events", "new_library",
           "unavailable_reason"]

# the loader's flags with OpenMP's SIMD pragmas only: the loops are serial, no OpenMP runtime is linked
FLAGS = ["-fopenmp-simd" if f == "-fopenmp" else f for f in loader.FLAGS]
_PTRS = ("wp_fwd", "wt_fwd", "wp_bwd", "wt_bwd", "drive_in", "states", "deriv", "extra", "direct", "err",
         "scratch", "events")


class _Run(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in ("model", "actfn", "T", "B", "N", "reset_zero", "n_ref")]
                + [(n, ctypes.c_float) for n in ("alpha", "v_th", "gamma")]
                + [(n, ctypes.c_void_p) for n in (*_PTRS, "sgemm")])


_P, _I = ctypes.c_void_p, ctypes.c_int64
SYMBOLS = {"nb_forward": (None, [_P]), "nb_backward": (None, [_P]), "nb_pack": (None, [_P, _I, ctypes.c_int, _P]),
           "nb_grad_events": (None, [_P, _P, _I, _I, _I, _P]), "nb_abi": (ctypes.c_int, []),
           "nb_wide": (ctypes.c_int, [])}


def _check_abi(lib: ctypes.CDLL) -> None:
    if lib.nb_abi() != ctypes.sizeof(_Run):
        raise OSError(f"fused BPTT ABI mismatch: C struct {lib.nb_abi()} bytes, ctypes {ctypes.sizeof(_Run)}")


def new_library() -> NativeLibrary:
    """A fresh, not yet loaded handle on the library."""
    return NativeLibrary("bptt.c", SYMBOLS, check=_check_abi, flags=FLAGS, headers=("vecmath.h",))


LIBRARY = new_library()  # tests swap it for a fresh one (``new_library()``)


def _load() -> ctypes.CDLL | None:
    return LIBRARY.load()


@functools.cache
def _sgemm() -> int | None:
    """The address of the BLAS ``sgemm_`` torch itself uses (MKL's, exported by ``libtorch_cpu``; 32-bit integer
    interface), or None: the native loops then use their own kernel for dense products too."""
    if not torch.backends.mkl.is_available() or platform.machine() not in ("x86_64", "AMD64"):
        return None
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def dense_products(n: int) -> str | None:
    """How the native loops take their dense products for ``n`` neurons (``n x n`` weights times a batch of rows,
    every step):

    - ``"avx512"``: the library's AVX-512 kernel (``rows32`` in ``vecmath.h``; ``n`` a multiple of 32) where
      torch's BLAS would not run AVX-512 code (:func:`~neuroinit.learning.native.loader.blas_runs_avx512`: AMD's
      Zen 4 and 5); measured on a Zen 5 EPYC, Romo N = 256, B = 32, one thread: a BPTT iteration 11.2 ms with
      MKL's products, 8.1 ms with these (``benchmarks/experiment_speed.md``);
    - ``"blas"``: torch's own BLAS (``sgemm_``, MKL), on Intel CPUs (MKL's AVX-512 code) and elsewhere;
    - ``"portable"``: the event-driven 8-lane kernel, about half MKL's rate (slower than the PyTorch loops);
    - None: no native library.

    The rule depends on the CPU and ``n`` only, never on a timing: a machine always takes the same path, and
    rounds the same way."""
    lib = _load()
    if lib is None:
        return None
    if lib.nb_wide() and n % 32 == 0 and not loader.blas_runs_avx512():
        return "avx512"
    return "blas" if _sgemm() is not None else "portable"


def fast_dense(n: int) -> bool:
    """Whether the native loops' dense products for ``n`` neurons are at least as fast as the PyTorch loops'
    (MKL or the AVX-512 kernel: :func:`dense_products`)."""
    return dense_products(n) in ("blas", "avx512")


def available() -> bool:
    """True when the native loops are (or can be) built and loaded here."""
    return LIBRARY.available()


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return LIBRARY.unavailable_reason()


def _run(cell, w_rec: torch.Tensor, loop: str, bufs: dict[str, torch.Tensor | None]) -> tuple[_Run, list]:
    """The struct for ``cell`` over ``bufs`` (contiguous float32; ``events`` int64), and what it points at;
    ``loop``: "fwd" or "bwd", the one weight layout packed (the other loop's pointers stay NULL)."""
    from neuroinit.cells.lif import LIFRNN

    lib = _load()
    r = _Run()
    t_len, b, n = bufs["deriv"].shape
    r.T, r.B, r.N = t_len, b, n
    if isinstance(cell, LIFRNN):
        r.model, r.reset_zero, r.n_ref = MODELS["lif"], int(cell.reset == "zero"), cell.n_refractory
        r.alpha, r.v_th, r.gamma = float(cell.alpha), float(cell.v_th), float(cell.gamma)
    else:
        r.model, r.actfn, r.alpha = MODELS[cell.form], ACTS[cell.activation_name], float(cell.alpha)
    r.sgemm = _sgemm() if dense_products(n) == "blas" else None  # NULL: bptt.c's own kernels
    keep = [w_rec]
    transpose = loop == "fwd"
    wp = torch.empty(max(n // 16, 1), n, 16)
    lib.nb_pack(w_rec.data_ptr(), n, int(transpose), wp.data_ptr())
    wt = w_rec.T.contiguous() if transpose else w_rec
    keep += [wp, wt]
    setattr(r, "wp_" + loop, wp.data_ptr())
    setattr(r, "wt_" + loop, wt.data_ptr())
    for name, t in bufs.items():
        if t is not None:
            assert t.is_contiguous(), name
            setattr(r, name, t.data_ptr())
            keep.append(t)
    return r, keep


def forward(cell, w_rec: torch.Tensor, drive_in, states, deriv, extra) -> None:
    """The forward loop: ``states`` (T + 1, B, N), ``deriv`` (and ``extra``) (T, B, N) from ``drive_in``."""
    b, n = deriv.shape[1:]
    bufs = {"drive_in": drive_in, "states": states, "deriv": deriv, "extra": extra,
            "scratch": deriv.new_empty(3, b, n), "events": torch.empty(b, n + 1, dtype=torch.int64)}
    r, _keep = _run(cell, w_rec.contiguous(), "fwd", bufs)
    _load().nb_forward(ctypes.byref(r))


def backward(cell, w_rec: torch.Tensor, states, deriv, extra, direct, err) -> None:
    """The backward recursion: ``err`` (T, B, N) from the records and ``direct`` (overwritten)."""
    b, n = deriv.shape[1:]
    bufs = {"states": states, "deriv": deriv, "extra": extra, "direct": direct, "err": err,
            "scratch": deriv.new_empty(3, b, n), "events": torch.empty(b, n + 1, dtype=torch.int64)}
    r, _keep = _run(cell, w_rec.contiguous(), "bwd", bufs)
    _load().nb_backward(ctypes.byref(r))


def grad_events(err: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``err^T pre`` (N, K) for (R, N) errors and sparse (R, K) presynaptic rows (spikes), at the cost of the
    non-zero entries of ``pre``."""
    rows, n = err.shape
    k = pre.shape[1]
    g_t = err.new_zeros(k, n)
    err, pre = err.contiguous(), pre.contiguous()
    _load().nb_grad_events(err.data_ptr(), pre.data_ptr(), rows, n, k, g_t.data_ptr())
    return g_t.T.contiguous()
