"""manifoldlens: the geometry a trained classifier sees in its data."""

__version__ = "0.1.0"
