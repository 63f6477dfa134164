// Chunked power retention, deg 2: the states between chunks, one feature step a block, on Hopper's warpgroup MMA
// (wgmma, sm_90a). Same inputs, outputs and feature order as the Triton kernel ``_state_deltas`` (chunk_triton.py)
// for bf16, d = e = 64, column blocks of FB = 16 and steps of FA = 16 values of ``a`` (256 features); block ``NS``
// of each segment writes the normaliser state Z. Chunk n's own contribution:
//   forward  (X = K, Y = V):   S_n[f, :] = sum_j phi_f(k_j) w_j v_j,             w_j = exp(G_end - G_j)
//                              Z_n       = sum_j w_j k_j k_j^T
//   backward (X = Q, Y = dO):  dS_n[f, :] = scale^2 w_f sum_i phi_f(q_i) w_i do_i,  w_i = exp(G_i) / den_i
//                              dZ_n       = -scale^2 sum_i w_i delta_i q_i q_i^T   (summed over the KV head's
//                              query heads)
// with f = a_local * 16 + b_local, phi_f(x) = x[ca + a_local] * x[cb + b_local] (the step's columns). A block walks
// the slots of its segment of chunks in order, slot m holding chunk n = m (forward) or n = m + 1 (backward), and
// sums them in fp32 registers, X_m = decay_n X_prev + S_n with decay_n = exp(G at chunk n's last token), walking
// forward (backward: from the last slot), from zero at the segment's start; it writes every X_m. With one segment
// these are the states; with more, chunk_triton._scan adds what each segment inherits from the ones before it.
//
// The features are wgmma's A operand, built in its register layout (4 bf16x2 multiplies a warp and 16 features)
// from x_a^T, which carries the token weights (bf16(w_t x_t[a])), and the raw x_b columns; Y goes to the MMA as
// loaded (B operand, MN-major, 128-byte swizzle: 8 threads copy a token's row, one L2 line). Tokens come in tiles
// of 64 through a ring of 4 cp.async stages (two tiles in flight while one is multiplied), across chunk boundaries;
// a tile's x_a^T is written by all threads one tile ahead. The 4 MMAs of a 16-token slice run while the next
// slice's features are built (one wgmma group in flight). Z's block multiplies (w x)^T, split into three bf16 parts
// (hi + mid + lo: fp32's 24 bits), by x on the same MMAs: fp32-exact products, fp32 sums; its 3 MMAs of a slice
// also run while the next slice's parts are built.
//
// Block: one warpgroup (128 threads), grid (steps + 1, segments, B*Hkv). Accumulator: 4 m64n64 tiles (warp w,
// tile i holds features a_local = 4i + w). No includes: compiles under NVRTC or nvcc alone.

#define D 64
#define E 64
#define FT 256
#define KT 64                                 // tokens a tile
#define NSTAGE 4
#define TILE_BYTES 8192                       // [64 tokens][64] bf16, 128-byte swizzle (swz_off)
#define XR 80                                 // bytes a token of the step's columns: a (32) | b (32) | 16 (banks)
#define OFF_X TILE_BYTES
#define OFF_G (OFF_X + KT * XR)               // G, den, delta of the tile's tokens (fp32)
#define OFF_DEN (OFF_G + 256)
#define OFF_DELTA (OFF_DEN + 256)
#define OFF_GEND (OFF_DELTA + 256)           // the gate sums of the tile's chunk's last 4 tokens
#define STAGE_BYTES ((OFF_GEND + 128 + 1023) / 1024 * 1024)   // stages aligned to the tile's swizzle atom
#define XA_ROW 144                            // bytes a row (a) of x_a^T: 64 tokens + 16 (banks)
#define XAT_BYTES (16 * XA_ROW)
#define OFF_XAT (NSTAGE * STAGE_BYTES)        // two x_a^T buffers (tiles alternate)
#define OFF_WZ (OFF_XAT + 2 * XAT_BYTES)      // Z's block: two buffers of the tile's 64 weights
#define OUT_ROW 144                           // bytes a feature row of the staged output
#define OFF_OUT (OFF_WZ + 2 * 256)
#define SMEM_BYTES (OFF_OUT + FT * OUT_ROW + 1024)   // + the alignment of the stages to 1024 bytes

#include "hopper_common.cuh"

__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ u16 lds16(u32 addr) {
    unsigned short v;
    asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
    return v;
}

