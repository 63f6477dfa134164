"""The mechanism interface every approach implements, and the registry the model and the bench read.

A mechanism mixes tokens given per-head queries, keys and values in the library's one layout
``[batch, heads, seq, head_dim]`` (keys/values may have fewer heads: GQA). It has three faces:

* ``forward(q, k, v) -> o`` — the parallel form for training and prefill, causal, ``o [B, Hq, T, Dv]``;
* ``step(q, k, v, state) -> (o, state)`` — the recurrent form for decoding: ``T_new >= 1`` new tokens are
  appended to the explicit ``state`` (made by ``init_state``) and their outputs returned;
* ``state_bytes(context_len, batch, dtype)`` — the decoding state's size after ``context_len`` tokens:
  the one source of truth the benchmark, the report and the tests read.

The step form also comes *static*, for fast generation: ``init_static_state(batch, capacity)`` allocates every
buffer once; ``prefill_static`` writes ``T_new`` tokens at a host-known position (eager, any length);
``step_static`` appends one token at the device-held position ``pos [1]`` and updates the buffers in place, with
no allocation that depends on the position, no shape change and no host sync, so that a decode step can be
captured in a CUDA graph and replayed. What a step runs may depend on the position only through
``static_variant(pos)`` (a fold, an eviction), a small key the host computes from its own count: the decoder
captures one graph per variant (``longctx.decoding``).

Mechanisms that need more than q/k/v (RayTention reads token embeddings) replace the whole layer through
the classmethod ``make_layer``; the rest are wrapped by the model's ``CausalSelfAttention``.
"""
from __future__ import annotations

import inspect
from dataclasses import fields, is_dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..attention import check_qkv


