// Shared by the hand-written Hopper kernels (included by state_deltas.cu, forward_out.cu and state_stream.cuh;
// hopper.py pastes it in for NVRTC): bf16 packing, shared-memory addresses, wgmma's descriptor, instruction and
// fences, cp.async, mbarriers, the bulk tensor copy. No includes of its own: NVRTC needs none.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ float bf_lo(u32 x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf_hi(u32 x) { return __uint_as_float(x & 0xffff0000u); }
__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// wgmma shared-memory descriptor, no swizzle: start address, LBO (K direction), SBO (M / N direction), bytes
__device__ __forceinline__ u64 desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3ffff) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}

// d [32 floats] (+)= A (4 registers of bf16x2, this thread's fragment) x B (descriptor dsc); TB 1: B is MN-major;
// SD 0: d is overwritten (scale-d), 1: accumulated
#define WGMMA_64x64x16(d, a0, a1, a2, a3, dsc, TB, SD)                                                         \
    asm volatile(                                                                                           \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                        \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "                                             \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                           \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                 \
        "{%32, %33, %34, %35}, %36, p, 1, 1, " #TB ";\n}\n"                                                 \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),   \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),          \
          "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),        \
          "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),        \
          "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                             \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(dsc), "r"((int)(SD)))

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// the same, copying src_bytes (0 or 16) and filling the rest with zeros: a predicate without a branch (a branch
// around cp.async inside a wgmma loop made ptxas serialise the loop's wgmma: C7515)
__device__ __forceinline__ void cp_async16_n(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
    return v;
}

// a [64 rows][64] bf16 tile in wgmma's no-swizzle layout: byte offset of (row, 16-byte column chunk); core matrices
// of 8 rows x 16 bytes, 8 chunks a row group
__device__ __forceinline__ u32 tile_off(int row, int chunk) { return (row >> 3) * 1024 + chunk * 128 + (row & 7) * 16; }
// item k (of 512) of such a tile when threads copy it 16 bytes at a time: 8 consecutive threads take one chunk of 8
// consecutive rows (one core matrix: no bank conflict in shared memory; a warp reads whole 64-byte row pieces)
__device__ __forceinline__ int item_row(int k) { return ((k >> 6) << 3) | (k & 7); }
__device__ __forceinline__ int item_chunk(int k) { return (k >> 3) & 7; }
// a [64 rows][64] bf16 block of global memory (row stride 64) into such a tile, copied by THREADS threads
// (512 / THREADS cp.async each); src_bytes 0: zeros, nothing read
template <int THREADS>
__device__ __forceinline__ void copy_tile(u32 tile, const u16* src, int tid, u32 src_bytes) {
#pragma unroll
    for (int it = 0; it < 512 / THREADS; ++it) {
        const int k = tid + THREADS * it, row = item_row(k), chunk = item_chunk(k);
        cp_async16_n(tile + tile_off(row, chunk), src + row * 64 + chunk * 8, src_bytes);
    }
}
// the same tile in the 128-byte swizzle (wgmma's swizzle mode 1): row r (128 bytes) at r * 128, its 16-byte chunk c
// at (c ^ (r % 8)) * 16; 8 rows make a 1024-byte atom (the tile must be 1024-byte aligned). 8 threads copy one row,
// a whole L2 line, into 8 different bank groups
__device__ __forceinline__ u32 swz_off(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }
template <int THREADS>
__device__ __forceinline__ void copy_tile_swz(u32 tile, const u16* src, int tid, u32 src_bytes) {
#pragma unroll
    for (int it = 0; it < 512 / THREADS; ++it) {
        const int k = tid + THREADS * it, row = k >> 3, chunk = k & 7;
        cp_async16_n(tile + swz_off(row, chunk), src + row * 64 + chunk * 8, src_bytes);
    }
}
// wgmma's descriptor of such a tile read from addr: 8-row atoms 1024 bytes apart (K-major: a k slice of 16 starts
// 32 bytes into the rows; MN-major with N = 64, one atom wide: 16 rows further)
__device__ __forceinline__ u64 desc_swz(u32 addr) { return desc(addr, 16, 1024) | (1ull << 62); }

// mbarriers (state_stream.cuh)
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// makes the initialised barriers visible to the bulk copies (the async proxy) that complete on them
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_async_smem();
}
// arrives on the barrier and expects its phase to also wait for `bytes` of bulk copies
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// The bulk tensor copy engine (TMA): the box at coordinates (c0, c1) of the tensor map at tmap (a CUtensorMap in
// global memory, hopper.tensor_map) into shared memory at dst, its bytes counted on the barrier bar. Before the first
// copy through a map written by ordinary stores (hopper.tensor_map's fill kernels), the map is fenced for the
// tensor-map proxy.
__device__ __forceinline__ void tensormap_acquire(const void* tmap) {
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(tmap) : "memory");
}
__device__ __forceinline__ void tma_load_2d(u32 dst, const void* tmap, int c0, int c1, u32 bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
                 "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst), "l"(tmap), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// spins until the barrier's phase with this parity has completed
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void named_sync(u32 id, u32 count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
