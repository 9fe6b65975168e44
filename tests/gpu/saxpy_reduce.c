/*
 * saxpy + reduction through the CUDA driver API, with deterministic output.
 *
 * Loads PTX for two kernels (saxpy_reduce_kernels.cu) with cuModuleLoadData: from
 * the file named by argv[1], or the embedded copy (saxpy_reduce_ptx.h) when argv[1]
 * is absent or "-". Computes y = a*x + y over n floats, reduces y to per-block
 * partial sums on the device, reduces the partials again on the device (one block),
 * copies everything back and prints results that must be byte-identical natively
 * and through a vgpu slice. Everything printed on stdout depends only on the
 * computation; diagnostics (which libcuda, which PTX) go to stderr.
 *
 * Exit status: 0 when the results match the host reference, 1 when not, 2 on a
 * driver error.
 *
 * Usage: saxpy_reduce [kernels.ptx|-] [n=1048576]
 * Build: gcc -O2 -I/usr/local/cuda/include -Ibench tests/gpu/saxpy_reduce.c -lcuda -ldl -lm
 */
#include "cu_common.h"

#include "saxpy_reduce_ptx.h"

#define BLOCK 256u         /* threads per block; reduce_sum needs a power of two <= 256 */
#define REDUCE_BLOCKS 256u /* blocks of the first reduction pass */

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long len;
    if (f == NULL) {
        perror(path);
        exit(2);
    }
    if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        perror(path);
        exit(2);
    }
    buf = malloc((size_t)len + 1);
    if (buf == NULL || fread(buf, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "%s: read failed\n", path);
        exit(2);
    }
    buf[len] = '\0';
    fclose(f);
    return buf;
}

static uint64_t fnv1a64(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i;
    for (i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

int main(int argc, char **argv)
{
    const char *ptx_path = argc > 1 ? argv[1] : "-";
    int n = (int)arg_long(argc, argv, 2, 1 << 20);
    float a = 2.0f;
    unsigned grid = ((unsigned)n + BLOCK - 1) / BLOCK;
    int n_partials = (int)REDUCE_BLOCKS;
    cu_session s;
    char *ptx_file = NULL;
    const char *ptx;
    CUmodule mod;
    CUfunction f_saxpy, f_reduce;
    CUdeviceptr dx, dy, dpart, dfinal;
    float *x = malloc((size_t)n * sizeof(float));
    float *y = malloc((size_t)n * sizeof(float));
    float *y_ref = malloc((size_t)n * sizeof(float));
    float partials[REDUCE_BLOCKS];
    float final_sum = 0.0f;
    double y_sum = 0.0, expected_sum = 0.0, partials_sum = 0.0, rel_err;
    long mismatches = 0;
    int ok;
    int i;

    if (x == NULL || y == NULL || y_ref == NULL) {
        fprintf(stderr, "out of host memory\n");
        return 2;
    }
    for (i = 0; i < n; i++) {
        x[i] = (float)(i % 97) * 0.5f;
        y[i] = (float)(i % 13) * 0.25f;
        y_ref[i] = a * x[i] + y[i];
        expected_sum += (double)y_ref[i];
    }

    if (strcmp(ptx_path, "-") == 0) {
        ptx = saxpy_reduce_ptx;
        fprintf(stderr, "ptx: embedded (saxpy_reduce_ptx.h)\n");
    } else {
        ptx = ptx_file = read_file(ptx_path);
        fprintf(stderr, "ptx: %s\n", ptx_path);
    }

    cu_open(&s, 0);
    CU_CHECK(cuModuleLoadData(&mod, ptx));
    CU_CHECK(cuModuleGetFunction(&f_saxpy, mod, "saxpy"));
    CU_CHECK(cuModuleGetFunction(&f_reduce, mod, "reduce_sum"));

    CU_CHECK(cuMemAlloc(&dx, (size_t)n * sizeof(float)));
    CU_CHECK(cuMemAlloc(&dy, (size_t)n * sizeof(float)));
    CU_CHECK(cuMemAlloc(&dpart, REDUCE_BLOCKS * sizeof(float)));
    CU_CHECK(cuMemAlloc(&dfinal, sizeof(float)));
    CU_CHECK(cuMemcpyHtoD(dx, x, (size_t)n * sizeof(float)));
    CU_CHECK(cuMemcpyHtoD(dy, y, (size_t)n * sizeof(float)));

    {
        void *params[] = {&n, &a, &dx, &dy};
        CU_CHECK(cuLaunchKernel(f_saxpy, grid, 1, 1, BLOCK, 1, 1, 0, NULL, params, NULL));
    }
    {
        void *params[] = {&dy, &dpart, &n};
        CU_CHECK(
            cuLaunchKernel(f_reduce, REDUCE_BLOCKS, 1, 1, BLOCK, 1, 1, 0, NULL, params, NULL));
    }
    {
        void *params[] = {&dpart, &dfinal, &n_partials};
        CU_CHECK(cuLaunchKernel(f_reduce, 1, 1, 1, BLOCK, 1, 1, 0, NULL, params, NULL));
    }
    CU_CHECK(cuCtxSynchronize());

    CU_CHECK(cuMemcpyDtoH(y, dy, (size_t)n * sizeof(float)));
    CU_CHECK(cuMemcpyDtoH(partials, dpart, sizeof partials));
    CU_CHECK(cuMemcpyDtoH(&final_sum, dfinal, sizeof final_sum));

    for (i = 0; i < n; i++) {
        y_sum += (double)y[i];
        if (memcmp(&y[i], &y_ref[i], sizeof(float)) != 0)
            mismatches++;
    }
    for (i = 0; i < (int)REDUCE_BLOCKS; i++)
        partials_sum += (double)partials[i];
    /* The partial sums are exact in float for these inputs; the final float sum rounds. */
    rel_err = expected_sum != 0.0 ? ((double)final_sum - expected_sum) / expected_sum : 0.0;
    if (rel_err < 0)
        rel_err = -rel_err;
    ok = mismatches == 0 && partials_sum == expected_sum && rel_err < 1e-6;

    printf("saxpy_reduce n=%d a=%.6f grid=%ux%u reduce=%ux%u+1x%u\n", n, (double)a, grid, BLOCK,
           REDUCE_BLOCKS, BLOCK, BLOCK);
    printf("y[0..3]:");
    for (i = 0; i < 4 && i < n; i++)
        printf(" %.6f", (double)y[i]);
    printf("\ny[n-4..n-1]:");
    for (i = n >= 4 ? n - 4 : 0; i < n; i++)
        printf(" %.6f", (double)y[i]);
    printf("\ny_sum: %.6f\n", y_sum);
    printf("y_fnv1a64: %016llx\n", (unsigned long long)fnv1a64(y, (size_t)n * sizeof(float)));
    printf("partials[0..3]: %.6f %.6f %.6f %.6f\n", (double)partials[0], (double)partials[1],
           (double)partials[2], (double)partials[3]);
    printf("partials_host_sum: %.6f\n", partials_sum);
    printf("reduce_device: %.6f\n", (double)final_sum);
    printf("expected_sum: %.6f\n", expected_sum);
    printf("y_mismatches: %ld\n", mismatches);
    printf("check: %s\n", ok ? "OK" : "MISMATCH");

    CU_CHECK(cuMemFree(dx));
    CU_CHECK(cuMemFree(dy));
    CU_CHECK(cuMemFree(dpart));
    CU_CHECK(cuMemFree(dfinal));
    CU_CHECK(cuModuleUnload(mod));
    cu_close(&s);
    free(ptx_file);
    free(x);
    free(y);
    free(y_ref);
    return ok ? 0 : 1;
}
