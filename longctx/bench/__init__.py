"""The comparison harness behind ``longctx bench``: train, measure, report."""
from .presets import PRESETS, BenchSettings
from .run import run_bench

__all__ = ["PRESETS", "BenchSettings", "run_bench"]
