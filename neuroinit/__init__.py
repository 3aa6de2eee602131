"""neuroinit: hardware-aware initialisation, local learning and chip export for rate and spiking RNNs."""

__version__ = "0.1.0"
