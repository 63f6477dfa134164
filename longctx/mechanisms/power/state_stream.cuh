// The state-streaming design of state_dq.cu, state_out.cu and state_dkv.cu (hopper.py pastes it in for NVRTC): a
// producer thread streams a state S [2560 features][64] (d = e = 64, column blocks of 16) through a ring of
// shared-memory stages guarded by mbarriers, with the bulk tensor copy engine (TMA), and consumer warpgroups of 64
// rows each multiply every piece on wgmma, in one of two ways:
//   multiply_features: acc += phi(x) S, the rows' features built in registers as wgmma's A operand;
//   fold_state:        g = a S^T (a: the rows' e-vectors as A fragments), folded through phi(x) into dx.
// The state walks in 40 pieces of 64 features (a quarter qt of a block pair (A, B): 4 values of a x 16 of b), 8 KB
// each; 256 consumer rows (or 128 rows doing both products) share every piece read from L2.

#include "hopper_common.cuh"

#define PIECE_BYTES 8192                      // a piece of the state
#define NST 8                                 // the ring's stages
#define X_ROW 144                             // the rows' x tile after the ring: row-major, 16 bytes of padding
#define OFF_X (NST * PIECE_BYTES)

// Piece (A, qt, B) sits pair-major, the quarters inside a pair.
__device__ __forceinline__ int piece_offset(int A, int qt, int B) {
    return ((4 * A - A * (A - 1) / 2 + (B - A)) * 4 + qt) * 64;
}
// The producer, one thread: the 40 pieces of the state whose first feature is row row0 of the tensor map smap (the
// states as [rows, 64] bf16, boxes of 64 rows: hopper.tensor_map) into the ring's NST stages at ring (1024-byte
// aligned; the map's 128-byte swizzle is swz_off's), in the walk order A, then the quarter, then B >= A. Each stage
// is refilled once its "empty" barrier completes; its "full" barrier completes when the piece's bytes have landed.
// The copy engine writes through the async proxy that wgmma reads through: no proxy fence on either side (the
// cp.async copies of v14-v15 took 1.34-1.41x the time, notes v16).
__device__ __forceinline__ void stream_state(const void* smap, long long row0, u32 ring, u32 full, u32 empty) {
    tensormap_acquire(smap);
    int A = 0, qt = 0, B = 0;
    for (int i = 0; i < 40; ++i) {
        const int st = i % NST;
        if (i >= NST) mbar_wait(empty + 8 * st, ((i / NST) - 1) & 1);
        mbar_expect_tx(full + 8 * st, PIECE_BYTES);
        tma_load_2d(ring + st * PIECE_BYTES, smap, 0, (int)(row0 + piece_offset(A, qt, B)), full + 8 * st);
        if (++B == 4) {
            A += qt == 3;
            qt = (qt + 1) & 3;
            B = A;
        }
    }
}

// A consumer warp's side of the ring: the stage it reads next and that stage's parity.
struct StateRing {
    u32 base, full, empty;                    // shared addresses: the stages, full[NST], empty[NST]
    int st;
    u32 phase;
    // waits for the next piece; its shared address
    __device__ __forceinline__ u32 acquire() {
        mbar_wait(full + 8 * st, phase);
        return base + st * PIECE_BYTES;
    }
    // frees the piece (one arrival a warp, once every MMA reading it has completed) and moves on
    __device__ __forceinline__ void release(int lane) {
        if (lane == 0) mbar_arrive(empty + 8 * st);   // the warp is past the wait (aligned)
        if (++st == NST) {
            st = 0;
            phase ^= 1;
        }
    }
};

// The block's set-up, every thread: the barriers at bars (full, then empty, NST each; consumer_warps arrivals free a
// stage). Warps from producer_warp on (a whole warpgroup) give their registers up (setmaxnreg) and the first thread
// of them streams the state from row row0 of the tensor map smap into the ring at ring; true for those threads,
// which then leave.
__device__ __forceinline__ bool start_ring(const void* smap, long long row0, u32 ring, u32 bars, int consumer_warps,
                                           int producer_warp, StateRing& rs) {
    const int tid = threadIdx.x, warp = tid >> 5;
    rs = StateRing{ring, bars, bars + NST * 8, 0, 0};
    if (tid == 0) {
        for (int i = 0; i < NST; ++i) {
            mbar_init(rs.full + 8 * i, 1);                // the producer's arrival (and the piece's bytes)
            mbar_init(rs.empty + 8 * i, consumer_warps);
        }
        fence_barrier_init();
    }
    __syncthreads();
    if (warp < producer_warp) return false;
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (warp == producer_warp && (tid & 31) == 0) stream_state(smap, row0, ring, rs.full, rs.empty);
    return true;
}

