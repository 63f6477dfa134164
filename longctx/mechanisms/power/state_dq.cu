// Chunked power retention, deg 2, backward: the state part of dq on Hopper's warpgroup MMA (wgmma, sm_90a), with a
// producer warp streaming the state and four consumer warpgroups multiplying and folding it. For query row i of
// chunk n >= 1 and the state S entering that chunk (chunk_triton's feature order, d = e = 64, column blocks of 16):
//   g_i[f]   = dnum_i . S[f, :]                        dnum_i = bf16(do_i / den_i), den 0 -> 1
//   dq_i[a] += w_ab sum_b g_i[(a, b)] q_i[b],  dq_i[b] += w_ab sum_a g_i[(a, b)] q_i[a]    (w_ab: 1 if A == B, else 2)
//   U_i      = r_i dq_i,   V_i = r_i phi(q_i) . (w g_i) = r_i (q_i . dq_i) / 2,   r_i = scale^2 exp(G_i)
// which is what chunk_triton._bwd_dq's feature-step loop adds before the in-chunk part (it reads U and V instead
// with STATE_IN). Reference: hopper.state_dq_reference.
//
// Block: 256 rows of one query head inside one chunk: four consumer warpgroups of 64 rows (warps 0-15) and a
// producer warpgroup (warps 16-19; warp 16 copies, the others leave), which gives its registers to the consumers
// (setmaxnreg). The state is walked in 40 pieces of 64 features (a quarter of a block pair: 4 values of a x 16 of
// b), 8 KB each, through a ring of NST stages: the producer copies a piece with cp.async, 8 lanes a feature row
// (one L2 line; the 128-byte swizzle puts them in 8 bank groups), and the copies' completion arrives on the
// stage's "full" mbarrier (the producer does not wait: a proxy fence there drained every copy in flight). Each
// consumer warpgroup waits for the piece, fences, multiplies it (g = dnum S^T: M = 64 rows, N = 64 features,
// K = 64 = e; A = dnum from registers, B = the piece, K-major, 128-byte swizzle), waits, frees the stage ("empty",
// one arrival a warp) and folds g on the CUDA cores while the other warpgroups' MMAs run. 256 rows share every
// piece read from L2 (128 rows a block read twice the bytes and were slower: notes v14).
//
// Fold, thread (row r = g or g + 8 of its warp's 16, lane quad c): a m64n64 accumulator holds, for each of the 4
// values of a in the piece, the columns b in {2c, 2c+1, 2c+8, 2c+9} of block B: the b sums finish in the thread
// (db[B], registers: A and B are unrolled), the a sums are partial over the quad's 4 threads and are summed over
// it once every block B of a quarter (A, qt) is done; the lanes that own those columns of block A (the same
// column set) add them to db[A]. Diagonal pairs are folded at half weight (q_a halved for db, the partial a sums
// halved after the diagonal piece) and everything is doubled at the end: exact.

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

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
power_state_dq(const u16* __restrict__ Q, const u16* __restrict__ DO, const float* __restrict__ DEN,
               const float* __restrict__ G, const u16* __restrict__ SB, float* __restrict__ U,
               float* __restrict__ V, int NC, int C, int F, int HQ, int HKV, int has_gate, double scale2)
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
    // every global load first: this warpgroup's 64 rows of q (for shared memory), and the thread's rows' do, den, G
    const u16* qrows = Q + (bh * Tp + m0 + 64 * wg) * D;
    uint4 qt4[4];
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int k = wt + 128 * it;
        qt4[it] = *reinterpret_cast<const uint4*>(qrows + (k >> 3) * D + (k & 7) * 8);
    }
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
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int k = wt + 128 * it;
        *reinterpret_cast<uint4*>(smem + OFF_Q + (64 * wg + (k >> 3)) * Q_ROW + (k & 7) * 16) = qt4[it];
    }
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
    // the thread's q row h at 16 X + {2c, 2c+1} (low word) and {2c+8, 2c+9} (high word)
    const u32 qrow[2] = {sbase + OFF_Q + lrow * Q_ROW + 4 * c, sbase + OFF_Q + (lrow + 8) * Q_ROW + 4 * c};
    float db[4][2][4];                                    // dq at the thread's columns, half weight on diagonals
#pragma unroll
    for (int X = 0; X < 4; ++X)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int i = 0; i < 4; ++i) db[X][h][i] = 0.f;

    float acc[32];
    int st = 0;
    u32 phase = 0;                                        // the ring's stage and its parity
