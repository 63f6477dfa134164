// Chunked power retention, deg 2: the forward's output kernel on Hopper's warpgroup MMA (wgmma, sm_90a). Same
// inputs and outputs as the Triton kernel ``_fwd_out`` (chunk_triton.py) for bf16, d = e = 64, column blocks of
// FB = 16 and feature steps of FA = 16 values of ``a``; the states ``S`` (bf16) and ``Z`` (fp32) between chunks
// come from the state-delta kernels and the scan. For query rows ``i`` of chunk ``n``:
//   num_i = sum_{j in chunk n, j <= i} w_ij v_j + r_i phi(q_i) S_{n-1},   w_ij = bf16((scale q_i.k_j)^2 e^{G_i - G_j})
//   den_i = sum_j w_ij + r_i q_i^T Z_{n-1} q_i,                           r_i = scale^2 e^{G_i}
//   o_i = num_i / den_i (den 0 -> 1); writes o (bf16), o (fp32) and den.
// Every product runs on wgmma with the A operand in registers: q for q k^T and for q Z; the power weights (the
// q k^T accumulator squared, gated, rounded) for w v; the features phi(q) = q_a q_b (4 bf16x2 multiplies a warp and
// 16 features) for phi(q) S. Z, fp32, is split into two bf16 halves (hi + lo: ~16 bits of mantissa; q is bf16,
// so q Z is exact to ~1e-5). B operands (K, V, S, Z) are in shared memory, no swizzle.
//
// Block: two warpgroups (256 threads) of 64 query rows each, grid (Tp / 128, B*Hq): S, the block's largest read
// (327 KB a chunk-head at d = 64), is read once for 128 rows. Key blocks (K, V and their gate sums) are double-
// buffered, the next one loading while the current one is multiplied; S streams in 64-feature pieces through 6
// cp.async stages (4 in flight), one group of 4 wgmma a warpgroup in flight while the next piece's features are
// built. The chunk must hold whole blocks (a multiple of 128). No includes: compiles under NVRTC or nvcc alone.

#define D 64
#define E 64
#define BM 128                               // query rows a block
#define FT 256
#define TILE_BYTES 8192                      // a [64 rows][64] bf16 tile: (row/8) 1024 + (16-byte column) 128 + (row%8) 16
#define SPIECE 64                            // S rows (features) a cp.async stage
#define SSTAGES 6
#define Q_ROW 144                            // the q tile, row-major with 16 bytes of padding (feature loads)
#define OFF_Q 0
#define OFF_STEPS (OFF_Q + BM * Q_ROW)       // the step table (<= 64 steps)
#define OFF_KV (OFF_STEPS + 768)             // two buffers of: K tile, V tile, the keys' 64 gate sums
#define KV_BYTES (2 * TILE_BYTES + 256)
#define OFF_S (OFF_KV + 2 * KV_BYTES)
#define SMEM_BYTES (OFF_S + SSTAGES * TILE_BYTES)   // Z's two halves reuse the first K and V tiles after the keys

#include "hopper_common.cuh"

// K-major B (rows = N, 16-byte chunks along K): LBO = next chunk (128), SBO = next 8 rows (1024)
// MN-major B (rows = K, chunks along N):       LBO = next 8 rows (1024), SBO = next chunk (128)