def check_dtype(dtype) -> torch.dtype:
    """``dtype`` if it is a floating-point ``torch.dtype`` (what a state or its size is counted in); a clear error
    naming it otherwise (a string such as ``"bfloat16"``, an integer dtype)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...), "
                         f"got {dtype!r}")
    return dtype


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=check_dtype(dtype)).element_size()


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; a clear error naming ``name`` for anything else (bools, floats, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_state_bytes_args(context_len, batch) -> None:
    check_int("context_len", context_len, 0)
    check_int("batch", batch)


def check_capacity(start: int, n: int, capacity: int) -> None:
    """A clear error where ``n`` tokens after ``start`` would run past a static state's ``capacity``."""
    if start + n > capacity:
        raise ValueError(f"static decoding state capacity exceeded: {start} tokens held + {n} new > capacity "
                         f"{capacity} (init_static_state(..., capacity=...))")


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors inside a state object (dataclass, dict, list/tuple or tensor): measured.

    A tensor referenced from several places (a buffer shared by all layers) is counted once.
    """
    seen: dict[tuple, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            seen[(x.data_ptr(), tuple(x.shape), x.stride())] = x.numel() * x.element_size()
        elif is_dataclass(x):
            for f in fields(x):
                walk(getattr(x, f.name))
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)

    walk(obj)
    return sum(seen.values())


class Mechanism(nn.Module):
    """Base class: holds the head geometry and checks inputs. Subclasses implement the three faces."""

    #: Longest context the mechanism supports (None: unbounded). Longer inputs raise.
    max_context: int | None = None

    def __init__(self, n_head: int, n_kv_head: int, head_dim: int):
        super().__init__()
        for name, value in (("n_head", n_head), ("n_kv_head", n_kv_head), ("head_dim", head_dim)):
            check_int(name, value)
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim

    def check(self, q: Tensor, k: Tensor, v: Tensor, context_len: int | None = None) -> None:
        """Raise a clear error for inputs that do not fit this mechanism: ``q``, ``k``, ``v`` hold the same tokens
        (one key and value per query), with this mechanism's heads and head dim."""
        check_qkv(q, k, v)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"{type(self).__name__}: q, k and v must hold the same tokens (one key and value per "
                             f"query), got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if q.shape[1] != self.n_head or k.shape[1] != self.n_kv_head:
            raise ValueError(f"{type(self).__name__} expects {self.n_head} query / {self.n_kv_head} KV heads, "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
        if q.shape[3] != self.head_dim:
            raise ValueError(f"{type(self).__name__} expects head_dim {self.head_dim}, got {q.shape[3]}")
        n = q.shape[2] if context_len is None else context_len
        if self.max_context is not None and n > self.max_context:
            raise ValueError(f"context of {n} tokens exceeds {type(self).__name__}.max_context={self.max_context}")

    def expect_state(self, state, cls: type, q: Tensor) -> None:
        """A clear error where ``state`` is not a ``cls`` that this mechanism made for ``q``'s batch: every
        ``(tensor, expected shape)`` of ``state_shapes`` (None entries: any size; the tensor may be None where the
        shape is) is checked, with the tensors' device (and, for ``k`` and ``v``, dtype) against ``q``'s."""
        if not isinstance(state, cls):
            raise TypeError(f"{type(self).__name__} needs a {cls.__name__} (its init_state / init_static_state), "
                            f"got {type(state).__name__}")
        for name, (t, shape) in self.state_shapes(state, q.shape[0]).items():
            if (t is None) != (shape is None):
                raise ValueError(f"{type(self).__name__} ({self.extra_repr()}): the state's {name} is "
                                 f"{'missing' if t is None else 'present'}: a state made with another configuration")
            if t is None:
                continue
            if t.dim() != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape)):
                want = tuple("*" if e is None else e for e in shape)
                raise ValueError(f"{type(self).__name__} ({self.extra_repr()}): the state's {name} is "
                                 f"{tuple(t.shape)}, expected {want} for batch {q.shape[0]}: a state made for "
                                 "another batch size, mechanism or configuration")
            if t.device != q.device or (name in ("k", "v") and t.dtype != q.dtype):
                raise ValueError(f"{type(self).__name__}: the state's {name} is {t.dtype} on {t.device}; the tokens "
                                 f"are {q.dtype} on {q.device}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def init_state(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        raise NotImplementedError

    def step(self, q: Tensor, k: Tensor, v: Tensor, state) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def state_bytes(self, context_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        raise NotImplementedError

    # --- static decoding state (see the module docstring) ---

    #: Whether ``step_static`` runs the same kernels for every position of one variant (CUDA-graph capturable).
    capturable: bool = True
    #: The class of the static state (``init_static_state``).
    static_state: type = type(None)

    def init_static_state(self, batch: int, capacity: int, device: torch.device | str = "cpu",
                          dtype: torch.dtype = torch.float32):
        raise NotImplementedError

    def static_variant(self, pos: int) -> Any:
        """Key of what the one-token step at position ``pos`` (tokens before it) runs; None: always the same."""
        return None

    def eager_state(self, state, seen: int):
        """The ``step`` state holding what the static ``state`` holds after ``seen`` tokens (views of its buffers
        where it can: ``step`` never writes into its input state)."""
        raise NotImplementedError

    def prefill_static(self, q: Tensor, k: Tensor, v: Tensor, state, start: int) -> Tensor:
        """Default: the eager ``step`` from ``eager_state``, its result copied back (``state.load``)."""
        self.check_static(q, k, v, state, start)
        out, new = self.step(q, k, v, self.eager_state(state, start))
        state.load(new)
        return out

    def step_static(self, q: Tensor, k: Tensor, v: Tensor, state, pos: Tensor, variant: Any) -> Tensor:
        raise NotImplementedError

    def check_static(self, q: Tensor, k: Tensor, v: Tensor, state, start: int | None = None) -> None:
        """``check`` plus: ``state`` is this mechanism's static state for this batch, device and dtype, and the host
        position ``start`` (``prefill_static``'s) an int >= 0."""
        self.check(q, k, v, context_len=1)
        self.expect_state(state, self.static_state, q)
        if start is not None:
            check_int("start", start, 0)

    def empty_output(self, q: Tensor, v: Tensor) -> Tensor | None:
        """The output where there is nothing to compute (no new tokens, or a batch of 0), ``[B, Hq, T, Dv]``; None
        otherwise."""
        return q.new_empty(*q.shape[:3], v.shape[-1]) if q.numel() == 0 else None

    def state_shapes(self, state, batch: int) -> dict:
        """``{name: (tensor, expected shape)}`` of an eager or static state of this mechanism (``expect_state``)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}"


# --- registry ------------------------------------------------------------------------------------------

_REGISTRY: dict[str, tuple[type, dict]] = {}
# the built-in mechanisms in the order the bench and its report list them, whatever order their modules load in
# (the registry fills as imports happen, and that order moved once when a module's imports changed)
BUILT_IN = ("full", "sliding_window", "ring", "raytention", "tensor_cache", "power", "power4")


def register(name: str, **defaults) -> Callable[[type], type]:
    """Class decorator: make a mechanism buildable by ``name``, with default options ``defaults``.

    One class may be registered under several names with different defaults (``power`` and ``power4``).
    """
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"mechanism {name!r} is already registered")
        _REGISTRY[name] = (cls, dict(defaults))
        return cls
    return deco


def registered() -> list[str]:
    """Names of the registered mechanisms: the built-in ones in ``BUILT_IN``'s order, then the others in the order
    they were registered."""
    return [n for n in BUILT_IN if n in _REGISTRY] + [n for n in _REGISTRY if n not in BUILT_IN]


def lookup(name: str) -> tuple[type, dict]:
    """``(class, default options)`` of a registered mechanism; a clear error for an unknown name."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown mechanism {name!r}; registered: {', '.join(_REGISTRY)}")
    cls, defaults = _REGISTRY[name]
    return cls, dict(defaults)


def build_mechanism(name: str, n_head: int, n_kv_head: int, head_dim: int, **options) -> Mechanism:
    """Instantiate the mechanism registered as ``name``; ``options`` override its defaults."""
    cls, kwargs = lookup(name)
    params = inspect.signature(cls.__init__).parameters
    known = set(params) - {"self", "n_head", "n_kv_head", "head_dim"}
    unknown = sorted(set(options) - known)
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"unknown options {unknown} for mechanism {name!r}; known: {sorted(known)}")
    kwargs.update(options)
    return cls(n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim, **kwargs)