// The dynamic shared memory from its first 1024-byte boundary (the swizzle's atoms)
__device__ __forceinline__ unsigned char* aligned_smem(unsigned char* raw) {
    return raw + ((1024 - (smem_u32(raw) & 1023)) & 1023);
}

// The query rows of a block of state_dq.cu / state_out.cu: BM rows of query head bh (blockIdx.y, batch-major) in
// chunk n >= 1 from row m0 (blockIdx.x counts blocks after chunk 0, which has no state); bkv its KV head, srow the
// first row of the state entering the chunk in the tensor map of SB [B*HKV, NC - 1, F, 64] as [rows, 64].
template <int BM>
struct QueryBlock {
    long long bh, bkv, Tp, srow;
    int m0, n;
    __device__ __forceinline__ QueryBlock(int NC, int C, int F, int HQ, int HKV) {
        bh = blockIdx.y;
        bkv = (bh / HQ) * HKV + (bh % HQ) / (HQ / HKV);
        Tp = (long long)NC * C;
        m0 = C + blockIdx.x * BM;
        n = m0 / C;
        srow = (bkv * (NC - 1) + n - 1) * (long long)F;
    }
};

// scale^2 exp(G_i), the factor of a query row's state part (scale^2 without a gate)
__device__ __forceinline__ float row_factor(int has_gate, double scale2, float gate) {
    return has_gate ? (float)scale2 * __expf(gate) : (float)scale2;
}

// (x, x) for the bf16 half h of the pair x
__device__ __forceinline__ u32 twice(u32 x, int h) {
    return h ? (x >> 16) | (x & 0xffff0000u) : (x & 0xffffu) | (x << 16);
}

// acc [32] = phi(x) S over the whole state, for this warpgroup's 64 rows (the thread's rows lrow, lrow + 8 of the
// x tile at xs, X_ROW bytes a row; lane quad c). phi_(a, b)(x) = bf16(w_ab x[a] x[b]), w_ab 1 if A == B and with
// PAIR_WEIGHTS 2 off the diagonal (else 1). acc[4 j + 2 h + k] is (row h, e = 8 j + 2c + k).
// Each piece's features are wgmma's A operand in registers (one bf16x2 multiply a register: x[a] twice by x's pair
// at the register's columns b, w_ab folded into those) times the piece (B, MN-major, 128-byte swizzle).
template <bool PAIR_WEIGHTS>
__device__ __forceinline__ void multiply_features(StateRing& ring, const unsigned char* xs, int lrow, int c, int lane,
                                                  float (&acc)[32]) {
    const u32 xrow[2] = {smem_u32(xs + lrow * X_ROW), smem_u32(xs + (lrow + 8) * X_ROW)};
    // x's pairs at the A registers' columns of block X: (row lrow, 2c), (lrow + 8, 2c), (lrow, 2c + 8), (lrow + 8,
    // 2c + 8), and doubled (off-diagonal pairs): exact in bf16
    u32 xb[4][4], xb2[4][4];
#pragma unroll
    for (int X = 0; X < 4; ++X)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            xb[X][j] = lds32(xrow[j & 1] + (16 * X + 2 * c + 8 * (j >> 1)) * 2);
            xb2[X][j] = PAIR_WEIGHTS ? mul_bf16x2(xb[X][j], 0x40004000u) : xb[X][j];
        }
