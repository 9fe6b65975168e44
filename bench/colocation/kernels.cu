/*
 * Kernels of the colocation benchmark (bench/colocation). Compiled on the GPU machine by
 * run.sh with `nvcc -cubin -arch=sm_90 -O3` and loaded by the host programs with
 * cuModuleLoadData, so that the same module works natively and through a vgpu slice.
 *
 * bf16 values travel as their raw 16-bit patterns (unsigned short) except where the
 * tensor cores need __nv_bfloat16. Every entry point is extern "C" (unmangled names) and
 * takes only pointers (8 bytes), 64-bit counts, ints and floats.
 *
 *   fill_bf16     p[i] = bf16(scale * u(i, seed)), u uniform in [-1, 1) from a hash
 *   gemv_bf16     y = W x: W rows x cols row-major bf16, x and y bf16, fp32 accumulation;
 *                 one warp per row, 4 x 16-byte loads in flight per lane; cols % 1024 == 0
 *   gemm_nn       C = A B      A M x K, B K x N (row-major bf16), C M x N fp32
 *   gemm_tn       C = A^T B    A stored K x M
 *   gemm_nt       C = A B^T    B stored N x K
 *                 WMMA 16x16x16 bf16 fragments, fp32 accumulation, 128 x 128 x 32 block
 *                 tiles in shared memory (double-buffered through registers), 8 warps each
 *                 computing 64 x 32; M % 128 == N % 128 == K % 32 == 0
 *   relu_fwd      out = bf16(max(z, 0))
 *   relu_bwd      dz = act > 0 ? bf16(g * scale) : 0
 *   loss_grad     g = bf16 -> fp32 of out, times scale (gradient of 0.5*|out|^2)
 *   sgd_update    w = bf16(w - lr * dw)
 */
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

/* ---------------------------------------------------------------- bf16 bit helpers */

__device__ __forceinline__ float bf_bits_to_float(unsigned int bits16)
{
    return __uint_as_float(bits16 << 16);
}

/* Round to nearest even (NaN handling is irrelevant here). */
__device__ __forceinline__ unsigned short float_to_bf_bits(float f)
{
    unsigned int u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

/* Dot product of two packed bf16 pairs. */
__device__ __forceinline__ float dot2_bf16(unsigned int a, unsigned int b)
{
    float a_lo = __uint_as_float(a << 16), a_hi = __uint_as_float(a & 0xffff0000u);
    float b_lo = __uint_as_float(b << 16), b_hi = __uint_as_float(b & 0xffff0000u);
    return fmaf(a_lo, b_lo, a_hi * b_hi);
}

__device__ __forceinline__ float dot8_bf16(uint4 a, uint4 b)
{
    return dot2_bf16(a.x, b.x) + dot2_bf16(a.y, b.y) + dot2_bf16(a.z, b.z) + dot2_bf16(a.w, b.w);
}

__device__ __forceinline__ unsigned int hash_u64(unsigned long long i, unsigned int seed)
{
    unsigned int h = (unsigned int)i * 0x9e3779b1u ^ (unsigned int)(i >> 32) * 0x85ebca77u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

/* ---------------------------------------------------------------- fill */

extern "C" __global__ void fill_bf16(unsigned short *p, unsigned long long n, unsigned int seed,
                                     float scale)
{
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        float u = (float)(hash_u64(i, seed) >> 8) * (1.0f / 8388608.0f) - 1.0f;
        p[i] = float_to_bf_bits(u * scale);
    }
}

/* ---------------------------------------------------------------- GEMV */

#define GEMV_THREADS 256
#define GEMV_ROWS_PER_BLOCK (GEMV_THREADS / 32)

extern "C" __global__ void __launch_bounds__(GEMV_THREADS)
    gemv_bf16(const uint4 *__restrict__ W, const uint4 *__restrict__ x,
              unsigned short *__restrict__ y, int rows, int cols)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_ROWS_PER_BLOCK + (threadIdx.x >> 5);
    if (row >= rows)
        return;
    const int nvec = cols >> 3; /* 16-byte vectors per row; a multiple of 128 */
    const uint4 *w = W + (size_t)row * (size_t)nvec;
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int v = lane; v < nvec; v += 128) {
        uint4 w0 = w[v];
        uint4 w1 = w[v + 32];
        uint4 w2 = w[v + 64];
        uint4 w3 = w[v + 96];
        uint4 x0 = x[v];
        uint4 x1 = x[v + 32];
        uint4 x2 = x[v + 64];
        uint4 x3 = x[v + 96];
        acc0 += dot8_bf16(w0, x0) + dot8_bf16(w1, x1);
        acc1 += dot8_bf16(w2, x2) + dot8_bf16(w3, x3);
    }
    float acc = acc0 + acc1;
    for (int off = 16; off > 0; off >>= 1)
        acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0)
        y[row] = float_to_bf_bits(acc);
}

