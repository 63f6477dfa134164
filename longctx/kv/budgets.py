"""KV budgets as the commands take them: a fraction of the context (``0.25``) or a token count (``512``), and the
other numbers of ``longctx kv-eval``. No torch here: ``longctx kv-eval`` and ``longctx throughput --hf`` refuse a bad
number before torch loads."""
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


#: Shortest context kv-eval evaluates (a needle, its question and some haystack).
MIN_LENGTH = 128


def check_eval_numbers(budgets, lengths, depths, trials, ppl_samples, ppl_tokens, ppl_chunk, answer_tokens,
                       max_positions: int | None = None) -> None:
    """kv-eval's numbers, each refused by its option's name (``max_positions``: the model's, once it is known)."""
    if not budgets:
        raise ValueError("--budgets: no budget given")
    for b in budgets:
        if b <= 0 or (isinstance(b, float) and b > 1):
            raise ValueError(f"--budgets: {b} must be a fraction in (0, 1] or a token count >= 1")
    if not lengths:
        raise ValueError("--lengths: no length given")
    for name, values in (("--lengths", lengths), ("--depths", depths)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name}: a value is repeated in {list(values)}")
    for n in lengths:
        if n < MIN_LENGTH:
            raise ValueError(f"--lengths: {n} is too short (at least {MIN_LENGTH} tokens)")
        if max_positions is not None and n > max_positions:
            raise ValueError(f"--lengths: {n} exceeds the model's max_position_embeddings={max_positions}")
        if ppl_samples and not 2 <= ppl_tokens < n // 2:
            raise ValueError(f"--ppl-tokens: {ppl_tokens} must be in [2, length/2) for --lengths {n}")
    for d in depths:
        if not 0 <= d <= 1:
            raise ValueError(f"--depths: {d} is not a fraction in [0, 1]")
    if trials < 0 or ppl_samples < 0:
        raise ValueError(f"--trials and --ppl-samples must be >= 0, got {trials}, {ppl_samples}")
    if trials == 0 and ppl_samples == 0:
        raise ValueError("--trials and --ppl-samples are both 0: nothing to evaluate")
    if trials and not depths:
        raise ValueError("--depths: no depth given")
    if ppl_chunk < 1:
        raise ValueError(f"--ppl-chunk must be >= 1, got {ppl_chunk}")
    if answer_tokens < 1:
        raise ValueError(f"--answer-tokens must be >= 1, got {answer_tokens}")
