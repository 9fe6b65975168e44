/*
 * Helpers shared by the colocation programs (lc_decode.c, be_gemm.c, be_train.c), on top of
 * bench/cu_common.h: module loading from a file, kernel launches, bf16 on the host, the
 * start barrier, the CUDA-graph entry points (looked up at run time) and the GEMM check.
 *
 * Build: gcc -O2 -I/usr/local/cuda/include -Ibench -Ibench/colocation prog.c -lcuda -ldl -lm
 */
#ifndef VGPU_COLOC_COMMON_H
#define VGPU_COLOC_COMMON_H

#include "cu_common.h"

#include <errno.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------ arguments, files */

/* Positive number from argv[i] if present, else def. */
static inline double arg_double(int argc, char **argv, int i, double def)
{
    char *end = NULL;
    double v;
    if (argc <= i)
        return def;
    v = strtod(argv[i], &end);
    if (end == argv[i] || *end != '\0' || !(v > 0.0)) {
        fprintf(stderr, "bad argument %s\n", argv[i]);
        exit(2);
    }
    return v;
}

static inline void *read_whole_file(const char *path, size_t *len_out)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long len;
    if (f == NULL) {
        fprintf(stderr, "%s: %s\n", path, strerror(errno));
        exit(2);
    }
    if (fseek(f, 0, SEEK_END) != 0 || (len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "%s: cannot size the file\n", path);
        exit(2);
    }
    buf = malloc((size_t)len + 1);
    if (buf == NULL || fread(buf, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "%s: read failed\n", path);
        exit(2);
    }
    buf[len] = '\0'; /* PTX must be NUL-terminated; harmless after a cubin */
    fclose(f);
    if (len_out != NULL)
        *len_out = (size_t)len;
    return buf;
}

/* Loads a cubin or PTX file with cuModuleLoadData. */
static inline CUmodule load_module_file(const char *path)
{
    CUmodule mod;
    size_t len = 0;
    void *image = read_whole_file(path, &len);
    CU_CHECK(cuModuleLoadData(&mod, image));
    free(image);
    fprintf(stderr, "module: %s (%zu bytes)\n", path, len);
    return mod;
}

static inline CUfunction get_function(CUmodule mod, const char *name)
{
    CUfunction f;
    CU_CHECK(cuModuleGetFunction(&f, mod, name));
    return f;
}

/* ------------------------------------------------------------------ launches */

/* Grid for a grid-stride elementwise kernel over n elements, 256 threads a block. */
static inline unsigned int elementwise_grid(unsigned long long n)
{
    unsigned long long blocks = (n + 255ull) / 256ull;
    if (blocks > 132ull * 16ull)
        blocks = 132ull * 16ull;
    return blocks == 0 ? 1u : (unsigned int)blocks;
}

static inline CUresult fill_bf16(CUfunction f, CUstream st, CUdeviceptr p, unsigned long long n,
                                 unsigned int seed, float scale)
{
    void *params[] = {&p, &n, &seed, &scale};
    return cuLaunchKernel(f, elementwise_grid(n), 1, 1, 256, 1, 1, 0, st, params, NULL);
}

/* ------------------------------------------------------------------ bf16 on the host */

