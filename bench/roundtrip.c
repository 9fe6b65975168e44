/*
 * Round-trip latency of a synchronous driver call.
 *
 * Times, one call at a time with CLOCK_MONOTONIC, after a warm-up:
 *   - cuCtxSynchronize on an idle context,
 *   - a 4-byte cuMemcpyDtoH into a pageable buffer.
 * Prints one JSON object line with p50/p90/p99/min/mean in microseconds.
 *
 * Usage: roundtrip [iterations=20000] [warmup=1000]
 */
#include "cu_common.h"

typedef struct {
    double p50, p90, p99, min, max, mean;
} stats_t;

static stats_t summarize(double *us, size_t n)
{
    stats_t st;
    double sum = 0.0;
    size_t i;
    for (i = 0; i < n; i++)
        sum += us[i];
    qsort(us, n, sizeof *us, cmp_double);
    st.p50 = percentile_sorted(us, n, 50.0);
    st.p90 = percentile_sorted(us, n, 90.0);
    st.p99 = percentile_sorted(us, n, 99.0);
    st.min = us[0];
    st.max = us[n - 1];
    st.mean = sum / (double)n;
    return st;
}

static void print_stats(const char *key, stats_t st)
{
    printf(",\"%s\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"min\":%.3f,\"max\":%.3f,"
           "\"mean\":%.3f}",
           key, st.p50, st.p90, st.p99, st.min, st.max, st.mean);
}

int main(int argc, char **argv)
{
    size_t iters = (size_t)arg_long(argc, argv, 1, 20000);
    size_t warmup = (size_t)arg_long(argc, argv, 2, 1000);
    cu_session s;
    CUdeviceptr dbuf;
    uint32_t pattern = 0xC0FFEE42u, readback = 0;
    double *sync_us = calloc(iters, sizeof(double));
    double *dtoh_us = calloc(iters, sizeof(double));
    stats_t sync_st, dtoh_st;
    size_t i;

    if (sync_us == NULL || dtoh_us == NULL) {
        fprintf(stderr, "out of host memory\n");
        return 2;
    }
    cu_open(&s, 0);
    CU_CHECK(cuMemAlloc(&dbuf, sizeof pattern));
    CU_CHECK(cuMemcpyHtoD(dbuf, &pattern, sizeof pattern));
    CU_CHECK(cuCtxSynchronize());

    for (i = 0; i < warmup; i++)
        CU_CHECK(cuCtxSynchronize());
    for (i = 0; i < iters; i++) {
        uint64_t t0 = now_ns();
        CU_CHECK(cuCtxSynchronize());
        sync_us[i] = (double)(now_ns() - t0) / 1e3;
    }

    for (i = 0; i < warmup; i++)
        CU_CHECK(cuMemcpyDtoH(&readback, dbuf, sizeof readback));
    for (i = 0; i < iters; i++) {
        uint64_t t0 = now_ns();
        CU_CHECK(cuMemcpyDtoH(&readback, dbuf, sizeof readback));
        dtoh_us[i] = (double)(now_ns() - t0) / 1e3;
    }
    if (readback != pattern) {
        fprintf(stderr, "cuMemcpyDtoH read 0x%08x, expected 0x%08x\n", readback, pattern);
        return 1;
    }

    sync_st = summarize(sync_us, iters);
    dtoh_st = summarize(dtoh_us, iters);
    printf("{");
    json_preamble(stdout, "roundtrip", &s);
    printf(",\"iterations\":%zu,\"warmup\":%zu", iters, warmup);
    print_stats("ctx_synchronize_us", sync_st);
    print_stats("dtoh_4b_us", dtoh_st);
    printf("}\n");

    CU_CHECK(cuMemFree(dbuf));
    cu_close(&s);
    free(sync_us);
    free(dtoh_us);
    return 0;
}
