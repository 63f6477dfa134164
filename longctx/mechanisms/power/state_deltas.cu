// Chunked power retention, deg 2: every chunk's own contribution to the state, one feature step a block, on
// Hopper's warpgroup MMA (wgmma, sm_90a). Same inputs, outputs and feature order as the Triton kernel
// ``_state_deltas`` (chunk_triton.py) for bf16, d a multiple of 16 (hopper.py admits d = 64, the size tested), e = 64,
// column blocks of FB = 16 and steps of FA = 16 values of ``a`` (256 features):
//   forward  (X = K, Y = V):   S_m[f, :] = sum_j phi_f(k_j) beta_j v_j,  beta_j = exp(G_end - G_j),  n = m
//   backward (X = Q, Y = dO):  dS_m[f, :] = scale^2 w_f sum_i phi_f(q_i) exp(G_i) do_i / den_i,      n = m + 1
//                              (summed over the KV head's query heads)
// with f = a_local * 16 + b_local, phi_f(x) = x[ca + a_local] * x[cb + b_local] (the step's columns).
//
// Why a hand-written kernel: the matrix product's A operand (the features) is computed, not loaded. Here it is
// built directly in wgmma's register layout (4 bf16x2 multiplies a warp and 16 features), the B operand (the
// weighted Y, transposed) is staged once a tile in shared memory by all threads, and the MMAs of one 16-token
// slice run while the next slice's features are built (one wgmma group in flight).
//
// Block: one warpgroup (128 threads), grid (steps, chunks - 1, B*Hkv). Accumulator: 4 m64n64 tiles (warp w, tile
// i holds features a_local = 4i + w). Tokens come in tiles of 64 (4 slices of 16), double-buffered in shared
// memory; the next tile's global loads are issued before the current tile's MMAs.
// No includes: compiles under NVRTC or nvcc alone.

#define E 64
#define FT 256
#define KT 64
#define SBO 272                              // bytes between 8-row groups (e) of a Y^T slice: 256 + 16 (banks)
#define LBO 128                              // bytes between its two 8-token halves
#define SLICE_BYTES (8 * SBO)
#define YT_BYTES (4 * SLICE_BYTES)
#define XB_ROW 48                            // bytes per token row of the b columns (32 + 16: banks)
#define XB_BYTES (KT * XB_ROW)
#define XA_ROW 144                           // bytes per a row of x_a^T (128 + 16)
#define XA_BYTES (16 * XA_ROW)
#define BUF_BYTES (YT_BYTES + XB_BYTES + XA_BYTES)
#define OUT_ROW 144                          // bytes per feature row of the staged output
#define OUT_BYTES (FT * OUT_ROW)
#define SMEM_BYTES (2 * BUF_BYTES > OUT_BYTES ? 2 * BUF_BYTES : OUT_BYTES)

#include "hopper_common.cuh"

struct Tile {        // one thread's share of a 64-token tile, loaded from global memory
    uint4 y[4];      // Y[4tq + r][8eb .. 8eb + 7]
    uint2 xa[2];     // X[2p + r][ca + 4qd .. + 3]
    uint4 xb;        // X[tb][cb + 8hb .. + 7]
    float4 g;        // G (gate sums) of tokens 4tq .. 4tq + 3
    float4 den;      // and their normalisers (backward): the weights are formed in store(), a tile after the loads
};

__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

