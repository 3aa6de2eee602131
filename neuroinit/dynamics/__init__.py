"""Dynamics of recurrent cells: Lyapunov spectra (QR method), gradient flossing, loss curvature.

* :mod:`~neuroinit.dynamics.lyapunov`: :func:`lyapunov_spectrum`, :func:`max_exponent`,
  :func:`two_trajectory_exponent`, :func:`task_inputs` (science.md section 3).
* :mod:`~neuroinit.dynamics.flossing`: :func:`floss` (science.md section 4).
* :mod:`~neuroinit.dynamics.curvature`: :func:`top_hessian_eigenvalue`, :func:`generalisation_gap`
  (science.md section 5).
"""

from neuroinit.dynamics.curvature import (
                                         CurvatureResult,
                                         batch_loss,
                                         generalisation_gap,
                                         top_hessian_eigenvalue,
)
from neuroinit.dynamics.flossing import FLOSS_MODES, FlossResult, floss
from neuroinit.dynamics.lyapunov import (
                                         LyapunovResult,
                                         dt_over_tau,
                                         lyapunov_spectrum,
                                         max_exponent,
                                         task_inputs,
                                         two_trajectory_exponent,
)

__all__ = ["FLOSS_MODES", "CurvatureResult", "FlossResult", "LyapunovResult", "batch_loss", "dt_over_tau",
           "floss", "generalisation_gap", "lyapunov_spectrum", "max_exponent", "task_inputs",
           "top_hessian_eigenvalue", "two_trajectory_exponent"]
