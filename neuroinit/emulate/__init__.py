"""Integer emulation of deployed networks, one arithmetic per hardware profile (see
:mod:`neuroinit.emulate.integer` and ``docs/export.md``)."""

from neuroinit.emulate.integer import (
    ARITHMETICS,
    Deployment,
    Emulation,
    arithmetic_of,
    compare_on_task,
    deploy,
    emulate,
    run_cell,
    spike_mismatches,
)

__all__ = ["ARITHMETICS", "Deployment", "Emulation", "arithmetic_of", "compare_on_task", "deploy", "emulate",
           "run_cell", "spike_mismatches"]
