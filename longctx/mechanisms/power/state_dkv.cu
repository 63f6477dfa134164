// Chunked power retention, deg 2, backward: the state part of dk and dv on Hopper's warpgroup MMA (wgmma, sm_90a),
// with a producer thread streaming the state gradient and four consumer warpgroups multiplying it (state_stream.cuh).
// For key row j of chunk n <= nc - 2 and dS, the gradient of the state leaving that chunk (chunk_triton's feature
// order, d = e = 64, column blocks of 16; the query side's pair weights are inside dS):
//   dv_j = phi(k_j) dS,   phi_(a, b)(k) = bf16(k[a] k[b])
//   g_j[f] = v_j . dS[f, :],   dk_j[a] += sum_b g_j[(a, b)] k_j[b],   dk_j[b] += sum_a g_j[(a, b)] k_j[a]
//   DV_j = beta_j dv_j,  DK_j = beta_j dk_j,  DG_j = beta_j phi(k_j) . g_j = beta_j (k_j . dk_j) / 2
// with beta_j = exp(G_end - G_j) (G the in-chunk gate sums, G_end the chunk's last): what chunk_triton._bwd_dkv's
// feature-step loop adds before the in-chunk part (it reads DK, DV, DG instead with STATE_IN). dS is read through
// its tensor map DSMAP (hopper.tensor_map of DSB [B*HKV, NC - 1, F, 64] bf16). Reference: hopper.state_dkv_reference.
//
// Block: 128 rows of one KV head inside one chunk. Two consumer warpgroups run multiply_features for dv (rows 0-63,
// 64-127; warps 0-7), two run fold_state for dk (the same rows; warps 8-15), all four on every piece of dS; a
// producer warpgroup (warps 16-19; warp 16's first thread streams dS, the others leave) gives its registers to them.
// So every piece read from L2 serves 256 row-products, as in state_dq.cu. Measured (notes v15, v16): the time of its
// two halves run alone added up (the warpgroups' different work did not overlap), 1.80 ms at 4K with cp.async
// copies, 1.30-1.34 with the copy engine's.

#include "state_stream.cuh"

#define D 64
#define E 64
#define BM 128                                // rows a block
#define OFF_BAR (OFF_X + BM * X_ROW)          // mbarriers: full[NST], empty[NST]
#define SMEM_BYTES (OFF_BAR + 2 * NST * 8 + 1024)   // + the pieces' alignment to the swizzle's 1024-byte atoms
#define NTHREADS 640                          // four consumer warpgroups, one producer warpgroup
#define REGS "112"                            // a consumer thread's registers: 4 x 128 x 112 + 128 x 24 <= 640 x 96

// beta for the rows row and row + 8 (global indices into G) of chunk n of the head whose G starts at g0
__device__ __forceinline__ void gate_factors(const float* G, long long g0, int n, int C, long long row, int has_gate,
                                             float (&beta)[2]) {
    const float end = has_gate ? G[g0 + (long long)n * C + C - 1] : 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) beta[h] = has_gate ? __expf(end - G[row + 8 * h]) : 1.f;
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
power_state_dkv(const u16* __restrict__ K, const u16* __restrict__ V, const float* __restrict__ G,
                const void* __restrict__ DSMAP, float* __restrict__ DK, float* __restrict__ DV, float* __restrict__ DG,
                int NC, int C, int F, int has_gate)
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);   // the swizzle's atoms
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const long long bkv = blockIdx.y;
    const long long Tp = (long long)NC * C;
    const int m0 = blockIdx.x * BM;                       // the last chunk has no state gradient: not here
    const int n = m0 / C;
    StateRing ring;
    if (start_ring(DSMAP, (bkv * (NC - 1) + n) * (long long)F, smem_u32(smem), smem_u32(smem + OFF_BAR), 16, 16,
                   ring))
        return;

    asm volatile("setmaxnreg.inc.sync.aligned.u32 " REGS ";\n" ::: "memory");
    const int wg = warp >> 2, w4 = warp & 3, g = lane >> 2, c = lane & 3, wt = tid & 127;
    const bool fold = wg >= 2;                            // warpgroups 2, 3: dk; 0, 1: dv
    const int lrow = 64 * (wg & 1) + 16 * w4 + g;         // rows lrow and lrow + 8 of the block
    unsigned char* xs = smem + OFF_X;
    const long long row0 = bkv * Tp + m0;
    // the dv warpgroups copy the block's k rows into shared memory, 64 each; the dk warpgroups load their rows' v as
    // wgmma's A fragments (k slice ks, register j: row + 8 (j & 1), e = 16 ks + 2c + 8 (j >> 1))
    u32 vf[4][4];
    if (!fold) {
        XRows64 krows;
        krows.load(K + (row0 + 64 * wg) * D, wt);
        krows.store(xs + 64 * wg * X_ROW, wt);
    } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32* vrow = reinterpret_cast<const u32*>(V + (row0 + lrow + 8 * h) * E);
#pragma unroll
            for (int ks = 0; ks < 4; ++ks)
#pragma unroll
                for (int hi = 0; hi < 2; ++hi) vf[ks][h + 2 * hi] = vrow[8 * ks + 4 * hi + c];
        }
    }
    named_sync(1, 512);                                   // the block's k rows are in shared memory

    float beta[2];                                        // read after the walk (held through it, they spilled)
    if (!fold) {
        float acc[32];
        multiply_features<false>(ring, xs, lrow, c, lane, acc);
        gate_factors(G, bkv * Tp, n, C, row0 + lrow, has_gate, beta);
#pragma unroll
        for (int h = 0; h < 2; ++h) store_acc(DV + (row0 + lrow + 8 * h) * E, acc, h, c, beta[h]);
    } else {
        float db[4][2][4];                                // dk at the thread's columns
        fold_state<false>(ring, vf, xs, lrow, c, lane, db);
        gate_factors(G, bkv * Tp, n, C, row0 + lrow, has_gate, beta);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long row = row0 + lrow + 8 * h;
            store_db(DK + row * D, db, h, c, beta[h]);
            const float dot = dot_x(db, xs, lrow + 8 * h, c, h);
            if (c == 0) DG[row] = 0.5f * beta[h] * dot;
        }
    }
}