extern "C" __global__ void __launch_bounds__(128, 2)
power_state_deltas(const u16* __restrict__ X, const u16* __restrict__ Y, const float* __restrict__ G,
                   const int* __restrict__ steps, u16* __restrict__ SB, float* __restrict__ ZB,
                   const float* __restrict__ DEN, const float* __restrict__ DELTA,
                   int NC, int C, int F, int NS, int HQ, int HKV, int backward, int has_gate, double post)
{
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);   // the swizzle's atoms
    const int s = blockIdx.x;
    const bool zrole = s == NS;
    const long long bkv = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int seg_len = (NC - 1 + gridDim.y - 1) / gridDim.y;
    const int m_lo = blockIdx.y * seg_len, m_hi = min(m_lo + seg_len, NC - 1);
    if (m_lo >= m_hi) return;
    const int ca = zrole ? 0 : steps[3 * s], cb = zrole ? 0 : steps[3 * s + 1];
    const float wab = zrole ? 1.f : (float)steps[3 * s + 2];
    const long long Tp = (long long)NC * C;
    const float* gp = G + bkv * Tp;
    const int rep = backward ? HQ / HKV : 1;
    const int tiles_head = C / KT;
    const int tiles_slot = rep * tiles_head;
    const int ntiles = (m_hi - m_lo) * tiles_slot;
    const u32 sbase = smem_u32(smem);
    auto slot = [&](int i) { return backward ? m_hi - 1 - i : m_lo + i; };   // the i-th slot walked (the scan's way)

    // the next tile to copy, in order: slot by slot, in a slot the chunk's tokens, query head by query head. A
    // cursor of counters (the divisions that located a tile from its index were most of a tile's instructions);
    // past the last tile it stays there and the copies fill zeros (nothing read), so that every thread still
    // commits one group a tile
    const long long xh0 = backward ? (bkv / HKV) * HQ + (bkv % HKV) * (HQ / HKV) : bkv;
    int cur_tile = 0, cur_rr = 0, cur_slot = 0, issued = 0;
    auto issue = [&]() {
        const u32 nb = issued < ntiles ? 16 : 0;
        const int n = slot(cur_slot) + backward;
        const long long xh = xh0 + cur_rr;
        const long long t0 = (long long)n * C + cur_tile * KT;
        const u16* xrow = X + (xh * Tp + t0) * D;
        const u32 st = sbase + (issued % NSTAGE) * STAGE_BYTES;
        const u16* tile = zrole ? xrow : Y + (xh * Tp + t0) * E;            // Z's block multiplies x by x
        copy_tile_swz<128>(st, tile, tid, nb);
        if (!zrole) {
#pragma unroll
            for (int it = 0; it < 2; ++it) {                               // the step's a and b columns
                const int k = tid + 128 * it, row = k >> 2, part = k & 3;
                const int col = part < 2 ? ca + 8 * part : cb + 8 * (part - 2);
                cp_async16_n(st + OFF_X + row * XR + part * 16, xrow + row * D + col, nb);
            }
        }
        const int q4 = (tid & 15) * 4;
        if (tid < 16 && has_gate) cp_async16_n(st + OFF_G + q4 * 4, gp + t0 + q4, nb);
        if (tid >= 16 && tid < 32 && backward) cp_async16_n(st + OFF_DEN + q4 * 4, DEN + xh * Tp + t0 + q4, nb);
        if (tid >= 32 && tid < 48 && backward && zrole)
            cp_async16_n(st + OFF_DELTA + q4 * 4, DELTA + xh * Tp + t0 + q4, nb);
        if (tid == 48 && has_gate) cp_async16_n(st + OFF_GEND, gp + (long long)n * C + C - 4, nb);
        cp_commit();
        const bool move = ++issued < ntiles, wrap_tile = cur_tile + 1 == tiles_head, wrap_rr = cur_rr + 1 == rep;
        cur_tile = move ? (wrap_tile ? 0 : cur_tile + 1) : cur_tile;
        cur_rr = move && wrap_tile ? (wrap_rr ? 0 : cur_rr + 1) : cur_rr;
        cur_slot = move && wrap_tile && wrap_rr ? cur_slot + 1 : cur_slot;
    };

    // token tk's weight (forward exp(G_end - G_j); backward exp(G_i) / den_i, den 0 -> 1; Z's backward: times
    // -delta_i), from tile t's stage
    auto weight = [&](const unsigned char* st, int tk) {
        const float gv = has_gate ? reinterpret_cast<const float*>(st + OFF_G)[tk] : 0.f;
        if (backward) {                                   // times the output scale: the epilogue only rounds
            const float den = reinterpret_cast<const float*>(st + OFF_DEN)[tk];
            float w = (float)post * wab / (den == 0.f ? 1.f : den);
            if (has_gate) w *= __expf(gv);
            return zrole ? -w * reinterpret_cast<const float*>(st + OFF_DELTA)[tk] : w;
        }
        return has_gate ? __expf(reinterpret_cast<const float*>(st + OFF_GEND)[3] - gv) : 1.f;
    };
    // the decay of the chunk whose tile t is: its whole gate, exp(G at its last token)
    auto decay = [&](int t) {
        return has_gate ? __expf(reinterpret_cast<const float*>(smem + (t % NSTAGE) * STAGE_BYTES + OFF_GEND)[3]) : 1.f;
    };

    // after tile t's loads landed: its weighted x_a^T (features' blocks) or its weights (Z's block)
    auto transform = [&](int t) {
        const unsigned char* st = smem + (t % NSTAGE) * STAGE_BYTES;
        if (zrole) {
            if (tid < KT) reinterpret_cast<float*>(smem + OFF_WZ + (t & 1) * 256)[tid] = weight(st, tid);
            return;
        }
        const int tk = tid & 63, hh = tid >> 6;                            // a token, 8 of its a values
        const float w = weight(st, tk);
        const uint4 raw = *reinterpret_cast<const uint4*>(st + OFF_X + tk * XR + hh * 16);
        const u32 wd[4] = {raw.x, raw.y, raw.z, raw.w};
        unsigned char* xat = smem + OFF_XAT + (t & 1) * XAT_BYTES + (8 * hh) * XA_ROW + 2 * tk;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 p = pack_bf16(bf_lo(wd[k]) * w, bf_hi(wd[k]) * w);
            *reinterpret_cast<u16*>(xat + (2 * k) * XA_ROW) = (u16)(p & 0xffffu);
            *reinterpret_cast<u16*>(xat + (2 * k + 1) * XA_ROW) = (u16)(p >> 16);
        }
    };

    // the end of tile t: tile t + 1 landed (and is transformed), tile t + NSTAGE - 1 goes into the stage tile t - 1
    // used (every warp is past its MMAs: a slice's wait leaves only the slice's own group in flight)
    auto advance = [&](int t) {
        cp_wait<NSTAGE - 3>();
        fence_async_smem();
        __syncthreads();
        issue();                                          // tile t + NSTAGE - 1
        transform(t + 1);
        __syncthreads();
    };

