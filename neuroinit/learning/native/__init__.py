"""Native kernels as C source files, compiled at first use (:mod:`~neuroinit.learning.native.loader`).

``fused_step.c``: the fused online e-prop / RFLO step, the native backend of
:class:`~neuroinit.learning.online.OnlineEprop` (:mod:`neuroinit.learning.fused`). Another kernel adds its
``.c`` file here and one :class:`~neuroinit.learning.native.loader.NativeLibrary` naming it and its symbols.
"""

from neuroinit.learning.native.loader import NativeLibrary

__all__ = ["NativeLibrary"]