static inline uint16_t host_f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float host_bf2f(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t host_hash(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* ------------------------------------------------------------------ start barrier */

/*
 * When COLOC_READY and COLOC_GO are set (run.sh sets them for every phase): creates the
 * file COLOC_READY, then waits until the file COLOC_GO exists, so that the programs of one
 * phase start measuring together whatever their set-up time. Gives up waiting after
 * COLOC_GO_TIMEOUT_S seconds (default 120) and starts anyway.
 */
static inline void coloc_barrier(const char *who)
{
    const char *ready = getenv("COLOC_READY");
    const char *go = getenv("COLOC_GO");
    const char *t = getenv("COLOC_GO_TIMEOUT_S");
    double timeout_s = t != NULL ? atof(t) : 120.0;
    uint64_t start = now_ns();
    struct stat sb;
    FILE *f;
    if (ready == NULL || go == NULL || ready[0] == '\0' || go[0] == '\0')
        return;
    f = fopen(ready, "w");
    if (f == NULL)
        fprintf(stderr, "%s: cannot create %s: %s\n", who, ready, strerror(errno));
    else
        fclose(f);
    fprintf(stderr, "%s: ready, waiting for %s\n", who, go);
    while (stat(go, &sb) != 0) {
        if ((double)(now_ns() - start) / 1e9 > timeout_s) {
            fprintf(stderr, "%s: no go after %.0f s, starting anyway\n", who, timeout_s);
            return;
        }
        usleep(500);
    }
    fprintf(stderr, "%s: go after %.3f s\n", who, (double)(now_ns() - start) / 1e9);
}

/* Sleeps until CLOCK_MONOTONIC reaches t_ns (returns at once if it has). */
static inline void sleep_until_ns(uint64_t t_ns)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(t_ns / 1000000000ull);
    ts.tv_nsec = (long)(t_ns % 1000000000ull);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* ------------------------------------------------------------------ CUDA graphs */

/*
 * The graph entry points, looked up at run time (so a library without them still runs the
 * program, without a graph). Handles are opaque pointers in both libraries.
 */
typedef struct {
    CUresult (*begin_capture)(CUstream, int); /* cuStreamBeginCapture_v2(stream, mode) */
    CUresult (*end_capture)(CUstream, void **);
    CUresult (*instantiate)(void **, void *, unsigned long long);
    CUresult (*launch)(void *, CUstream);
    CUresult (*exec_destroy)(void *);
    CUresult (*graph_destroy)(void *);
    const char *missing; /* NULL when all were found */
} graph_api;

static inline graph_api graph_api_load(void)
{
    graph_api g;
    memset(&g, 0, sizeof g);
    *(void **)(&g.begin_capture) = cu_sym("cuStreamBeginCapture_v2");
    if (g.begin_capture == NULL)
        *(void **)(&g.begin_capture) = cu_sym("cuStreamBeginCapture");
    *(void **)(&g.end_capture) = cu_sym("cuStreamEndCapture");
    *(void **)(&g.instantiate) = cu_sym("cuGraphInstantiateWithFlags");
    *(void **)(&g.launch) = cu_sym("cuGraphLaunch");
    *(void **)(&g.exec_destroy) = cu_sym("cuGraphExecDestroy");
    *(void **)(&g.graph_destroy) = cu_sym("cuGraphDestroy");
    if (g.begin_capture == NULL)
        g.missing = "cuStreamBeginCapture_v2";
    else if (g.end_capture == NULL)
        g.missing = "cuStreamEndCapture";
    else if (g.instantiate == NULL)
        g.missing = "cuGraphInstantiateWithFlags";
    else if (g.launch == NULL)
        g.missing = "cuGraphLaunch";
    return g;
}

/* ------------------------------------------------------------------ GEMM */

#define GEMM_BM 128
#define GEMM_BN 128
#define GEMM_BK 32

typedef struct {
    CUfunction nn, tn, nt;
} gemm_kernels;

static inline gemm_kernels gemm_kernels_load(CUmodule mod)
{
    gemm_kernels k;
    k.nn = get_function(mod, "gemm_nn");
    k.tn = get_function(mod, "gemm_tn");
    k.nt = get_function(mod, "gemm_nt");
    return k;
}

/* C (M x N fp32) = op(A) op(B); f one of gemm_nn / gemm_tn / gemm_nt. */
static inline CUresult gemm_launch(CUfunction f, CUstream st, CUdeviceptr a, CUdeviceptr b,
                                   CUdeviceptr c, int m, int n, int k)
{
    void *params[] = {&a, &b, &c, &m, &n, &k};
    if (m % GEMM_BM != 0 || n % GEMM_BN != 0 || k % GEMM_BK != 0) {
        fprintf(stderr, "gemm %dx%dx%d: M and N must be multiples of 128, K of 32\n", m, n, k);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return cuLaunchKernel(f, (unsigned int)(n / GEMM_BN), (unsigned int)(m / GEMM_BM), 1, 256, 1,
                          1, 0, st, params, NULL);
}

/*
 * Checks one GEMM variant on M x N x K against a host reference. The inputs are multiples
 * of 0.25 in [-2, 2], so every product and partial sum is exact in fp32: the result must
 * match exactly. variant: 0 nn, 1 tn (A stored K x M), 2 nt (B stored N x K).
 * Returns the number of mismatches (0: pass).
 */
static inline long gemm_check(CUfunction f, int variant, int m, int n, int k)
{
    size_t na = (size_t)m * k, nb = (size_t)k * n, nc = (size_t)m * n, i;
    uint16_t *ha = malloc(na * 2), *hb = malloc(nb * 2);
    float *hc = malloc(nc * 4);
    CUdeviceptr da, db, dc;
    long bad = 0;
    int r, c, kk;
    if (ha == NULL || hb == NULL || hc == NULL) {
        fprintf(stderr, "gemm_check: out of host memory\n");
        exit(2);
    }
    for (i = 0; i < na; i++)
        ha[i] = host_f2bf(0.25f * (float)((int)(host_hash((uint32_t)i * 2u + 1u) % 17u) - 8));
    for (i = 0; i < nb; i++)
        hb[i] = host_f2bf(0.25f * (float)((int)(host_hash((uint32_t)i * 2u + 7u) % 17u) - 8));
    CU_CHECK(cuMemAlloc(&da, na * 2));
    CU_CHECK(cuMemAlloc(&db, nb * 2));
    CU_CHECK(cuMemAlloc(&dc, nc * 4));
    CU_CHECK(cuMemcpyHtoD(da, ha, na * 2));
    CU_CHECK(cuMemcpyHtoD(db, hb, nb * 2));
    CU_CHECK(cuMemsetD8(dc, 0xff, nc * 4));
    CU_CHECK(gemm_launch(f, NULL, da, db, dc, m, n, k));
    CU_CHECK(cuCtxSynchronize());
    CU_CHECK(cuMemcpyDtoH(hc, dc, nc * 4));
    for (r = 0; r < m; r++) {
        for (c = 0; c < n; c++) {
            double ref = 0.0;
            for (kk = 0; kk < k; kk++) {
                float av = variant == 1 ? host_bf2f(ha[(size_t)kk * m + r])
                                        : host_bf2f(ha[(size_t)r * k + kk]);
                float bv = variant == 2 ? host_bf2f(hb[(size_t)c * k + kk])
                                        : host_bf2f(hb[(size_t)kk * n + c]);
                ref += (double)av * (double)bv;
            }
            if (fabs((double)hc[(size_t)r * n + c] - ref) > 1e-6) {
                if (bad < 5)
                    fprintf(stderr, "gemm_check variant %d: C[%d][%d] = %g, expected %g\n",
                            variant, r, c, (double)hc[(size_t)r * n + c], ref);
                bad++;
            }
        }
    }
    CU_CHECK(cuMemFree(da));
    CU_CHECK(cuMemFree(db));
    CU_CHECK(cuMemFree(dc));
    free(ha);
    free(hb);
    free(hc);
    return bad;
}

/* Checks the three variants; prints the verdict to stderr; exits 1 on a mismatch. */
static inline void gemm_check_all(const gemm_kernels *g)
{
    long bad = gemm_check(g->nn, 0, 256, 384, 224) + gemm_check(g->tn, 1, 256, 384, 224) +
               gemm_check(g->nt, 2, 256, 384, 224);
    if (bad != 0) {
        fprintf(stderr, "FAIL gemm check: %ld mismatching elements\n", bad);
        exit(1);
    }
    fprintf(stderr, "gemm check (nn, tn, nt at 256x384x224): pass\n");
}

/* Latency statistics (µs) of n samples (sorts v in place), printed as a JSON object. */
static inline void json_latency(FILE *out, const char *key, double *v, size_t n)
{
    double sum = 0.0;
    size_t i;
    qsort(v, n, sizeof *v, cmp_double);
    for (i = 0; i < n; i++)
        sum += v[i];
    fprintf(out,
            ",\"%s\":{\"n\":%zu,\"min\":%.1f,\"mean\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,"
            "\"p999\":%.1f,\"max\":%.1f}",
            key, n, n ? v[0] : 0.0, n ? sum / (double)n : 0.0, percentile_sorted(v, n, 50.0),
            percentile_sorted(v, n, 90.0), percentile_sorted(v, n, 99.0),
            percentile_sorted(v, n, 99.9), n ? v[n - 1] : 0.0);
}

#endif /* VGPU_COLOC_COMMON_H */