extern "C" __global__ void __launch_bounds__(128, 2)
power_state_deltas(const u16* __restrict__ X, const u16* __restrict__ Y, const float* __restrict__ G,
                   const int* __restrict__ steps, u16* __restrict__ SB, const float* __restrict__ DEN,
                   int NC, int C, int DK, int F, int HQ, int HKV, int backward, int has_gate, double post)
{
    __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
    const int s = blockIdx.x, m = blockIdx.y;
    const long long bkv = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int n = backward ? m + 1 : m;
    const int ca = steps[3 * s], cb = steps[3 * s + 1];
    const float wab = (float)steps[3 * s + 2];
    const long long Tp = (long long)NC * C;
    const int c0 = n * C;
    const float* gp = G + bkv * Tp;
    const float g_end = has_gate ? gp[c0 + C - 1] : 0.f;
    const int rep = backward ? HQ / HKV : 1;
    const int tiles_head = C / KT;
    const int ntiles = rep * tiles_head;
    // thread roles in the staging of a tile
    const int eb = tid & 7, tq = tid >> 3;           // Y: 4 tokens x 8 e
    const int p = tid & 31, qd = tid >> 5;           // x_a: 2 tokens x 4 a
    const int tb = tid >> 1, hb = tid & 1;           // x_b: 1 token x 8 b

    auto load = [&](int t, Tile& L) {
        const int rr = t / tiles_head;
        const long long xh = backward ? (bkv / HKV) * HQ + (bkv % HKV) * (HQ / HKV) + rr : bkv;
        const long long t0 = c0 + (long long)(t % tiles_head) * KT;
        const u16* xrow = X + (xh * Tp + t0) * DK;
        const u16* yrow = Y + (xh * Tp + t0) * E;
#pragma unroll
        for (int r = 0; r < 4; ++r)
            L.y[r] = *reinterpret_cast<const uint4*>(yrow + (long long)(4 * tq + r) * E + 8 * eb);
#pragma unroll
        for (int r = 0; r < 2; ++r)
            L.xa[r] = *reinterpret_cast<const uint2*>(xrow + (long long)(2 * p + r) * DK + ca + 4 * qd);
        L.xb = *reinterpret_cast<const uint4*>(xrow + (long long)tb * DK + cb + 8 * hb);
        const long long tw = t0 + 4 * tq;
        L.g = has_gate ? *reinterpret_cast<const float4*>(gp + tw) : make_float4(0.f, 0.f, 0.f, 0.f);
        L.den = backward ? *reinterpret_cast<const float4*>(DEN + xh * Tp + tw) : make_float4(1.f, 1.f, 1.f, 1.f);
    };

    auto weight = [&](float gv, float den) {    // forward exp(G_end - G_j); backward exp(G_i) / den_i (den 0 -> 1)
        if (backward) {
            const float inv = 1.f / (den == 0.f ? 1.f : den);
            return has_gate ? inv * __expf(gv) : inv;
        }
        return has_gate ? __expf(g_end - gv) : 1.f;
    };

    auto store = [&](const Tile& L, unsigned char* buf) {
        // Y^T, weighted, in wgmma's K-major core-matrix layout: (e, t) at (e/8) SBO + (e%8) 16 + (t/8) LBO + (t%8) 2
        const int tt = 4 * tq;                           // first of this thread's 4 tokens (tile-local)
        unsigned char* yt = buf + (tt >> 4) * SLICE_BYTES + eb * SBO + ((tt & 15) >> 3) * LBO + (tt & 7) * 2;
        const u32* y0 = reinterpret_cast<const u32*>(&L.y[0]);
        const u32* y1 = reinterpret_cast<const u32*>(&L.y[1]);
        const u32* y2 = reinterpret_cast<const u32*>(&L.y[2]);
        const u32* y3 = reinterpret_cast<const u32*>(&L.y[3]);
        const float w0 = weight(L.g.x, L.den.x), w1 = weight(L.g.y, L.den.y), w2 = weight(L.g.z, L.den.z),
                    w3 = weight(L.g.w, L.den.w);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int wd = j >> 1;
            float v0 = (j & 1) ? bf_hi(y0[wd]) : bf_lo(y0[wd]);
            float v1 = (j & 1) ? bf_hi(y1[wd]) : bf_lo(y1[wd]);
            float v2 = (j & 1) ? bf_hi(y2[wd]) : bf_lo(y2[wd]);
            float v3 = (j & 1) ? bf_hi(y3[wd]) : bf_lo(y3[wd]);
            uint2 pk = make_uint2(pack_bf16(v0 * w0, v1 * w1), pack_bf16(v2 * w2, v3 * w3));
            *reinterpret_cast<uint2*>(yt + j * 16) = pk;
        }
        // x_a^T: row a holds tokens 0..63
        unsigned char* xa = buf + YT_BYTES + XB_BYTES;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 lo = (k < 2 ? L.xa[0].x : L.xa[0].y), hi = (k < 2 ? L.xa[1].x : L.xa[1].y);
            const u32 v = (k & 1) ? ((lo >> 16) | (hi & 0xffff0000u)) : ((lo & 0xffffu) | (hi << 16));
            *reinterpret_cast<u32*>(xa + (4 * qd + k) * XA_ROW + 4 * p) = v;
        }
        *reinterpret_cast<uint4*>(buf + YT_BYTES + tb * XB_ROW + hb * 16) = L.xb;
    };

    float acc[4][32];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 32; ++j) acc[i][j] = 0.f;

    Tile L;
    load(0, L);
    store(L, smem);
    fence_async_smem();
    __syncthreads();
    if (ntiles > 1) load(1, L);

    const u32 sbase = smem_u32(smem);
    // ldmatrix row address of this lane inside a slice's x_b block: matrix j = lane / 8 (tokens (j/2)*8.., columns
    // (j%2)*8..), row lane % 8
    const u32 xb_lane = YT_BYTES + (((lane >> 4) << 3) + (lane & 7)) * XB_ROW + ((lane >> 3) & 1) * 16;
    const u32 xa_lane = YT_BYTES + XB_BYTES + warp * XA_ROW + 4 * c;
    u32 A[2][4][4];
    for (int t = 0; t < ntiles; ++t) {
        const u32 buf = sbase + (t & 1) * BUF_BYTES;
#pragma unroll
        for (int sl = 0; sl < 4; ++sl) {
            u32 (&a)[4][4] = A[sl & 1];
            u32 r0, r1, r2, r3;
            ldsm_x4_trans(buf + xb_lane + sl * 16 * XB_ROW, r0, r1, r2, r3);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 row = buf + xa_lane + 4 * i * XA_ROW + sl * 32;
                const u32 lo = lds32(row), hi = lds32(row + 16);
                a[i][0] = mul_bf16x2(lo, r0);
                a[i][1] = mul_bf16x2(lo, r1);
                a[i][2] = mul_bf16x2(hi, r2);
                a[i][3] = mul_bf16x2(hi, r3);
            }
            wgmma_fence();
            const u64 dsc = desc(buf + sl * SLICE_BYTES, LBO, SBO);     // K-major, no swizzle
#pragma unroll
            for (int i = 0; i < 4; ++i) WGMMA_64x64x16(acc[i], a[i][0], a[i][1], a[i][2], a[i][3], dsc, 0, 1);
            wgmma_commit();
            wgmma_wait<1>();
        }
        if (t + 1 < ntiles) {
            store(L, smem + ((t + 1) & 1) * BUF_BYTES);
            if (t + 2 < ntiles) load(t + 2, L);
            fence_async_smem();
            __syncthreads();
        }
    }
    wgmma_wait<0>();
    __syncthreads();

    // epilogue: scale, round to bf16, stage in shared memory, write 16 bytes a thread
    const float sc = backward ? (float)post * wab : 1.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int f = (4 * i + warp) * 16 + g;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            unsigned char* o = smem + f * OUT_ROW + (8 * j + 2 * c) * 2;
            *reinterpret_cast<u32*>(o) = pack_bf16(acc[i][4 * j] * sc, acc[i][4 * j + 1] * sc);
            *reinterpret_cast<u32*>(o + 8 * OUT_ROW) = pack_bf16(acc[i][4 * j + 2] * sc, acc[i][4 * j + 3] * sc);
        }
    }
    __syncthreads();
    u16* out = SB + ((bkv * (NC - 1) + m) * (long long)F + (long long)s * FT) * E;
#pragma unroll
    for (int it = 0; it < FT * E * 2 / 16 / 128; ++it) {
        const int k = tid + 128 * it, row = k >> 3, col = k & 7;
        *reinterpret_cast<uint4*>(out + row * E + col * 8) =
            *reinterpret_cast<const uint4*>(smem + row * OUT_ROW + col * 16);
    }
}
