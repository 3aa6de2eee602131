"""Building and loading a C source file of this package as a shared library, at first use.

A :class:`NativeLibrary` names a ``.c`` file next to this module and the functions to bind (their ctypes
result and argument types). The first :meth:`~NativeLibrary.load` compiles it with the machine's C compiler
(``$CC``, else cc, gcc or clang; ``-O3 -march=native -fopenmp``, ~1-3 s) into a cache keyed by the source text,
the compiler, the flags and the CPU (``$NEUROINIT_CACHE`` or ``~/.cache/neuroinit``, subfolder ``native``),
then binds it with :mod:`ctypes`. torch (imported first) has loaded its OpenMP runtime; the library binds to the
same one, so the two thread pools do not fight.

A compiler without OpenMP (e.g. Apple's clang, or gcc without libgomp) builds the same source with
``-fopenmp-simd`` instead: the library's loops then run on one thread. Where the library cannot be built (no
compiler, a broken ``$CC``, a compile error, an unsupported platform, or ``NEUROINIT_NO_FUSED`` set), :meth:`~NativeLibrary.load` returns None and :meth:`~NativeLibrary.
unavailable_reason` says why in one line (the compiler's first diagnostic); :attr:`~NativeLibrary.diagnostics`
holds the compiler's full output. Callers then take their PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from neuroinit._util import cache_dir as package_cache_dir
from neuroinit._util import cpu_fields, cpu_id

__all__ = ["FLAGS", "NativeLibrary", "blas_runs_avx512", "cache_dir", "compiler"]

FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=gnu99"]
DISABLE_ENV = "NEUROINIT_NO_FUSED"
SERIAL_OPENMP = "-fopenmp-simd"  # what replaces -fopenmp where the compiler has no OpenMP runtime


def cache_dir() -> Path:
    """Where compiled libraries are cached."""
    return package_cache_dir("native")


@functools.cache
def blas_runs_avx512() -> bool:
    """Whether torch's BLAS runs AVX-512 code for float32 GEMMs here: torch's x86 BLAS is MKL, which dispatches
    its AVX-512 kernels on Intel CPUs only (on AMD's Zen 4 and 5, which have AVX-512, it runs its AVX2 code:
    ``perf`` shows ``mkl_blas_def_sgemm_kernel_0_zen``, ~105 GFLOP/s per Zen 5 core against ~240 for the
    libraries' own AVX-512 kernels). Where it does not, the libraries built with AVX-512 take their dense
    products and weight-gradient GEMMs themselves. Depends on the CPU only (never on a timing), so a machine
    always takes the same path and rounds the same way. A CPU whose vendor cannot be read (no ``/proc/cpuinfo``)
    counts as one MKL serves well: the libraries' own GEMMs only where the CPU is known not to be Intel's."""
    import torch

    vendor = (cpu_fields() or {}).get("vendor_id")
    return torch.backends.mkl.is_available() and vendor in ("GenuineIntel", None)


def compiler() -> list[str]:
    """The C compiler command: ``$CC`` when set (split like a shell word list, so ``CC="ccache gcc"`` works),
    else the first of cc, gcc, clang on PATH. A ``$CC`` that is not an executable is an error, never a silent
    fall back to another compiler. Raises OSError with the reason."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        words = shlex.split(cc)
        exe = shutil.which(words[0])
        if exe is None:
            raise OSError(f"CC={cc!r} is not an executable on PATH (unset CC to use cc, gcc or clang)")
        return [exe, *words[1:]]
    for name in ("cc", "gcc", "clang"):
        exe = shutil.which(name)
        if exe:
            return [exe]
    raise OSError("no C compiler (cc, gcc or clang) on PATH; install one or set CC")


# a function's ctypes signature: (result type, argument types)
Signature = tuple[object, Sequence[object]]


class NativeLibrary:
    """A C source file (``source``: a file name in this package, e.g. ``"fused_step.c"``, or a path), compiled
    and loaded at first use, with ``extra_sources`` (more ``.c`` files of the same library) and the ``headers``
    they include (``#include "name.h"``, found next to ``source``; part of the cache key). ``symbols`` maps each
    function to bind to its ``(restype, argtypes)``; ``check(lib)`` may raise OSError after binding (e.g. an ABI
    mismatch between a C struct and its ctypes mirror); ``flags``: the compiler flags (default :data:`FLAGS`)."""

    def __init__(self, source: str | Path, symbols: Mapping[str, Signature], *,
                 check: Callable[[ctypes.CDLL], None] | None = None, flags: Sequence[str] = FLAGS,
                 extra_sources: Sequence[str] = (), headers: Sequence[str] = ()) -> None:
        self.source_path = Path(__file__).parent / source  # an absolute path stays as it is
        self.flags = list(flags)
        folder = self.source_path.parent
        self.sources = {folder / name: (folder / name).read_text(encoding="utf-8")
                        for name in (self.source_path.name, *extra_sources, *headers)}
        self.source = "\n".join(self.sources.values())   # every file the build reads: the cache key
        self.symbols = dict(symbols)
        self.check = check
        self.diagnostics = ""  # the compiler's full output of a failed build (or of the -fopenmp one, when serial)
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._reason: str | None = None

    def path(self) -> Path:
        """Where the library for this source, compiler, flags and CPU is (or will be) cached."""
        try:
            cc = " ".join(compiler())
        except OSError:
            cc = "none"
        key = hashlib.sha256("\n".join([self.source, cc, " ".join(self.flags), cpu_id(), platform.machine()]).encode())
        return cache_dir() / f"{self.source_path.stem}_{key.hexdigest()[:16]}.so"

    def _build(self) -> ctypes.CDLL:
        try:
            return self._build_with_flags()
        except OSError:
            # a compiler without OpenMP (Apple's clang: "unsupported option '-fopenmp'"; gcc: "cannot find
            # -lgomp"): build the loops serial (omp.h and the runtime are guarded by _OPENMP; the SIMD pragmas stay)
            if "-fopenmp" not in self.flags or not any(w in self.diagnostics for w in ("openmp", "gomp", "omp.h")):
                raise
            first = self.diagnostics
            self.flags = [SERIAL_OPENMP if f == "-fopenmp" else f for f in self.flags]
            lib = self._build_with_flags()  # its failure is the reason (the source's own errors)
            self.diagnostics = first  # why the loops are serial
            return lib

    def _build_with_flags(self) -> ctypes.CDLL:
        cc = compiler()  # checked even when a library is cached: a broken CC is reported, not hidden
        path = self.path()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                for file, text in self.sources.items():   # the texts the key was made of, built side by side
                    (Path(tmp) / file.name).write_text(text)
                c_files = [str(Path(tmp) / f.name) for f in self.sources if f.suffix == ".c"]
                out = Path(tmp) / path.name
                proc = subprocess.run([*cc, *self.flags, "-I", tmp, "-o", str(out), *c_files, "-lm"],
                                      capture_output=True, text=True, check=False)  # a failure is reported below
                if proc.returncode != 0:
                    self.diagnostics = proc.stderr
                    first = (proc.stderr.strip().splitlines() or ["no message"])[0]
                    raise OSError(f"compiling {self.source_path.name} with {' '.join(cc)} failed: {first}")
                os.replace(out, path)  # atomic: concurrent builders race harmlessly
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in self.symbols.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = list(argtypes)
        if self.check is not None:
            self.check(lib)
        return lib

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, built at the first call; None where it cannot be (:meth:`unavailable_reason`)."""
        if self._lib is not None or self._reason is not None:
            return self._lib
        with self._lock:
            if self._lib is None and self._reason is None:
                if os.environ.get(DISABLE_ENV):
                    self._reason = f"disabled by {DISABLE_ENV}"
                elif not sys.platform.startswith("linux") and sys.platform != "darwin":
                    self._reason = f"unsupported platform {sys.platform}"
                else:
                    try:
                        self._lib = self._build()
                    except OSError as e:
                        self._reason = str(e)
        return self._lib

    def available(self) -> bool:
        """True when the library is (or can be) built and loaded on this machine."""
        return self.load() is not None

    def unavailable_reason(self) -> str | None:
        """Why :meth:`available` is False, in one line (None when it is True)."""
        self.load()
        return self._reason