#pragma unroll
    for (int A = 0; A < 4; ++A) {                         // the walk of stream_state: A, the quarter, B >= A
        for (int qt = 0; qt < 4; ++qt) {
            u32 xa[2][2];                                 // x[row h][16 A + 4 qt .. + 3] as two pairs
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint2 raw = *reinterpret_cast<const uint2*>(xs + (lrow + 8 * h) * X_ROW + (16 * A + 4 * qt) * 2);
                xa[h][0] = raw.x;
                xa[h][1] = raw.y;
            }
#pragma unroll
            for (int B = A; B < 4; ++B) {
                const u32 (&xx)[4] = A == B ? xb[B] : xb2[B];
                u32 af[4][4];                             // k slice i: a = 16 A + 4 qt + i, b = 16 B + 0 .. 15
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const u32 s0 = twice(xa[0][i >> 1], i & 1), s1 = twice(xa[1][i >> 1], i & 1);
                    af[i][0] = mul_bf16x2(s0, xx[0]);
                    af[i][1] = mul_bf16x2(s1, xx[1]);
                    af[i][2] = mul_bf16x2(s0, xx[2]);
                    af[i][3] = mul_bf16x2(s1, xx[3]);
                }
                const u32 piece = ring.acquire();
                wgmma_fence();
#pragma unroll
                for (int i = 0; i < 4; ++i)               // MN-major (features = K, e = N): a k slice is 16 rows
                    WGMMA_64x64x16(acc, af[i][0], af[i][1], af[i][2], af[i][3], desc_swz(piece + i * 2048), 1,
                                   A > 0 || qt > 0 || B > A || i > 0);   // the walk's first slice overwrites
                wgmma_commit();
                wgmma_wait<0>();
                ring.release(lane);
            }
        }
    }
}

// The fold: for every piece g = a S^T (M = 64 rows, N = 64 features, K = 64 = e; A = a from registers, wgmma's A
// fragments: k slice ks, register j: row + 8 (j & 1), e = 16 ks + 2c + 8 (j >> 1); B = the piece, K-major, 128-byte
// swizzle), then through the features of x (the tile at xs, as above):
//   dx[a] += w_ab sum_b g[(a, b)] x[b],  dx[b] += w_ab sum_a g[(a, b)] x[a]
// with w_ab 1 on diagonal pairs and with PAIR_WEIGHTS 2 off them (else 1). db [block X][row h][i] is the thread's
// share of dx at column 16 X + {2c, 2c+1, 2c+8, 2c+9}[i] (every lane of the quad holds its own columns): with
// PAIR_WEIGHTS at half weight (dx = 2 db), else dx = db. The fold runs on the CUDA cores while the other
// warpgroups' MMAs run.
//
// Fold, thread (row r = g or g + 8 of its warp's 16, lane quad c): a m64n64 accumulator holds, for each of the 4
// values of a in the piece, the columns b in {2c, 2c+1, 2c+8, 2c+9} of block B: the b sums finish in the thread
// (db[B], registers: A and B are unrolled), the a sums are partial over the quad's 4 threads and are summed over
// it once every block B of a quarter (A, qt) is done; the lanes that own those columns of block A (the same
// column set) add them to db[A]. With PAIR_WEIGHTS, diagonal pairs are folded at half weight (x_a halved for db,
// the partial a sums halved after the diagonal piece): exact.
template <bool PAIR_WEIGHTS>
__device__ __forceinline__ void fold_state(StateRing& ring, const u32 (&dn)[4][4], const unsigned char* xs, int lrow,
                                           int c, int lane, float (&db)[4][2][4]) {
    constexpr float HALF = PAIR_WEIGHTS ? 0.5f : 1.f;
    // the thread's x row h at 16 X + {2c, 2c+1} (low word) and {2c+8, 2c+9} (high word)
    const u32 xrow[2] = {smem_u32(xs + lrow * X_ROW + 4 * c), smem_u32(xs + (lrow + 8) * X_ROW + 4 * c)};
#pragma unroll
    for (int X = 0; X < 4; ++X)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int i = 0; i < 4; ++i) db[X][h][i] = 0.f;

    float acc[32];