extern "C" __global__ void __launch_bounds__(256, 1)
power_forward_out(const u16* __restrict__ Q, const u16* __restrict__ K, const u16* __restrict__ V,
                  const float* __restrict__ G, const int* __restrict__ steps, const u16* __restrict__ SB,
                  const float* __restrict__ ZB, u16* __restrict__ O, float* __restrict__ O32, float* __restrict__ DEN,
                  int NC, int C, int F, int NS, int HQ, int HKV, int has_gate, double scale_d)
{
    extern __shared__ __align__(128) unsigned char smem[];
    const float scale = (float)scale_d;
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int m0 = blockIdx.x * BM, mw = m0 + 64 * wg;          // the block's and this warpgroup's first rows
    const long long bh = blockIdx.y;
    const long long bkv = (bh / HQ) * HKV + (bh % HQ) / (HQ / HKV);
    const long long Tp = (long long)NC * C;
    const int n = m0 / C, c0 = n * C;
    const int r0 = 64 * wg + warp * 16 + g, r1 = r0 + 8;         // this thread's two rows (of the block)
    const u16* qp = Q + (bh * Tp + m0) * D;
    const u16* kp = K + bkv * Tp * D;
    const u16* vp = V + bkv * Tp * E;
    const float* gp = G + bkv * Tp;
    const u16* sp = SB + (bkv * (NC - 1) + (n > 0 ? n - 1 : 0)) * (long long)F * E;
    const u32 sb = smem_u32(smem);
    const int npieces = NS * (FT / SPIECE);
    const int nkb = (m0 + BM - c0) / 64;                         // key blocks inside the chunk up to the block's end

    auto load_kv = [&](int b) {                                  // key block b (zeros past the last) and its gates
        const int bv = b < nkb ? b : nkb - 1;
        const u32 nb = b < nkb ? 16 : 0, buf = sb + OFF_KV + (b & 1) * KV_BYTES;
        const long long j0 = c0 + 64 * bv;
        copy_tile<256>(buf, kp + j0 * D, tid, nb);
        copy_tile<256>(buf + TILE_BYTES, vp + j0 * E, tid, nb);
        if (tid < 16 && has_gate) cp_async16_n(buf + 2 * TILE_BYTES + 16 * tid, gp + j0 + 4 * tid, nb);
        cp_commit();
    };
    auto load_piece = [&](int pc) {                              // S rows 64 pc .. (zeros past the last piece)
        const int pv = pc < npieces ? pc : npieces - 1;
        copy_tile<256>(sb + OFF_S + (pc % SSTAGES) * TILE_BYTES, sp + (long long)pv * SPIECE * E, tid,
                  pc < npieces ? 16 : 0);
        cp_commit();
    };

    // prologue, all in flight together: q, the step table, the first S pieces, the first key block
#pragma unroll
    for (int it = 0; it < 4; ++it) {
        const int k = tid + 256 * it, row = k >> 3, chunk = k & 7;
        cp_async16(sb + OFF_Q + row * Q_ROW + chunk * 16, qp + row * D + chunk * 8);
    }
    if (tid < 3 * NS) reinterpret_cast<int*>(smem + OFF_STEPS)[tid] = steps[tid];
    cp_commit();
    if (n > 0)
        for (int pc = 0; pc < SSTAGES - 2; ++pc) load_piece(pc);
    load_kv(0);
    const float gi0 = has_gate ? gp[m0 + r0] : 0.f, gi1 = has_gate ? gp[m0 + r1] : 0.f;
    cp_wait<0>();
    __syncthreads();
    u32 qa[4][4];                                                 // q as wgmma's A: (row, columns 16kk + 2c ..)
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        qa[kk][0] = lds32(sb + OFF_Q + r0 * Q_ROW + (16 * kk + 2 * c) * 2);
        qa[kk][1] = lds32(sb + OFF_Q + r1 * Q_ROW + (16 * kk + 2 * c) * 2);
        qa[kk][2] = lds32(sb + OFF_Q + r0 * Q_ROW + (16 * kk + 2 * c + 8) * 2);
        qa[kk][3] = lds32(sb + OFF_Q + r1 * Q_ROW + (16 * kk + 2 * c + 8) * 2);
    }

    // ---- inside the chunk: key blocks c0 .. m0 + 64 (a warpgroup stops at its own rows' block)
    float num[32], x[32];   // x: written by its first wgmma
#pragma unroll
    for (int j = 0; j < 32; ++j) num[j] = 0.f;
    float den0 = 0.f, den1 = 0.f;
    for (int b = 0; b < nkb; ++b) {
        cp_wait<0>();                                             // key block b landed (this thread's part) ...
        fence_async_smem();
        __syncthreads();                                          // ... every part; block b - 1's buffer is free
        load_kv(b + 1);
        const int j0 = c0 + 64 * b;
        if (j0 > mw) continue;                                    // the whole block is after this warpgroup's rows
        const u32 buf = sb + OFF_KV + (b & 1) * KV_BYTES;
        const float* gk = reinterpret_cast<const float*>(smem + OFF_KV + (b & 1) * KV_BYTES + 2 * TILE_BYTES);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)                           // the first slice overwrites x (scale-d 0)
            WGMMA_64x64x16(x, qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], desc(buf + kk * 256, 128, 1024), 0, kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        // weights: x is (row r0 | r1, key 8jb + 2c + {0, 1}) at x[4 jb + {0, 1}] | x[4 jb + {2, 3}]
        u32 p[16];