#pragma unroll
    for (int A = 0; A < 4; ++A) {                         // unrolled with B: db's block index is a constant
        for (int qt = 0; qt < 4; ++qt) {
            float qa[2][4], da[2][4];                       // the quarter's q_a (halved on the diagonal), a sums
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint2 raw = *reinterpret_cast<const uint2*>(smem + OFF_Q + (lrow + 8 * h) * Q_ROW +
                                                                  (16 * A + 4 * qt) * 2);
                qa[h][0] = 0.5f * bf_lo(raw.x);
                qa[h][1] = 0.5f * bf_hi(raw.x);
                qa[h][2] = 0.5f * bf_lo(raw.y);
                qa[h][3] = 0.5f * bf_hi(raw.y);
#pragma unroll
                for (int a = 0; a < 4; ++a) da[h][a] = 0.f;
            }
#pragma unroll
            for (int B = A; B < 4; ++B) {
                mbar_wait(full + 8 * st, phase);
                fence_async_smem();                           // the copies (generic proxy) before wgmma's reads
                wgmma_fence();
                const u64 dsc = desc_swz(sbase + st * PIECE_BYTES);
#pragma unroll
                for (int ks = 0; ks < 4; ++ks)                // K-major, 128-byte swizzle: a k slice is 32 bytes
                    WGMMA_64x64x16(acc, dn[ks][0], dn[ks][1], dn[ks][2], dn[ks][3], dsc + 2 * ks, 0, ks > 0);
                wgmma_commit();
                float qb[2][4];                               // q_b at the thread's columns of block B
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 lo = lds32(qrow[h] + 32 * B), hi = lds32(qrow[h] + 32 * B + 16);
                    qb[h][0] = bf_lo(lo);
                    qb[h][1] = bf_hi(lo);
                    qb[h][2] = bf_lo(hi);
                    qb[h][3] = bf_hi(hi);
                }
                wgmma_wait<0>();
                if (lane == 0) mbar_arrive(empty + 8 * st);   // the warp is past the wait (aligned)
                if (++st == NST) {
                    st = 0;
                    phase ^= 1;
                }
                // acc[4 j + 2 h + k]: row h, a = j / 2 of the quarter, b index 2 (j & 1) + k
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int k = 0; k < 2; ++k) {
                            const int ib = 2 * (j & 1) + k;
                            da[h][j >> 1] = fmaf(acc[4 * j + 2 * h + k], qb[h][ib], da[h][j >> 1]);
                            db[B][h][ib] = fmaf(acc[4 * j + 2 * h + k], qa[h][j >> 1], db[B][h][ib]);
                        }
                if (B == A) {                                 // full weight after the diagonal piece
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int a = 0; a < 4; ++a) {
                            qa[h][a] *= 2.f;
                            da[h][a] *= 0.5f;
                        }
                }
            }
            // the quarter's a sums over the quad (every lane gets the 4); lane c owns a = 2c, 2c + 1 and 2c + 8,
            // 2c + 9 of block A: in quarter qt when c / 2 == qt % 2, at its columns 2 (qt / 2), + 1
            const bool mine = (c >> 1) == (qt & 1);
            const int col = 2 * (qt >> 1);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    da[h][a] += __shfl_xor_sync(0xffffffffu, da[h][a], 1);
                    da[h][a] += __shfl_xor_sync(0xffffffffu, da[h][a], 2);
                }
                if (mine) {
                    const float own0 = c & 1 ? da[h][2] : da[h][0], own1 = c & 1 ? da[h][3] : da[h][1];
                    if (col == 0) {
                        db[A][h][0] += own0;
                        db[A][h][1] += own1;
                    } else {
                        db[A][h][2] += own0;
                        db[A][h][3] += own1;
                    }
                }
            }
        }
    }

    // U = r dq (dq = 2 db), V = r (q . dq) / 2 = r (q . db)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long row = bh * Tp + m0 + lrow + 8 * h;
        const float r = has_gate ? (float)scale2 * __expf(gate[h]) : (float)scale2;
        float dot = 0.f;
        float* urow = U + row * D + 2 * c;
#pragma unroll
        for (int X = 0; X < 4; ++X) {
            const u32 lo = lds32(qrow[h] + 32 * X), hi = lds32(qrow[h] + 32 * X + 16);
            dot = fmaf(bf_lo(lo), db[X][h][0], dot);
            dot = fmaf(bf_hi(lo), db[X][h][1], dot);
            dot = fmaf(bf_lo(hi), db[X][h][2], dot);
            dot = fmaf(bf_hi(hi), db[X][h][3], dot);
            *reinterpret_cast<float2*>(urow + 16 * X) = make_float2(2.f * r * db[X][h][0], 2.f * r * db[X][h][1]);
            *reinterpret_cast<float2*>(urow + 16 * X + 8) =
                make_float2(2.f * r * db[X][h][2], 2.f * r * db[X][h][3]);
        }
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        if (c == 0) V[row] = r * dot;
    }
}
