"""expo-bench: a reproducibility benchmark for offline preference optimization."""

__version__ = "0.1.0"
