"""Run 2 of v9 (one device run): the CUDA kernels' pipeline depths, timed at 4K, chunk 512 (results: run2_exp.json)."""
import json, sys, torch, torch.nn.functional as F
from longctx.mechanisms.power import hopper
from longctx.mechanisms.power.chunk_triton import KernelConfig, power_retention_triton
B, H, T = 32, 8, 4096
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, T, 64, device="cuda").bfloat16().requires_grad_() for _ in range(3))
lg = F.logsigmoid(4 + torch.randn(B, H, T, device="cuda"))
do = torch.randn(B, H, T, 64, device="cuda").bfloat16()
orig, kernels = hopper._source, dict(hopper.KERNELS)
def timed(cfg, bwd, n=15):
    def step():
        o = power_retention_triton(q, k, v, lg, chunk_size=512, config=cfg)
        if bwd:
            o.backward(do)
    for _ in range(3):
        step()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        step()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n
res = {"triton_fwd_ms": timed(KernelConfig(), False), "triton_fwd_bwd_ms": timed(KernelConfig(), True)}
with torch.no_grad():
    ref = power_retention_triton(q, k, v, lg, chunk_size=512).float()
for name, define, base, values, per in (("out", "SSTAGES", 6, (6, 10, 16), 8192),
                                         ("deltas", "NSTAGE", 4, (4, 5), 14208)):
    for st in values:
        hopper._source = lambda f, d=define, b=base, st=st: orig(f).replace(f"#define {d} {b}", f"#define {d} {st}")
        hopper.KERNELS[name] = (kernels[name][0], kernels[name][1], kernels[name][2] + (st - base) * per)
        hopper._kernel.cache_clear()
        cfg = KernelConfig(cuda=(name,))
        try:
            with torch.no_grad():
                o = power_retention_triton(q, k, v, lg, chunk_size=512, config=cfg).float()
            r = {"fwd_ms": timed(cfg, False), "fwd_bwd_ms": timed(cfg, True),
                 "rel_err_vs_triton": ((o - ref).norm() / ref.norm()).item()}
        except Exception as err:
            r = repr(err)
        res[f"{name}_{define}{st}"] = r
        print(name, define, st, r, flush=True)
        hopper.KERNELS[name] = kernels[name]
print(json.dumps(res))
json.dump(res, open(sys.argv[1], "w"))
