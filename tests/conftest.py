import functools
import json
import os
import subprocess
import sys
import time

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def attempt(fn) -> dict:
    """Call ``fn()``: ``{"type", "error", "seconds"}``, the exception's class name and message (None, None when
    it returned) and how long it took; for the ranks' reports of what each probe raised."""
    t0 = time.monotonic()
    try:
        fn()
        res = {"type": None, "error": None}
    except Exception as e:  # noqa: BLE001 - the test decides what was expected
        res = {"type": type(e).__name__, "error": str(e)}
    res["seconds"] = time.monotonic() - t0
    return res


@pytest.fixture(autouse=True)
def test_seed(request) -> int:
    """Every test draws its random inputs from a seed of its own, new on every run of the suite (so the inputs
    differ between runs) and printed (shown with a failure): ``LONGCTX_TEST_SEED=<seed> pytest <test id>`` replays
    it. torch's global RNG is seeded with it too."""
    fixed = os.environ.get("LONGCTX_TEST_SEED")
    seed = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little") >> 1
    torch.manual_seed(seed)
    print(f"test seed {seed}: replay with LONGCTX_TEST_SEED={seed} pytest '{request.node.nodeid}'")
    return seed


@pytest.fixture
def gen(test_seed):
    """A fresh generator per test, seeded with the test's printed seed."""
    return torch.Generator().manual_seed(test_seed)


LOOP_PROBE = r"""
import torch, triton, triton.language as tl

@triton.jit
def count(X, N):
    acc = 0.0
    for i in range(0, N, 4):
        acc += 1.0
    tl.store(X, acc)

x = torch.zeros(1)
count[(1,)](x, 9)
assert x.item() == 3.0
"""


@functools.lru_cache(maxsize=1)
def interpreter_loops_over_runtime_ints() -> bool:
    """Whether this triton's interpreter runs a loop over an int argument, as every kernel here does (triton 3.6's
    passes ints as 1-element arrays, which ``range`` rejects; 3.8's runs them)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", LOOP_PROBE], env=env, capture_output=True, text=True, timeout=300)
    return run.returncode == 0


def run_script(script: str, gen, device: str, interpret: bool) -> dict:
    """Run ``script`` (argv: a seed drawn from ``gen``, the device) in a fresh Python, under ``TRITON_INTERPRET=1``
    where ``interpret``; returns the JSON object its last line prints."""
    seed = torch.randint(0, 2**31 - 1, (), generator=gen).item()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", script, str(seed), device], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture
def triton_interpreter():
    """Skips a test that runs kernels under TRITON_INTERPRET=1 where the interpreter cannot run them (the
    compiled-kernel tests cover those machines, which have a GPU)."""
    pytest.importorskip("triton")
    if not interpreter_loops_over_runtime_ints():
        pytest.skip("this triton's interpreter cannot loop over a runtime int argument (triton 3.6)")
