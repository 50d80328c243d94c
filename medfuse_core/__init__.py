"""medfuse_core: the pure-PyTorch library behind medfuse (no Ray, no MLflow imports)."""

__version__ = "0.1.0"