#pragma unroll
        for (int jb = 0; jb < 8; ++jb) {
            const int col = 8 * jb + 2 * c;
            const float2 gg = has_gate ? *reinterpret_cast<const float2*>(gk + col) : make_float2(0.f, 0.f);
            float w[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int row = m0 + (u < 2 ? r0 : r1), key = j0 + col + (u & 1);
                const float xs = x[4 * jb + u] * scale;
                const float gd = (u < 2 ? gi0 : gi1) - ((u & 1) ? gg.y : gg.x);
                w[u] = row >= key ? xs * xs * (has_gate ? __expf(gd) : 1.f) : 0.f;
            }
            p[2 * jb] = pack_bf16(w[0], w[1]);
            p[2 * jb + 1] = pack_bf16(w[2], w[3]);
            den0 += bf_lo(p[2 * jb]) + bf_hi(p[2 * jb]);
            den1 += bf_lo(p[2 * jb + 1]) + bf_hi(p[2 * jb + 1]);
        }
        // num += P V: P's A fragment for keys 16kk ..: (r0, 2c) p[4kk], (r1, 2c) p[4kk+1], (r0, 2c+8) p[4kk+2], ...
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            WGMMA_64x64x16(num, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3],
                           desc(buf + TILE_BYTES + kk * 2048, 1024, 128), 1, 1);
        wgmma_commit();
        wgmma_wait<0>();
    }

    // ---- the state entering the chunk: phi(q) S_{n-1} and q Z_{n-1} q (chunk 0: none)
    float acc[32], u[32];   // written by their first wgmma (zeroed by hand, the MMAs were serialised: C7515)
    if (n > 0) {
        cp_wait<0>();                                             // the trailing (empty) key group
        __syncthreads();                                          // every warpgroup is past the keys: Z goes there
        const float* zp = ZB + (bkv * (NC - 1) + n - 1) * D * D;
#pragma unroll
        for (int it = 0; it < 2; ++it) {                          // Z [a][b] (MN-major B: rows a = K, b = N)
            const int k = tid + 256 * it, row = item_row(k), chunk = item_chunk(k);
            const float4 z0 = *reinterpret_cast<const float4*>(zp + row * D + chunk * 8);
            const float4 z1 = *reinterpret_cast<const float4*>(zp + row * D + chunk * 8 + 4);
            const float zz[8] = {z0.x, z0.y, z0.z, z0.w, z1.x, z1.y, z1.z, z1.w};
            u32 hi[4], lo[4];
#pragma unroll
            for (int e2 = 0; e2 < 4; ++e2) {
                hi[e2] = pack_bf16(zz[2 * e2], zz[2 * e2 + 1]);
                lo[e2] = pack_bf16(zz[2 * e2] - bf_lo(hi[e2]), zz[2 * e2 + 1] - bf_hi(hi[e2]));
            }
            *reinterpret_cast<uint4*>(smem + OFF_KV + tile_off(row, chunk)) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
            *reinterpret_cast<uint4*>(smem + OFF_KV + TILE_BYTES + tile_off(row, chunk)) =
                make_uint4(lo[0], lo[1], lo[2], lo[3]);
        }
        fence_async_smem();
        __syncthreads();
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            WGMMA_64x64x16(u, qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], desc(sb + OFF_KV + kk * 2048, 1024, 128), 1,
                           kk > 0);
            WGMMA_64x64x16(u, qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3],
                           desc(sb + OFF_KV + TILE_BYTES + kk * 2048, 1024, 128), 1, 1);
        }
        wgmma_commit();
        const int* st_tab = reinterpret_cast<const int*>(smem + OFF_STEPS);
        u32 fa[2][4][4];
        int ca = 0;
        u32 qb[4];
        auto piece = [&](const int pc, u32 (&a)[4][4]) {          // a: this piece's A registers (two sets alternate)
            const int s = pc / (FT / SPIECE), part = pc % (FT / SPIECE);
            if (part == 0) {                                      // a new step: its b columns (x its weight)
                ca = st_tab[3 * s];
                const int cb = st_tab[3 * s + 1];
                const u32 w2 = st_tab[3 * s + 2] == 2 ? 0x40004000u : 0x3f803f80u;      // bf16x2 (w, w)
                qb[0] = mul_bf16x2(lds32(sb + OFF_Q + r0 * Q_ROW + (cb + 2 * c) * 2), w2);
                qb[1] = mul_bf16x2(lds32(sb + OFF_Q + r1 * Q_ROW + (cb + 2 * c) * 2), w2);
                qb[2] = mul_bf16x2(lds32(sb + OFF_Q + r0 * Q_ROW + (cb + 2 * c + 8) * 2), w2);
                qb[3] = mul_bf16x2(lds32(sb + OFF_Q + r1 * Q_ROW + (cb + 2 * c + 8) * 2), w2);
            }
            cp_wait<SSTAGES - 3>();                               // piece pc landed (this thread's part) ...
            fence_async_smem();
            __syncthreads();                                      // ... every part; piece pc - 2 is done everywhere
            load_piece(pc + SSTAGES - 2);                         // into piece pc - 2's stage
#pragma unroll
            for (int i = 0; i < 4; ++i) {                         // a = ca + 4 part + i: one k16 slice each
                const int col = ca + 4 * part + i;
                const u32 x0 = lds32(sb + OFF_Q + r0 * Q_ROW + (col & ~1) * 2);
                const u32 x1 = lds32(sb + OFF_Q + r1 * Q_ROW + (col & ~1) * 2);
                const u32 s0 = (col & 1) ? (x0 >> 16) | (x0 & 0xffff0000u) : (x0 & 0xffffu) | (x0 << 16);
                const u32 s1 = (col & 1) ? (x1 >> 16) | (x1 & 0xffff0000u) : (x1 & 0xffffu) | (x1 << 16);
                a[i][0] = mul_bf16x2(s0, qb[0]);
                a[i][1] = mul_bf16x2(s1, qb[1]);
                a[i][2] = mul_bf16x2(s0, qb[2]);
                a[i][3] = mul_bf16x2(s1, qb[3]);
            }
            const u32 st = sb + OFF_S + (pc % SSTAGES) * TILE_BYTES;
            wgmma_fence();
#pragma unroll
            for (int i = 0; i < 4; ++i)
                WGMMA_64x64x16(acc, a[i][0], a[i][1], a[i][2], a[i][3], desc(st + i * 2048, 1024, 128), 1,
                               pc > 0 || i > 0);
            wgmma_commit();
            wgmma_wait<1>();                                      // piece pc - 1 done in this warpgroup
        };
        for (int pc = 0; pc < npieces; pc += 2) {                 // npieces = 4 NS: even
            piece(pc, fa[0]);
            piece(pc + 1, fa[1]);
        }
        wgmma_wait<0>();
        cp_wait<0>();
    } else {
#pragma unroll
        for (int j = 0; j < 32; ++j) { acc[j] = 0.f; u[j] = 0.f; }
    }

    // ---- epilogue: den's state part q^T Z q from u (same (row, column) places as q's A fragments), then o
    float zq0 = 0.f, zq1 = 0.f;
