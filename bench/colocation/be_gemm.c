/*
 * be_gemm: a best-effort tenant of the colocation benchmark, a loop of bf16 GEMMs
 * (C = A B, n x n x n, fp32 accumulation on the tensor cores: gemm_nn in kernels.cu).
 *
 * Start: the three GEMM variants are checked exactly against a host reference on a small
 * size; A and B are filled on the device; two warm-up GEMMs, the second timed with events
 * (the exclusive GPU time of one GEMM when run alone); the start barrier (COLOC_READY /
 * COLOC_GO, see coloc_common.h). Then GEMMs are queued back to back for `seconds`, at most
 * `depth` in flight (an event per GEMM; the oldest is waited for before the next launch).
 * Throughput = GEMMs completed / wall time from the first launch to the last completion.
 *
 * `chunks` > 1 splits each GEMM into that many launches along M (shorter kernels; the
 * default is one kernel per GEMM).
 *
 * Usage: be_gemm KERNELS.cubin [seconds=10] [n=8192] [depth=2] [chunks=1]
 * stdout: one JSON object. Exit status: 0 ok, 1 check failed, 2 driver error.
 */
#include "coloc_common.h"

#define MAX_DEPTH 16

static CUresult gemm_once(const gemm_kernels *g, CUstream st, CUdeviceptr a, CUdeviceptr b,
                          CUdeviceptr c, int n, int chunks)
{
    int rows = n / chunks, i;
    for (i = 0; i < chunks; i++) {
        size_t off = (size_t)i * (size_t)rows * (size_t)n;
        CU_TRY(gemm_launch(g->nn, st, a + off * 2, b, c + off * 4, rows, n, n));
    }
    return CUDA_SUCCESS;
}

int main(int argc, char **argv)
{
    cu_session s;
    CUmodule mod;
    CUfunction fill;
    gemm_kernels g;
    CUstream st;
    CUevent ev[MAX_DEPTH], e0, e1;
    CUdeviceptr a, b, c;
    double seconds;
    int n, depth, chunks, k;
    long launched = 0;
    uint64_t t0, t1, stop_at;
    float gemm_ms = 0.0f;
    double flop;

    if (argc < 2) {
        fprintf(stderr, "usage: %s KERNELS.cubin [seconds=10] [n=8192] [depth=2] [chunks=1]\n",
                argv[0]);
        return 2;
    }
    seconds = arg_double(argc, argv, 2, 10.0);
    n = (int)arg_long(argc, argv, 3, 8192);
    depth = (int)arg_long(argc, argv, 4, 2);
    chunks = (int)arg_long(argc, argv, 5, 1);
    if (depth > MAX_DEPTH)
        depth = MAX_DEPTH;
    if (n % 128 != 0 || (n / chunks) % 128 != 0 || n % chunks != 0) {
        fprintf(stderr, "n and n/chunks must be multiples of 128\n");
        return 2;
    }
    flop = 2.0 * (double)n * (double)n * (double)n;

    cu_open(&s, 0);
    mod = load_module_file(argv[1]);
    g = gemm_kernels_load(mod);
    fill = get_function(mod, "fill_bf16");
    gemm_check_all(&g);

    CU_CHECK(cuStreamCreate(&st, CU_STREAM_NON_BLOCKING));
    CU_CHECK(cuMemAlloc(&a, (size_t)n * n * 2));
    CU_CHECK(cuMemAlloc(&b, (size_t)n * n * 2));
    CU_CHECK(cuMemAlloc(&c, (size_t)n * n * 4));
    CU_CHECK(fill_bf16(fill, st, a, (unsigned long long)n * n, 1u, 1.0f));
    CU_CHECK(fill_bf16(fill, st, b, (unsigned long long)n * n, 2u, 1.0f));
    for (k = 0; k < depth; k++)
        CU_CHECK(cuEventCreate(&ev[k], CU_EVENT_DISABLE_TIMING));
    CU_CHECK(cuEventCreate(&e0, CU_EVENT_DEFAULT));
    CU_CHECK(cuEventCreate(&e1, CU_EVENT_DEFAULT));

    CU_CHECK(gemm_once(&g, st, a, b, c, n, chunks));
    CU_CHECK(cuEventRecord(e0, st));
    CU_CHECK(gemm_once(&g, st, a, b, c, n, chunks));
    CU_CHECK(cuEventRecord(e1, st));
    CU_CHECK(cuStreamSynchronize(st));
    CU_CHECK(cuEventElapsedTime(&gemm_ms, e0, e1));
    fprintf(stderr, "warm-up gemm %dx%dx%d: %.3f ms, %.1f TFLOP/s\n", n, n, n, gemm_ms,
            flop / (gemm_ms * 1e-3) / 1e12);

    coloc_barrier("be_gemm");

    t0 = now_ns();
    stop_at = t0 + (uint64_t)(seconds * 1e9);
    while (now_ns() < stop_at) {
        int slot = (int)(launched % depth);
        if (launched >= depth)
            CU_CHECK(cuEventSynchronize(ev[slot]));
        CU_CHECK(gemm_once(&g, st, a, b, c, n, chunks));
        CU_CHECK(cuEventRecord(ev[slot], st));
        launched++;
    }
    CU_CHECK(cuStreamSynchronize(st));
    t1 = now_ns();

    printf("{");
    json_preamble(stdout, "be_gemm", &s);
    printf(",\"n\":%d,\"depth\":%d,\"chunks\":%d,\"check\":\"pass\"", n, depth, chunks);
    printf(",\"warmup_gemm_ms\":%.3f,\"warmup_tflops\":%.2f", gemm_ms,
           gemm_ms > 0 ? flop / (gemm_ms * 1e-3) / 1e12 : 0.0);
    printf(",\"seconds_planned\":%.3f,\"gemms\":%ld,\"seconds\":%.3f", seconds, launched,
           (double)(t1 - t0) / 1e9);
    printf(",\"gemms_per_s\":%.3f,\"tflops\":%.2f}\n", (double)launched / ((double)(t1 - t0) / 1e9),
           flop * (double)launched / ((double)(t1 - t0) / 1e9) / 1e12);
    fflush(stdout);

    cuMemFree(a);
    cuMemFree(b);
    cuMemFree(c);
    cu_close(&s);
    return 0;
}
