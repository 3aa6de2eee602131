"""Native kernels as C source files, compiled at first use (:mod:`~neuroinit.learning.native.loader`).

- ``fused_step.c`` + ``products.c`` + ``chip_traces.c`` (sharing ``fused_run.h``; bound in ``fused_step.py``): the
  fused online e-prop / RFLO step, the native backend of :class:`~neuroinit.learning.online.OnlineEprop`
  (:mod:`neuroinit.learning.fused`);
- ``bptt.c`` (bound in :mod:`neuroinit.learning.fused_bptt_native`): the fused BPTT's loops.

Another kernel adds its ``.c`` files here and a binding module with one
:class:`~neuroinit.learning.native.loader.NativeLibrary` naming them, their headers and their symbols.
"""

from neuroinit.learning.native.loader import NativeLibrary

__all__ = ["NativeLibrary"]