#pragma unroll
    for (int t = 0; t < NSTAGE - 1; ++t) issue();
    cp_wait<NSTAGE - 2>();
    fence_async_smem();
    __syncthreads();
    transform(0);
    __syncthreads();

    if (zrole) {
        // Z [a][b] = sum_t (w_t x_t[a]) x_t[b]: rows a = warp * 16 + g (+ 8), tokens 2c, 2c + 1 (+ 8) of a slice
        float z[32];
#pragma unroll
        for (int j = 0; j < 32; ++j) z[j] = 0.f;
        const int a0 = warp * 16 + g;
        u32 P[2][3][4];                                  // two slices' A parts (hi, mid, lo): one group in flight
        for (int t = 0; t < ntiles; ++t) {
            const u32 st = sbase + (t % NSTAGE) * STAGE_BYTES;
            const float* wz = reinterpret_cast<const float*>(smem + OFF_WZ + (t & 1) * 256);
#pragma unroll
            for (int sl = 0; sl < 4; ++sl) {
                u32 (&hi)[4] = P[sl & 1][0], (&mid)[4] = P[sl & 1][1], (&lo)[4] = P[sl & 1][2];
#pragma unroll
                for (int r = 0; r < 4; ++r) {            // A register r: row a0 + 8 (r & 1), tokens 2c (+ 8 (r >> 1))
                    const int a = a0 + 8 * (r & 1), tk = 16 * sl + 2 * c + 8 * (r >> 1);
                    const u32 col = st + (a & 7) * 2;           // tokens tk, tk + 1: rows of the swizzled tile
                    const float v0 = __uint_as_float((u32)lds16(col + swz_off(tk, a >> 3)) << 16) * wz[tk];
                    const float v1 = __uint_as_float((u32)lds16(col + swz_off(tk + 1, a >> 3)) << 16) * wz[tk + 1];
                    hi[r] = pack_bf16(v0, v1);
                    const float e0 = v0 - bf_lo(hi[r]), e1 = v1 - bf_hi(hi[r]);
                    mid[r] = pack_bf16(e0, e1);
                    lo[r] = pack_bf16(e0 - bf_lo(mid[r]), e1 - bf_hi(mid[r]));
                }
                wgmma_fence();
                const u64 dsc = desc_swz(st + sl * 2048);               // x: MN-major (tokens = K, b = N)
                WGMMA_64x64x16(z, hi[0], hi[1], hi[2], hi[3], dsc, 1, 1);
                WGMMA_64x64x16(z, mid[0], mid[1], mid[2], mid[3], dsc, 1, 1);
                WGMMA_64x64x16(z, lo[0], lo[1], lo[2], lo[3], dsc, 1, 1);
                wgmma_commit();
                wgmma_wait<1>();
            }
            if (t + 1 < ntiles) advance(t);
            if ((t + 1) % tiles_slot == 0) {                 // the slot's last tile: write it, then decay or restart
                wgmma_wait<0>();
                float* zo = ZB + (bkv * (NC - 1) + slot(t / tiles_slot)) * (long long)(D * D);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int col = 8 * j + 2 * c;
                    *reinterpret_cast<float2*>(zo + a0 * D + col) = make_float2(z[4 * j], z[4 * j + 1]);
                    *reinterpret_cast<float2*>(zo + (a0 + 8) * D + col) =
                        make_float2(z[4 * j + 2], z[4 * j + 3]);
                }
                const float dk = t + 1 < ntiles ? decay(t + 1) : 0.f;
#pragma unroll
                for (int j = 0; j < 32; ++j) z[j] *= dk;
            }
        }
        cp_wait<0>();
        return;
    }

    float acc[4][32];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 32; ++j) acc[i][j] = 0.f;

    // ldmatrix row address of this lane inside a slice's x_b block: matrix j = lane / 8 (tokens (j/2)*8.., columns
    // (j%2)*8..), row lane % 8
    const u32 xb_lane = OFF_X + (((lane >> 4) << 3) + (lane & 7)) * XR + 32 + ((lane >> 3) & 1) * 16;
    const u32 xa_lane = OFF_XAT + warp * XA_ROW + 4 * c;
    u32 A[2][4][4];
    for (int t0 = 0; t0 < ntiles; t0 += tiles_slot) {                 // a slot's tiles
        for (int t = t0; t < t0 + tiles_slot; ++t) {
            const u32 st = sbase + (t % NSTAGE) * STAGE_BYTES;
            const u32 xat = sbase + xa_lane + (t & 1) * XAT_BYTES;
#pragma unroll
            for (int sl = 0; sl < 4; ++sl) {
                u32 (&a)[4][4] = A[sl & 1];
                u32 r0, r1, r2, r3;
                ldsm_x4_trans(st + xb_lane + sl * 16 * XR, r0, r1, r2, r3);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const u32 row = xat + 4 * i * XA_ROW + sl * 32;
                    const u32 lo = lds32(row), hi = lds32(row + 16);
                    a[i][0] = mul_bf16x2(lo, r0);
                    a[i][1] = mul_bf16x2(lo, r1);
                    a[i][2] = mul_bf16x2(hi, r2);
                    a[i][3] = mul_bf16x2(hi, r3);
                }
                wgmma_fence();
                const u64 dsc = desc_swz(st + sl * 2048);                     // Y: MN-major (tokens = K, e = N)
#pragma unroll
                for (int i = 0; i < 4; ++i) WGMMA_64x64x16(acc[i], a[i][0], a[i][1], a[i][2], a[i][3], dsc, 1, 1);
                wgmma_commit();
                wgmma_wait<1>();
            }
            if (t + 1 < ntiles) advance(t);
        }
        const int t = t0 + tiles_slot - 1;                  // the slot's last tile: write it, then decay or restart
        wgmma_wait<0>();
        __syncthreads();                                    // the previous slot's rows are written out
