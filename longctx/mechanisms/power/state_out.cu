// Chunked power retention, deg 2, forward: the state part of the output on Hopper's warpgroup MMA (wgmma, sm_90a),
// with a producer warp streaming the state and four consumer warpgroups multiplying it. For query row i of chunk
// n >= 1 and the state S entering that chunk (chunk_triton's feature order, d = e = 64, column blocks of 16):
//   U_i = r_i phi(q_i) S,   phi_(a, b)(q) = bf16(w_ab q[a] q[b]) (w_ab: 1 if A == B, else 2),   r_i = scale^2 exp(G_i)
// which is what chunk_triton._fwd_out's feature-step loop adds to the numerator (it reads U instead with STATE_IN).
// Reference: hopper.state_out_reference.
//
// Block: 256 rows of one query head inside one chunk: four consumer warpgroups of 64 rows (warps 0-15) and a
// producer warpgroup (warps 16-19; warp 16 streams the state with stream_state, the others leave), which gives its
// registers to the consumers. Each consumer warpgroup waits for a piece (64 features: 4 values of a x 16 of b),
// fences, builds the piece's features as wgmma's A operand in registers (one bf16x2 multiply per register: q[a]
// twice by q's pair at the register's columns b, w_ab folded into those), multiplies them by the piece (B,
// MN-major, 128-byte swizzle) into one accumulator over the whole state, waits and frees the stage; the other
// warpgroups' MMAs run meanwhile. 256 rows share every piece read from L2.

#define D 64
#define E 64
#define CWG 4                                 // consumer warpgroups of 64 rows
#define BM (64 * CWG)                         // rows a block
#define PIECE_BYTES 8192                      // a piece of the state (stream_state)
#define NST 8
#define Q_ROW 144                             // the q tile, row-major with 16 bytes of padding
#define OFF_Q (NST * PIECE_BYTES)
#define OFF_BAR (OFF_Q + BM * Q_ROW)          // mbarriers: full[NST], empty[NST]
#define SMEM_BYTES (OFF_BAR + 2 * NST * 8 + 1024)   // + the pieces' alignment to the swizzle's 1024-byte atoms
#define NTHREADS (128 * CWG + 128)            // the consumer warpgroups, one producer warpgroup
#define REGS "112"                            // a consumer thread's registers: 4 x 128 x 112 + 128 x 24 <= 640 x 96

#include "hopper_common.cuh"

// (x, x) for the bf16 half h of the pair x
__device__ __forceinline__ u32 twice(u32 x, int h) {
    return h ? (x >> 16) | (x & 0xffff0000u) : (x & 0xffffu) | (x << 16);
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
power_state_out(const u16* __restrict__ Q, const float* __restrict__ G, const u16* __restrict__ SB,
                float* __restrict__ U, int NC, int C, int F, int HQ, int HKV, int has_gate, double scale2)
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);   // the swizzle's atoms
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const long long bh = blockIdx.y;
    const long long bkv = (bh / HQ) * HKV + (bh % HQ) / (HQ / HKV);
    const long long Tp = (long long)NC * C;
    const int m0 = C + blockIdx.x * BM;                   // chunk 0 has no state: its rows are not here
    const int n = m0 / C;
    const u16* S = SB + (bkv * (NC - 1) + n - 1) * (long long)F * E;
    const u32 sbase = smem_u32(smem);
    const u32 full = sbase + OFF_BAR, empty = full + NST * 8;
    if (tid == 0) {
        for (int i = 0; i < NST; ++i) {
            mbar_init(full + 8 * i, 32);                  // the producer's lanes
            mbar_init(empty + 8 * i, 4 * CWG);            // one arrival a consumer warp
        }
    }
    __syncthreads();

    if (warp >= 4 * CWG) {                                // the producer warpgroup: one warp copies
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (warp > 4 * CWG) return;
        stream_state<NST>(S, sbase, full, empty, lane);
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 " REGS ";\n" ::: "memory");
    const int wg = warp >> 2, w4 = warp & 3, g = lane >> 2, c = lane & 3, wt = tid & 127;
    const int lrow = 64 * wg + 16 * w4 + g;               // rows lrow and lrow + 8 of the block
    const u16* qrows = Q + (bh * Tp + m0 + 64 * wg) * D;  // this warpgroup's 64 rows of q, into shared memory
    uint4 qt4[4];
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int k = wt + 128 * it;
        qt4[it] = *reinterpret_cast<const uint4*>(qrows + (k >> 3) * D + (k & 7) * 8);
    }
    float gate[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) gate[h] = has_gate ? G[bkv * Tp + m0 + lrow + 8 * h] : 0.f;
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int k = wt + 128 * it;
        *reinterpret_cast<uint4*>(smem + OFF_Q + (64 * wg + (k >> 3)) * Q_ROW + (k & 7) * 16) = qt4[it];
    }
    named_sync(1 + wg, 128);                              // the warpgroup's q rows are in shared memory
    const u32 qrow[2] = {sbase + OFF_Q + lrow * Q_ROW, sbase + OFF_Q + (lrow + 8) * Q_ROW};
    // q's pairs at the A registers' columns of block X: (row lrow, 2c), (lrow + 8, 2c), (lrow, 2c + 8), (lrow + 8,
    // 2c + 8)
    u32 qb[4][4], qb2[4][4];                              // and doubled (off-diagonal pairs): exact in bf16
