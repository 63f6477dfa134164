// Chunked power retention, deg 2, backward: the state part of dq on Hopper's warpgroup MMA (wgmma, sm_90a), with a
// producer thread streaming the state and four consumer warpgroups multiplying and folding it (state_stream.cuh). For
// query row i of chunk n >= 1 and the state S entering that chunk (chunk_triton's feature order, d = e = 64, column
// blocks of 16):
//   g_i[f]   = dnum_i . S[f, :]                        dnum_i = bf16(do_i / den_i), den 0 -> 1
//   dq_i[a] += w_ab sum_b g_i[(a, b)] q_i[b],  dq_i[b] += w_ab sum_a g_i[(a, b)] q_i[a]    (w_ab: 1 if A == B, else 2)
//   U_i      = r_i dq_i,   V_i = r_i phi(q_i) . (w g_i) = r_i (q_i . dq_i) / 2,   r_i = scale^2 exp(G_i)
// which is what chunk_triton._bwd_dq's feature-step loop adds before the in-chunk part (it reads U and V instead
// with STATE_IN). S is read through its tensor map SMAP (hopper.tensor_map of SB [B*HKV, NC - 1, F, 64] bf16).
// Reference: hopper.state_dq_reference.
//
// Block: 256 rows of one query head inside one chunk: four consumer warpgroups of 64 rows (warps 0-15), each
// running fold_state, and a producer warpgroup (warps 16-19; warp 16's first thread streams the state, the others
// leave), which gives its registers to the consumers. 128 rows a block read twice the bytes and were slower (notes
// v14).

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
power_state_dq(const u16* __restrict__ Q, const u16* __restrict__ DO, const float* __restrict__ DEN,
               const float* __restrict__ G, const void* __restrict__ SMAP, float* __restrict__ U,
               float* __restrict__ V, int NC, int C, int F, int HQ, int HKV, int has_gate, double scale2)
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
    // every global load first: this warpgroup's 64 rows of q (for shared memory), and the thread's rows' do, den, G
    XRows64 qrows;
    qrows.load(Q + (bh * Tp + m0 + 64 * wg) * D, wt);
    u32 dw[2][8];
    float den[2], gate[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long row = bh * Tp + m0 + lrow + 8 * h;
        den[h] = DEN[row];
        gate[h] = has_gate ? G[bkv * Tp + m0 + lrow + 8 * h] : 0.f;
        const u32* dorow = reinterpret_cast<const u32*>(DO + row * E);
#pragma unroll
        for (int j = 0; j < 8; ++j) dw[h][j] = dorow[(8 * j + 2 * c) >> 1];   // e = 8 j + 2c, + 1
    }
    qrows.store(xs + 64 * wg * X_ROW, wt);
    // dnum as wgmma's A fragments: k slice ks, register j: row + 8 (j & 1), e = 16 ks + 2c + 8 (j >> 1)
    u32 dn[4][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float inv = 1.f / (den[h] == 0.f ? 1.f : den[h]);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
#pragma unroll
            for (int hi = 0; hi < 2; ++hi) {
                const u32 x = dw[h][2 * ks + hi];
                dn[ks][h + 2 * hi] = pack_bf16(bf_lo(x) * inv, bf_hi(x) * inv);
            }
    }
    named_sync(1 + wg, 128);                              // the warpgroup's q rows are in shared memory
    float db[4][2][4];                                    // dq = 2 db at the thread's columns
    fold_state<true>(ring, dn, xs, lrow, c, lane, db);

    // U = r dq (dq = 2 db), V = r (q . dq) / 2 = r (q . db)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long row = bh * Tp + m0 + lrow + 8 * h;
        const float r = row_factor(has_gate, scale2, gate[h]);
        store_db(U + row * D, db, h, c, 2.f * r);
        const float dot = dot_x(db, xs, lrow + 8 * h, c, h);
        if (c == 0) V[row] = r * dot;
    }
}