#pragma unroll
    for (int jb = 0; jb < 8; ++jb) {
        const u32 qr0 = qa[jb >> 1][(jb & 1) ? 2 : 0], qr1 = qa[jb >> 1][(jb & 1) ? 3 : 1];
        zq0 += u[4 * jb] * bf_lo(qr0) + u[4 * jb + 1] * bf_hi(qr0);
        zq1 += u[4 * jb + 2] * bf_lo(qr1) + u[4 * jb + 3] * bf_hi(qr1);
    }
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {                          // the quad holds a row's 64 columns
        den0 += __shfl_xor_sync(0xffffffffu, den0, sh);
        den1 += __shfl_xor_sync(0xffffffffu, den1, sh);
        zq0 += __shfl_xor_sync(0xffffffffu, zq0, sh);
        zq1 += __shfl_xor_sync(0xffffffffu, zq1, sh);
    }
    const float rr0 = scale * scale * (has_gate ? __expf(gi0) : 1.f), rr1 = scale * scale * (has_gate ? __expf(gi1) : 1.f);
    den0 += zq0 * rr0;
    den1 += zq1 * rr1;
    const float inv0 = 1.f / (den0 == 0.f ? 1.f : den0), inv1 = 1.f / (den1 == 0.f ? 1.f : den1);
    const long long o0 = (bh * Tp + m0 + r0) * E, o1 = (bh * Tp + m0 + r1) * E;
#pragma unroll
    for (int jb = 0; jb < 8; ++jb) {
        const int col = 8 * jb + 2 * c;
        const float a0 = (num[4 * jb] + acc[4 * jb] * rr0) * inv0, a1 = (num[4 * jb + 1] + acc[4 * jb + 1] * rr0) * inv0;
        const float b0 = (num[4 * jb + 2] + acc[4 * jb + 2] * rr1) * inv1, b1 = (num[4 * jb + 3] + acc[4 * jb + 3] * rr1) * inv1;
        *reinterpret_cast<float2*>(O32 + o0 + col) = make_float2(a0, a1);
        *reinterpret_cast<float2*>(O32 + o1 + col) = make_float2(b0, b1);
        *reinterpret_cast<u32*>(O + o0 + col) = pack_bf16(a0, a1);
        *reinterpret_cast<u32*>(O + o1 + col) = pack_bf16(b0, b1);
    }
    if (c == 0) {
        DEN[bh * Tp + m0 + r0] = den0;
        DEN[bh * Tp + m0 + r1] = den1;
    }
}