#pragma unroll
    for (int X = 0; X < 4; ++X)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            qb[X][j] = lds32(qrow[j & 1] + (16 * X + 2 * c + 8 * (j >> 1)) * 2);
            qb2[X][j] = mul_bf16x2(qb[X][j], 0x40004000u);
        }

    float acc[32];
    int st = 0;
    u32 phase = 0;                                        // the ring's stage and its parity
#pragma unroll
    for (int A = 0; A < 4; ++A) {                         // the walk of stream_state: A, the quarter, B >= A
        for (int qt = 0; qt < 4; ++qt) {
            u32 qa[2][2];                                 // q[row h][16 A + 4 qt .. + 3] as two pairs
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint2 raw = *reinterpret_cast<const uint2*>(smem + OFF_Q + (lrow + 8 * h) * Q_ROW +
                                                                  (16 * A + 4 * qt) * 2);
                qa[h][0] = raw.x;
                qa[h][1] = raw.y;
            }
#pragma unroll
            for (int B = A; B < 4; ++B) {
                const u32 (&qq)[4] = A == B ? qb[B] : qb2[B];
                u32 af[4][4];                             // k slice i: a = 16 A + 4 qt + i, b = 16 B + 0 .. 15
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const u32 s0 = twice(qa[0][i >> 1], i & 1), s1 = twice(qa[1][i >> 1], i & 1);
                    af[i][0] = mul_bf16x2(s0, qq[0]);
                    af[i][1] = mul_bf16x2(s1, qq[1]);
                    af[i][2] = mul_bf16x2(s0, qq[2]);
                    af[i][3] = mul_bf16x2(s1, qq[3]);
                }
                mbar_wait(full + 8 * st, phase);
                fence_async_smem();                       // the copies (generic proxy) before wgmma's reads
                wgmma_fence();
                const u32 piece = sbase + st * PIECE_BYTES;
#pragma unroll
                for (int i = 0; i < 4; ++i)               // MN-major (features = K, e = N): a k slice is 16 rows
                    WGMMA_64x64x16(acc, af[i][0], af[i][1], af[i][2], af[i][3], desc_swz(piece + i * 2048), 1,
                                   A > 0 || qt > 0 || B > A || i > 0);   // the walk's first slice overwrites
                wgmma_commit();
                wgmma_wait<0>();
                if (lane == 0) mbar_arrive(empty + 8 * st);   // the warp is past the wait (aligned)
                if (++st == NST) {
                    st = 0;
                    phase ^= 1;
                }
            }
        }
    }

    // U = r phi(q) S: acc[4 j + 2 h + k] is (row h, e = 8 j + 2c + k)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float r = has_gate ? (float)scale2 * __expf(gate[h]) : (float)scale2;
        float* urow = U + (bh * Tp + m0 + lrow + 8 * h) * E + 2 * c;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            *reinterpret_cast<float2*>(urow + 8 * j) = make_float2(r * acc[4 * j + 2 * h], r * acc[4 * j + 2 * h + 1]);
    }
}
