"""longctx: attention over long contexts, five approaches behind one interface.

The names below load on first use (PEP 562), so that the ``longctx`` command refuses a bad option before torch
has loaded (~1 s)."""
from importlib import import_module

_WHERE = {"attention": ".attention", "attention_reference": ".attention", "merge_attention": ".attention",
          "Mechanism": ".mechanisms", "build_mechanism": ".mechanisms", "register": ".mechanisms",
          "registered": ".mechanisms", "GPT": ".model", "GPTConfig": ".model"}

__all__ = list(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'longctx' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
