"""Which bench models train bit-for-bit the same twice on a GPU, and under which settings.

The GPU bench reproduces sliding window and power retention exactly, but not full attention or RayTention
(benchmarks/README.md). This trains each named mechanism's GPU-preset GPT twice from the same seed on the same
batches, under each mode, and compares the final weights:

* ``default``: as the bench trains;
* ``deterministic_warn_only``: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (the warnings it
  raised are recorded: they name the operations PyTorch knows to be non-deterministic);
* ``deterministic``: the same with ``warn_only=False``: operations with a deterministic variant use it (cuDNN
  attention among them), the others raise;
* ``sdpa=<backends>``: SDPA restricted to the given backends during training (full attention's kernel choice).

    PYTHONPATH=. python benchmarks/determinism.py --out benchmarks/results/determinism_gpu.json

Writes JSON atomically. Needs a CUDA device.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

# cuBLAS is deterministic only with this set before its first use, which the "default" mode's runs may make
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from longctx.atomic import atomic_write_json  # noqa: E402
from longctx.bench.measure import device_name  # noqa: E402
from longctx.bench.presets import settings_for  # noqa: E402
from longctx.bench.run import _model, deterministic_algorithms  # noqa: E402
from longctx.bench.train import train  # noqa: E402
from longctx.data import get_batch, load_corpus  # noqa: E402

MODES = {   # name -> (torch.use_deterministic_algorithms: off / "warn" / "strict", SDPA backends or None)
    "default": (None, None),
    "deterministic_warn_only": ("warn", None),
    "deterministic": ("strict", None),
    "sdpa=efficient": (None, [SDPBackend.EFFICIENT_ATTENTION]),
    "sdpa=flash": (None, [SDPBackend.FLASH_ATTENTION]),
}


def weights(name: str, mode: str, steps: int, data) -> tuple[list[torch.Tensor], list[str]]:
    """Final weights of one training run, and the non-determinism warnings it raised."""
    deterministic, backends = MODES[mode]
    s = settings_for("gpu")
    with (deterministic_algorithms(deterministic is not None, warn_only=deterministic == "warn"),
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        model = _model(s, name, torch.device("cuda"), 0)
        with sdpa_kernel(backends) if backends else nullcontext():
            train(model, lambda g: get_batch(data, s.batch_size, s.block_size, g), steps, s.lr, 0, progress=False)
    said = sorted({str(w.message).split("\n")[0][:200] for w in caught if "determin" in str(w.message)})
    return [p.detach().clone() for p in model.parameters()], said


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mechanisms", default="full,raytention,tensor_cache,sliding_window")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/determinism_gpu.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("determinism.py needs a CUDA device")
    data, _ = load_corpus(None)
    rows = []
    for name in args.mechanisms.split(","):
        for mode in args.modes.split(","):
            if mode.startswith("sdpa=") and name != "full":
                continue
            start = time.perf_counter()
            try:
                (a, said), (b, _) = weights(name, mode, args.steps, data), weights(name, mode, args.steps, data)
            except RuntimeError as e:
                rows.append({"mechanism": name, "mode": mode, "error": str(e)[:300]})
                print(rows[-1], flush=True)
                continue
            diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
            rows.append({"mechanism": name, "mode": mode, "identical": all(torch.equal(x, y) for x, y in zip(a, b)),
                         "max_abs_weight_diff": diff, "seconds_two_runs": time.perf_counter() - start,
                         "nondeterminism_warnings": said})
            print(rows[-1], flush=True)
    meta = {"command": " ".join(sys.argv), "device": device_name(torch.device("cuda")), "torch": torch.__version__,
            "steps": args.steps, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(Path(args.out), {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