#pragma unroll
    for (int A = 0; A < 4; ++A) {                         // unrolled with B: db's block index is a constant
        for (int qt = 0; qt < 4; ++qt) {
            float xa[2][4], da[2][4];                       // the quarter's x_a (halved on the diagonal), a sums
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const uint2 raw = *reinterpret_cast<const uint2*>(xs + (lrow + 8 * h) * X_ROW + (16 * A + 4 * qt) * 2);
                xa[h][0] = HALF * bf_lo(raw.x);
                xa[h][1] = HALF * bf_hi(raw.x);
                xa[h][2] = HALF * bf_lo(raw.y);
                xa[h][3] = HALF * bf_hi(raw.y);
#pragma unroll
                for (int a = 0; a < 4; ++a) da[h][a] = 0.f;
            }
#pragma unroll
            for (int B = A; B < 4; ++B) {
                const u64 dsc = desc_swz(ring.acquire());
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < 4; ++ks)                // K-major, 128-byte swizzle: a k slice is 32 bytes
                    WGMMA_64x64x16(acc, dn[ks][0], dn[ks][1], dn[ks][2], dn[ks][3], dsc + 2 * ks, 0, ks > 0);
                wgmma_commit();
                float xb[2][4];                               // x_b at the thread's columns of block B
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 lo = lds32(xrow[h] + 32 * B), hi = lds32(xrow[h] + 32 * B + 16);
                    xb[h][0] = bf_lo(lo);
                    xb[h][1] = bf_hi(lo);
                    xb[h][2] = bf_lo(hi);
                    xb[h][3] = bf_hi(hi);
                }
                wgmma_wait<0>();
                ring.release(lane);
                // acc[4 j + 2 h + k]: row h, a = j / 2 of the quarter, b index 2 (j & 1) + k
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int k = 0; k < 2; ++k) {
                            const int ib = 2 * (j & 1) + k;
                            da[h][j >> 1] = fmaf(acc[4 * j + 2 * h + k], xb[h][ib], da[h][j >> 1]);
                            db[B][h][ib] = fmaf(acc[4 * j + 2 * h + k], xa[h][j >> 1], db[B][h][ib]);
                        }
                if (PAIR_WEIGHTS && B == A) {                 // full weight after the diagonal piece
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int a = 0; a < 4; ++a) {
                            xa[h][a] *= 2.f;
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
}

// x . (the thread's db) over the row h, summed over the lane quad (every lane gets it)
__device__ __forceinline__ float dot_x(const float (&db)[4][2][4], const unsigned char* xs, int row, int c, int h) {
    const u32 xrow = smem_u32(xs + row * X_ROW + 4 * c);
    float dot = 0.f;
#pragma unroll
    for (int X = 0; X < 4; ++X) {
        const u32 lo = lds32(xrow + 32 * X), hi = lds32(xrow + 32 * X + 16);
        dot = fmaf(bf_lo(lo), db[X][h][0], dot);
        dot = fmaf(bf_hi(lo), db[X][h][1], dot);
        dot = fmaf(bf_lo(hi), db[X][h][2], dot);
        dot = fmaf(bf_hi(hi), db[X][h][3], dot);
    }
    dot += __shfl_xor_sync(0xffffffffu, dot, 1);
    return dot + __shfl_xor_sync(0xffffffffu, dot, 2);
}

// out[row][16 X + 2c ...] = f db: the thread's columns of dx (db's layout) to an fp32 row of 64
__device__ __forceinline__ void store_db(float* out, const float (&db)[4][2][4], int h, int c, float f) {
#pragma unroll
    for (int X = 0; X < 4; ++X) {
        *reinterpret_cast<float2*>(out + 16 * X + 2 * c) = make_float2(f * db[X][h][0], f * db[X][h][1]);
        *reinterpret_cast<float2*>(out + 16 * X + 2 * c + 8) = make_float2(f * db[X][h][2], f * db[X][h][3]);
    }
}

// out[row][8 j + 2c + k] = f acc[4 j + 2 h + k]: multiply_features' accumulator, row h, to an fp32 row of 64
__device__ __forceinline__ void store_acc(float* out, const float (&acc)[32], int h, int c, float f) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
        *reinterpret_cast<float2*>(out + 8 * j + 2 * c) = make_float2(f * acc[4 * j + 2 * h], f * acc[4 * j + 2 * h + 1]);
}

// 64 rows of x (global, 64 bf16 a row) by one warpgroup (thread wt of it): load() into registers, so that the
// caller's other global loads can follow, then store() into the x tile at xs (the tile row of the first of them)
struct XRows64 {
    uint4 v[4];
    __device__ __forceinline__ void load(const u16* x, int wt) {
#pragma unroll
        for (int it = 0; it < 4; ++it) {
            const int k = wt + 128 * it;
            v[it] = *reinterpret_cast<const uint4*>(x + (k >> 3) * 64 + (k & 7) * 8);
        }
    }
    __device__ __forceinline__ void store(unsigned char* xs, int wt) const {
#pragma unroll
        for (int it = 0; it < 4; ++it) {
            const int k = wt + 128 * it;
            *reinterpret_cast<uint4*>(xs + (k >> 3) * X_ROW + (k & 7) * 16) = v[it];
        }
    }
};
