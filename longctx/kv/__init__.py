"""KV-cache compression for pretrained transformers models (TriAttention and baselines on one pruning path).

The names below are imported on first use, so that ``import longctx.kv.cli`` (the ``longctx`` command's parser)
does not load transformers.
"""
from importlib import import_module

_EXPORTS = {"CompressedCache": "cache", "CompressedLayer": "cache", "FixedBudgetLayer": "cache",
            "QueryStats": "calibration", "calibrate": "calibration", "load_stats": "calibration",
            "save_stats": "calibration", "SCORERS": "scorers", "build_scorer": "scorers"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
