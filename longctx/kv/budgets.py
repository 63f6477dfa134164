"""KV budgets as the commands take them: a fraction of the context (``0.25``) or a token count (``512``). No torch
here: ``longctx kv-eval`` and ``longctx throughput --hf`` refuse a bad budget before torch loads."""
from __future__ import annotations


def parse_budgets(text: str) -> list[float | int]:
    """``"0.1,0.25"`` → fractions of the context length; ``"512,1024"`` → token counts (a number with a ``.``
    or an exponent is a fraction in (0, 1], a plain integer is tokens ≥ 1)."""
    budgets: list[float | int] = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        try:
            value = float(item) if any(c in item for c in ".eE") else int(item)
        except ValueError:
            raise ValueError(f"--budgets: {item!r} is not a number (expected fractions like 0.25 or token "
                             "counts like 512)") from None
        if value <= 0:
            raise ValueError(f"--budgets: {item} must be > 0 (a fraction in (0, 1] or a token count >= 1)")
        if isinstance(value, float) and value > 1:
            raise ValueError(f"--budgets: fraction {item} is > 1 (write token counts as integers, e.g. 512)")
        budgets.append(value)
    if not budgets:
        raise ValueError("--budgets: no budget given")
    if len(set(map(budget_label, budgets))) != len(budgets):
        raise ValueError(f"--budgets: duplicate budgets in {text!r}")
    return budgets


def budget_label(budget: float | int) -> str:
    """``0.25`` → ``"25%"``, ``512`` → ``"512"``."""
    return f"{100 * budget:g}%" if isinstance(budget, float) else str(budget)


def budget_tokens(budget: float | int, length: int) -> int:
    """Tokens kept per layer for ``budget`` (a fraction of ``length``, or tokens)."""
    return max(1, round(budget * length)) if isinstance(budget, float) else int(budget)
