/*
 * Host<->device copy bandwidth with synchronous cuMemcpyHtoD / cuMemcpyDtoH.
 *
 * For pinned host memory (cuMemAllocHost) and, for reference, pageable memory
 * (malloc): a warm-up copy per direction, then `reps` timed copies of `mib` MiB per
 * direction; reports the median in GB/s (1e9 bytes/s). The data is checked after
 * the timed copies (HtoD from one buffer, DtoH into another, compared).
 * A failure in the pageable part is reported in the JSON and does not hide the
 * pinned result.
 *
 * Usage: bandwidth [mib=256] [reps=10]
 */
#include "cu_common.h"

#define MAX_REPS 64

typedef struct {
    const char *error;        /* NULL on success */
    double htod_gbps, dtoh_gbps;
    double htod_all[MAX_REPS], dtoh_all[MAX_REPS];
    int verified;
} result_t;

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    size_t i;
    uint32_t x = 2463534242u ^ seed;
    for (i = 0; i + 4 <= n; i += 4) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        memcpy(p + i, &x, 4);
    }
    for (; i < n; i++)
        p[i] = (unsigned char)i;
}

static CUresult run_copies(result_t *r, CUdeviceptr d, unsigned char *src, unsigned char *dst,
                           size_t bytes, int reps)
{
    double htod_s[MAX_REPS], dtoh_s[MAX_REPS];
    int k;

    fill(src, bytes, 7);
    memset(dst, 0, bytes);
    /* Warm-up: one copy each way (first-touch, mapping and registration costs). */
    CU_TRY(cuMemcpyHtoD(d, src, bytes));
    CU_TRY(cuMemcpyDtoH(dst, d, bytes));
    memset(dst, 0, bytes);

    for (k = 0; k < reps; k++) {
        uint64_t t0 = now_ns();
        CU_TRY(cuMemcpyHtoD(d, src, bytes));
        htod_s[k] = (double)(now_ns() - t0) / 1e9;
    }
    for (k = 0; k < reps; k++) {
        uint64_t t0 = now_ns();
        CU_TRY(cuMemcpyDtoH(dst, d, bytes));
        dtoh_s[k] = (double)(now_ns() - t0) / 1e9;
    }
    for (k = 0; k < reps; k++) {
        r->htod_all[k] = (double)bytes / htod_s[k] / 1e9;
        r->dtoh_all[k] = (double)bytes / dtoh_s[k] / 1e9;
    }
    r->htod_gbps = (double)bytes / median(htod_s, (size_t)reps) / 1e9;
    r->dtoh_gbps = (double)bytes / median(dtoh_s, (size_t)reps) / 1e9;
    r->verified = memcmp(src, dst, bytes) == 0;
    if (!r->verified)
        fprintf(stderr, "data read back differs from data written\n");
    return CUDA_SUCCESS;
}

static result_t bench_pinned(CUdeviceptr d, size_t bytes, int reps)
{
    result_t r;
    void *src = NULL, *dst = NULL;
    CUresult rc;
    memset(&r, 0, sizeof r);
    rc = cuMemAllocHost(&src, bytes);
    if (rc == CUDA_SUCCESS)
        rc = cuMemAllocHost(&dst, bytes);
    if (rc != CUDA_SUCCESS) {
        fprintf(stderr, "cuMemAllocHost(%zu) failed: %d (%s)\n", bytes, (int)rc,
                cu_err_name(rc));
        r.error = "cuMemAllocHost failed";
    } else if (run_copies(&r, d, src, dst, bytes, reps) != CUDA_SUCCESS) {
        r.error = "copy failed";
    }
    if (src != NULL)
        CU_CHECK(cuMemFreeHost(src));
    if (dst != NULL)
        CU_CHECK(cuMemFreeHost(dst));
    return r;
}

static result_t bench_pageable(CUdeviceptr d, size_t bytes, int reps)
{
    result_t r;
    unsigned char *src = malloc(bytes), *dst = malloc(bytes);
    memset(&r, 0, sizeof r);
    if (src == NULL || dst == NULL)
        r.error = "malloc failed";
    else if (run_copies(&r, d, src, dst, bytes, reps) != CUDA_SUCCESS)
        r.error = "copy failed";
    free(src);
    free(dst);
    return r;
}

static void print_result(const char *key, const result_t *r, int reps)
{
    int k;
    printf(",\"%s\":{", key);
    if (r->error != NULL) {
        printf("\"error\":");
        json_str(stdout, r->error);
        printf("}");
        return;
    }
    printf("\"htod_gbps\":%.3f,\"dtoh_gbps\":%.3f,\"verified\":%s,\"htod_all_gbps\":[",
           r->htod_gbps, r->dtoh_gbps, r->verified ? "true" : "false");
    for (k = 0; k < reps; k++)
        printf("%s%.3f", k ? "," : "", r->htod_all[k]);
    printf("],\"dtoh_all_gbps\":[");
    for (k = 0; k < reps; k++)
        printf("%s%.3f", k ? "," : "", r->dtoh_all[k]);
    printf("]}");
}

int main(int argc, char **argv)
{
    long mib = arg_long(argc, argv, 1, 256);
    int reps = (int)arg_long(argc, argv, 2, 10);
    size_t bytes = (size_t)mib << 20;
    cu_session s;
    CUdeviceptr d;
    result_t pinned, pageable;

    if (reps > MAX_REPS)
        reps = MAX_REPS;
    cu_open(&s, 0);
    CU_CHECK(cuMemAlloc(&d, bytes));
    pinned = bench_pinned(d, bytes, reps);
    pageable = bench_pageable(d, bytes, reps);

    printf("{");
    json_preamble(stdout, "bandwidth", &s);
    printf(",\"bytes\":%zu,\"reps\":%d", bytes, reps);
    print_result("pinned", &pinned, reps);
    print_result("pageable", &pageable, reps);
    printf("}\n");

    CU_CHECK(cuMemFree(d));
    cu_close(&s);
    if (pinned.error != NULL || pageable.error != NULL || !pinned.verified ||
        !pageable.verified)
        return 1;
    return 0;
}
