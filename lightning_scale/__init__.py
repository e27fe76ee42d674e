"""lightning_scale: large-model training strategies and callbacks for PyTorch Lightning."""

__version__ = "0.1.0"
