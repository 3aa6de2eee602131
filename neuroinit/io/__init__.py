"""Files neuroinit reads and writes: run files (:mod:`neuroinit.io.runfile`), NIR (:mod:`neuroinit.io.nir`),
lava-dl netx (:mod:`neuroinit.io.netx`; run in Lava by :mod:`neuroinit.io.lava_loader`), export verification
(:mod:`neuroinit.io.verify`), ready snntorch / norse / rockpool modules of a NIR file (:mod:`neuroinit.io.importers`)."""

from neuroinit.io.runfile import load_cell, read_run

__all__ = ["load_cell", "read_run"]
