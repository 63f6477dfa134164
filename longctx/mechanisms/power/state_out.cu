// Chunked power retention, deg 2, forward: the state part of the output on Hopper's warpgroup MMA (wgmma, sm_90a),
// with a producer thread streaming the state and four consumer warpgroups multiplying it (state_stream.cuh). For
// query row i of chunk n >= 1 and the state S entering that chunk (chunk_triton's feature order, d = e = 64, column
// blocks of 16):
//   U_i = r_i phi(q_i) S,   phi_(a, b)(q) = bf16(w_ab q[a] q[b]) (w_ab: 1 if A == B, else 2),   r_i = scale^2 exp(G_i)
// which is what chunk_triton._fwd_out's feature-step loop adds to the numerator (it reads U instead with STATE_IN).
// S is read through its tensor map SMAP (hopper.tensor_map of SB [B*HKV, NC - 1, F, 64] bf16). Reference:
// hopper.state_out_reference.
//
// Block: 256 rows of one query head inside one chunk: four consumer warpgroups of 64 rows (warps 0-15), each
// running multiply_features, and a producer warpgroup (warps 16-19; warp 16's first thread streams the state, the
// others leave), which gives its registers to the consumers.

#include "state_stream.cuh"

#define D 64
#define E 64
#define CWG 4                                 // consumer warpgroups of 64 rows
#define BM (64 * CWG)                         // rows a block
#define OFF_BAR (OFF_X + BM * X_ROW)          // mbarriers: full[NST], empty[NST]
#define SMEM_BYTES (OFF_BAR + 2 * NST * 8 + 1024)   // + the pieces' alignment to the swizzle's 1024-byte atoms
#define NTHREADS (128 * CWG + 128)            // the consumer warpgroups, one producer warpgroup
#define REGS "112"                            // a consumer thread's registers: 4 x 128 x 112 + 128 x 24 <= 640 x 96

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
power_state_out(const u16* __restrict__ Q, const float* __restrict__ G, const void* __restrict__ SMAP,
                float* __restrict__ U, int NC, int C, int F, int HQ, int HKV, int has_gate, double scale2)
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = aligned_smem(smem_raw);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const QueryBlock<BM> blk(NC, C, F, HQ, HKV);
    const long long bh = blk.bh, bkv = blk.bkv, Tp = blk.Tp;
    const int m0 = blk.m0;
    StateRing ring;
    if (start_ring(SMAP, blk.srow, smem_u32(smem), smem_u32(smem + OFF_BAR), 4 * CWG, 4 * CWG, ring))
        return;

    asm volatile("setmaxnreg.inc.sync.aligned.u32 " REGS ";\n" ::: "memory");
    const int wg = warp >> 2, w4 = warp & 3, g = lane >> 2, c = lane & 3, wt = tid & 127;
    const int lrow = 64 * wg + 16 * w4 + g;               // rows lrow and lrow + 8 of the block
    unsigned char* xs = smem + OFF_X;
    XRows64 qrows;                                        // this warpgroup's 64 rows of q, into shared memory
    qrows.load(Q + (bh * Tp + m0 + 64 * wg) * D, wt);
    float gate[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) gate[h] = has_gate ? G[bkv * Tp + m0 + lrow + 8 * h] : 0.f;
    qrows.store(xs + 64 * wg * X_ROW, wt);
    named_sync(1 + wg, 128);                              // the warpgroup's q rows are in shared memory
    float acc[32];
    multiply_features<true>(ring, xs, lrow, c, lane, acc);

#pragma unroll
    for (int h = 0; h < 2; ++h) {                         // U = r phi(q) S
        const float r = row_factor(has_gate, scale2, gate[h]);
        store_acc(U + (bh * Tp + m0 + lrow + 8 * h) * E, acc, h, c, r);
    }
}