/* ---------------------------------------------------------------- GEMM (WMMA) */

#define BM 128
#define BN 128
#define BK 32
#define SPAD 8 /* bf16 elements of padding per shared row: keeps 16-byte and 32-byte alignment */
#define GEMM_THREADS 256

template <bool C, typename T, typename F> struct pick_type {
    typedef T type;
};
template <typename T, typename F> struct pick_type<false, T, F> {
    typedef F type;
};

/*
 * Copies a ROWS x COLS bf16 tile (COLS a multiple of 8, ROWS*COLS == 8 * 2 * GEMM_THREADS)
 * starting at g (leading dimension ld elements) into registers: two 16-byte vectors per
 * thread.
 */
template <int ROWS, int COLS>
__device__ __forceinline__ void tile_to_regs(const __nv_bfloat16 *__restrict__ g, int ld,
                                             uint4 r[2])
{
    const int vpr = COLS / 8;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int v = threadIdx.x + i * GEMM_THREADS;
        int row = v / vpr;
        int col = (v % vpr) * 8;
        r[i] = *reinterpret_cast<const uint4 *>(g + (size_t)row * (size_t)ld + col);
    }
}

template <int ROWS, int COLS>
__device__ __forceinline__ void regs_to_smem(__nv_bfloat16 *s, const uint4 r[2])
{
    const int vpr = COLS / 8;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int v = threadIdx.x + i * GEMM_THREADS;
        int row = v / vpr;
        int col = (v % vpr) * 8;
        *reinterpret_cast<uint4 *>(s + row * (COLS + SPAD) + col) = r[i];
    }
}

/*
 * AT: A is stored transposed (K x M, leading dimension M); else M x K (leading dimension K).
 * BT: B is stored transposed (N x K, leading dimension K); else K x N (leading dimension N).
 */
