"""The ctypes binding of ``fused_step.c`` (with ``products.c`` and ``chip_traces.c``, sharing ``fused_run.h``):
the mirror of its ``Run`` struct, its codes and its functions.

Kept next to the C source: a field added to ``Run`` is added to :class:`RunStruct` in the same order (the
library checks the struct's size at load, ``ni_abi``). The backend that drives it is
:mod:`neuroinit.learning.fused`.
"""

from __future__ import annotations

import ctypes

from neuroinit.learning.native.loader import NativeLibrary

__all__ = ["ACTS", "LOSSES", "MODELS", "QUANT_NAMES", "SYMBOLS", "RunStruct", "new_library"]

MODELS = {"voltage": 0, "rate": 1, "lif": 2}
ACTS = {"tanh": 0, "linear": 1, "relu": 2, "softplus": 3}
LOSSES = {"mse": 1, "ce": 2}
QUANT_NAMES = ("pre_rec", "pre_in", "pre_bias", "elig_rec", "elig_in", "elig_bias", "readout", "readout_bias")
_PTRS = ("w_in", "w_rec", "bias", "w_out", "b_out", "fb", "wt_in", "wt_rec", "wp_in", "wp_rec",
         "x", "z", "ref", "y", "post", "act", "L", "err", "yout", "drive",
         "pre_rec", "pre_in", "pre_bias", "elig_rec", "elig_in", "elig_bias", "ro", "ro_bias",
         "g_in", "g_rec", "g_bias", "g_out", "g_bout", "inputs", "targets", "scale", "outputs", "labels",
         "events", "rec_L", "rec_post", "rec_pre", "rec_pre_in", "pre_src")


class RunStruct(ctypes.Structure):
    """``Run`` of fused_run.h: sizes and options, constants, chip grids, buffer pointers."""

    _fields_ = ([(n, ctypes.c_int64) for n in ("model", "actfn", "B", "N", "I", "O", "reset_zero", "n_ref",
                                               "full", "quant", "par_work", "loss", "T", "rec_pos",
                                               "code_bytes", "q_nearest", "portable", "bs", "b0")]
                + [("seed", ctypes.c_uint64)]
                + [(n, ctypes.c_float) for n in ("alpha", "kappa", "v_th", "gamma", "pd", "pg", "ed", "rd")]
                + [(n, ctypes.c_float * 8) for n in ("q_scale", "q_min", "q_max")]
                + [(n, ctypes.c_void_p) for n in _PTRS])


_P = ctypes.c_void_p
_I = ctypes.c_int64
SYMBOLS = {
    "ni_forward": (None, [_P, _P]), "ni_update": (None, [_P]), "ni_run": (_I, [_P, _I, _I]),
    "ni_chunk_prepare": (_I, [_P, _P]), "ni_chunk_carry": (None, [_P, _P]),
    "ni_pack": (None, [_P, _I, _I, _P, _P]), "ni_abi": (ctypes.c_int, []), "ni_stream": (None, [_P, _I, _I]),
    "ni_random_words": (ctypes.c_uint32, [_I, ctypes.c_uint32]), "ni_chip_probe": (ctypes.c_float, [_I, _I, _I]),
    "ni_gemm_tn": (None, [_P, _P, _I, _I, _I, _P, _I]), "ni_wide": (ctypes.c_int, []),
}


def _check_abi(lib: ctypes.CDLL) -> None:
    if lib.ni_abi() != ctypes.sizeof(RunStruct):
        raise OSError(f"fused step ABI mismatch: C struct {lib.ni_abi()} bytes, ctypes {ctypes.sizeof(RunStruct)}")


def new_library() -> NativeLibrary:
    """A fresh, not yet loaded handle on the fused step's library."""
    return NativeLibrary("fused_step.c", SYMBOLS, check=_check_abi, extra_sources=("products.c", "chip_traces.c"),
                         headers=("fused_run.h", "vecmath.h"))
