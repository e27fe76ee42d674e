"""Lightning callbacks of the suite."""

from lightning_scale.callbacks.profiler import ScaleProfiler
from lightning_scale.callbacks.resume import ExactResume

__all__ = ["ExactResume", "ScaleProfiler"]
