"""Native kernels as C source files, compiled at first use (:mod:`~neuroinit.learning.native.loader`).

``fused_step.c`` (bound in ``fused_step.py``): the fused online e-prop / RFLO step, the native backend of
:class:`~neuroinit.learning.online.OnlineEprop` (:mod:`neuroinit.learning.fused`). Another kernel adds its
``.c`` file here and a binding module with one :class:`~neuroinit.learning.native.loader.NativeLibrary` naming
it and its symbols (as ``fused_step.py`` does).
"""

from neuroinit.learning.native.loader import NativeLibrary

__all__ = ["NativeLibrary"]