#pragma unroll
        for (int i = 0; i < 4; ++i) {                       // round to bf16, stage, write 16 bytes a thread
            const int f = (4 * i + warp) * 16 + g;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                unsigned char* o = smem + OFF_OUT + f * OUT_ROW + (8 * j + 2 * c) * 2;
                *reinterpret_cast<u32*>(o) = pack_bf16(acc[i][4 * j], acc[i][4 * j + 1]);
                *reinterpret_cast<u32*>(o + 8 * OUT_ROW) =
                    pack_bf16(acc[i][4 * j + 2], acc[i][4 * j + 3]);
            }
        }
        __syncthreads();
        u16* out = SB + ((bkv * (NC - 1) + slot(t / tiles_slot)) * (long long)F + (long long)s * FT) * E;
#pragma unroll
        for (int it = 0; it < FT * E * 2 / 16 / 128; ++it) {
            const int k = tid + 128 * it, row = k >> 3, col = k & 7;
            *reinterpret_cast<uint4*>(out + row * E + col * 8) =
                *reinterpret_cast<const uint4*>(smem + OFF_OUT + row * OUT_ROW + col * 16);
        }
        const float dk = t + 1 < ntiles ? decay(t + 1) : 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 32; ++j) acc[i][j] *= dk;     // a NaN goes on to the later slots, as in the scan
    }
    cp_wait<0>();
}