template <bool AT, bool BT>
__device__ __forceinline__ void gemm_body(const __nv_bfloat16 *__restrict__ A,
                                          const __nv_bfloat16 *__restrict__ B,
                                          float *__restrict__ C, int M, int N, int K)
{
    const int A_ROWS = AT ? BK : BM;
    const int A_COLS = AT ? BM : BK;
    const int B_ROWS = BT ? BN : BK;
    const int B_COLS = BT ? BK : BN;
    const int A_LD = A_COLS + SPAD;
    const int B_LD = B_COLS + SPAD;
    const int A_STAGE = A_ROWS * A_LD;
    const int B_STAGE = B_ROWS * B_LD;
    typedef typename pick_type<AT, wmma::col_major, wmma::row_major>::type a_layout;
    typedef typename pick_type<BT, wmma::col_major, wmma::row_major>::type b_layout;

    /* Sized for the larger variant of each (BM x (BK+SPAD) == 5120 >= BK x (BM+SPAD)). */
    __shared__ __align__(128) __nv_bfloat16 As[2 * BM * (BK + SPAD)];
    __shared__ __align__(128) __nv_bfloat16 Bs[2 * BN * (BK + SPAD)];

    const int warp = threadIdx.x >> 5;
    const int wm = warp >> 2; /* 0..1: 64-row half of the block tile */
    const int wn = warp & 3;  /* 0..3: 32-column quarter */
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int lda = AT ? M : K;
    const int ldb = BT ? K : N;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
            wmma::fill_fragment(acc[i][j], 0.0f);

    /* Start of the tile at k-offset k0 in global memory. */
#define A_TILE(k0) (AT ? A + (size_t)(k0) * lda + m0 : A + (size_t)m0 * lda + (k0))
#define B_TILE(k0) (BT ? B + (size_t)n0 * ldb + (k0) : B + (size_t)(k0) * ldb + n0)

    uint4 ra[2], rb[2];
    tile_to_regs<A_ROWS, A_COLS>(A_TILE(0), lda, ra);
    tile_to_regs<B_ROWS, B_COLS>(B_TILE(0), ldb, rb);
    regs_to_smem<A_ROWS, A_COLS>(As, ra);
    regs_to_smem<B_ROWS, B_COLS>(Bs, rb);
    __syncthreads();

    const int ktiles = K / BK;
    for (int kt = 0; kt < ktiles; kt++) {
        const int cur = kt & 1;
        const bool more = kt + 1 < ktiles;
        if (more) { /* global loads of the next tile overlap the math on this one */
            tile_to_regs<A_ROWS, A_COLS>(A_TILE((kt + 1) * BK), lda, ra);
            tile_to_regs<B_ROWS, B_COLS>(B_TILE((kt + 1) * BK), ldb, rb);
        }
        const __nv_bfloat16 *as = As + cur * A_STAGE;
        const __nv_bfloat16 *bs = Bs + cur * B_STAGE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, a_layout> fa[4];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, b_layout> fb[2];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int r = wm * 64 + i * 16;
                const __nv_bfloat16 *p = AT ? as + kk * A_LD + r : as + r * A_LD + kk;
                wmma::load_matrix_sync(fa[i], p, A_LD);
            }
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const int c = wn * 32 + j * 16;
                const __nv_bfloat16 *p = BT ? bs + c * B_LD + kk : bs + kk * B_LD + c;
                wmma::load_matrix_sync(fb[j], p, B_LD);
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 2; j++)
                    wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        if (more) {
            regs_to_smem<A_ROWS, A_COLS>(As + (cur ^ 1) * A_STAGE, ra);
            regs_to_smem<B_ROWS, B_COLS>(Bs + (cur ^ 1) * B_STAGE, rb);
        }
        __syncthreads();
    }
#undef A_TILE
#undef B_TILE

#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float *c = C + (size_t)(m0 + wm * 64 + i * 16) * (size_t)N + (n0 + wn * 32 + j * 16);
            wmma::store_matrix_sync(c, acc[i][j], N, wmma::mem_row_major);
        }
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    gemm_nn(const __nv_bfloat16 *A, const __nv_bfloat16 *B, float *C, int M, int N, int K)
{
    gemm_body<false, false>(A, B, C, M, N, K);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    gemm_tn(const __nv_bfloat16 *A, const __nv_bfloat16 *B, float *C, int M, int N, int K)
{
    gemm_body<true, false>(A, B, C, M, N, K);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)
    gemm_nt(const __nv_bfloat16 *A, const __nv_bfloat16 *B, float *C, int M, int N, int K)
{
    gemm_body<false, true>(A, B, C, M, N, K);
}

/* ---------------------------------------------------------------- training elementwise */

#define GRID_STRIDE(i, n)                                                                    \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void relu_fwd(const float *z, unsigned short *out, unsigned long long n)
{
    GRID_STRIDE(i, n)
    {
        float v = z[i];
        out[i] = float_to_bf_bits(v > 0.0f ? v : 0.0f);
    }
}

extern "C" __global__ void relu_bwd(const float *g, const unsigned short *act, unsigned short *dz,
                                    unsigned long long n, float scale)
{
    GRID_STRIDE(i, n)
    {
        float a = bf_bits_to_float(act[i]);
        dz[i] = a > 0.0f ? float_to_bf_bits(g[i] * scale) : (unsigned short)0;
    }
}

extern "C" __global__ void loss_grad(const unsigned short *out, float *g, unsigned long long n,
                                     float scale)
{
    GRID_STRIDE(i, n)
    {
        g[i] = bf_bits_to_float(out[i]) * scale;
    }
}

extern "C" __global__ void sgd_update(unsigned short *w, const float *dw, unsigned long long n,
                                      float lr)
{
    GRID_STRIDE(i, n)
    {
        w[i] = float_to_bf_bits(bf_bits_to_float(w[i]) - lr * dw[i]);
    }
}
