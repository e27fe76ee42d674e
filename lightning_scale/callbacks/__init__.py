"""Lightning callbacks of the suite."""

from lightning_scale.callbacks.cost import CostReporter
from lightning_scale.callbacks.memory import MemoryAccountant
from lightning_scale.callbacks.nonfinite import NonFiniteGuard, NonFiniteLossError
from lightning_scale.callbacks.profiler import ScaleProfiler
from lightning_scale.callbacks.resume import ExactResume

__all__ = ["CostReporter", "ExactResume", "MemoryAccountant", "NonFiniteGuard", "NonFiniteLossError", "ScaleProfiler"]
