"""The workload Nsight Compute profiled (ncu --kernel-name regex:power_ --launch-skip 2 --launch-count 2 ...):
4K tokens, batch 32, 8 heads, chunk 512, both CUDA kernels; results run1_ncu.txt, run2_ncu.txt."""
import torch, torch.nn.functional as F
from longctx.mechanisms.power.chunk_triton import KernelConfig, power_retention_triton
B, H, T = 32, 8, 4096
q, k, v = (torch.randn(B, H, T, 64, device="cuda").bfloat16() for _ in range(3))
lg = F.logsigmoid(4 + torch.randn(B, H, T, device="cuda"))
for _ in range(2):
    power_retention_triton(q, k, v, lg, chunk_size=512, config=KernelConfig(cuda=("deltas", "out")))
torch.cuda.synchronize()
