/*
 * Amortized cost of cuLaunchKernel for an empty kernel.
 *
 * Two kernels (hand-written PTX, sm_90): `empty()` with no parameters and
 * `empty_ptrs(u64, u64)` with two device-pointer parameters. For each: a warm-up,
 * then `runs` times: `launches` cuLaunchKernel calls (1x1x1 grid, 1 thread) on one
 * stream followed by one cuStreamSynchronize. Per-launch cost = wall time of the
 * whole run / launches; the best run is reported (also the submit-only part, i.e.
 * the launch loop without the final synchronize).
 *
 * Usage: launch [launches=100000] [runs=3] [warmup=1000]
 */
#include "cu_common.h"

static const char launch_ptx[] =
    ".version 8.0\n"
    ".target sm_90\n"
    ".address_size 64\n"
    "\n"
    ".visible .entry empty()\n"
    "{\n"
    "\tret;\n"
    "}\n"
    "\n"
    ".visible .entry empty_ptrs(\n"
    "\t.param .u64 empty_ptrs_param_0,\n"
    "\t.param .u64 empty_ptrs_param_1\n"
    ")\n"
    "{\n"
    "\tret;\n"
    "}\n";

#define MAX_RUNS 16

typedef struct {
    double total_us[MAX_RUNS];  /* per launch, launch loop + synchronize */
    double submit_us[MAX_RUNS]; /* per launch, launch loop only */
    double best_total, best_submit;
} result_t;

static CUresult launch_n(CUfunction f, CUstream st, void **params, long n)
{
    long i;
    for (i = 0; i < n; i++)
        CU_TRY(cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, st, params, NULL));
    return CUDA_SUCCESS;
}

static result_t measure(CUfunction f, CUstream st, void **params, long launches, int runs,
                        long warmup)
{
    result_t r;
    int k;
    memset(&r, 0, sizeof r);
    CU_CHECK(launch_n(f, st, params, warmup));
    CU_CHECK(cuStreamSynchronize(st));
    for (k = 0; k < runs; k++) {
        uint64_t t0 = now_ns(), t1, t2;
        CU_CHECK(launch_n(f, st, params, launches));
        t1 = now_ns();
        CU_CHECK(cuStreamSynchronize(st));
        t2 = now_ns();
        r.total_us[k] = (double)(t2 - t0) / 1e3 / (double)launches;
        r.submit_us[k] = (double)(t1 - t0) / 1e3 / (double)launches;
        if (k == 0 || r.total_us[k] < r.best_total)
            r.best_total = r.total_us[k];
        if (k == 0 || r.submit_us[k] < r.best_submit)
            r.best_submit = r.submit_us[k];
    }
    return r;
}

static void print_result(const char *key, const result_t *r, int runs)
{
    int k;
    printf(",\"%s\":{\"best_us\":%.4f,\"best_submit_us\":%.4f,\"runs_us\":[", key,
           r->best_total, r->best_submit);
    for (k = 0; k < runs; k++)
        printf("%s%.4f", k ? "," : "", r->total_us[k]);
    printf("],\"runs_submit_us\":[");
    for (k = 0; k < runs; k++)
        printf("%s%.4f", k ? "," : "", r->submit_us[k]);
    printf("]}");
}

int main(int argc, char **argv)
{
    long launches = arg_long(argc, argv, 1, 100000);
    int runs = (int)arg_long(argc, argv, 2, 3);
    long warmup = arg_long(argc, argv, 3, 1000);
    cu_session s;
    CUmodule mod;
    CUfunction f_empty, f_ptrs;
    CUstream st;
    CUdeviceptr a, b;
    void *ptr_params[2];
    result_t r_empty, r_ptrs;

    if (runs > MAX_RUNS)
        runs = MAX_RUNS;
    cu_open(&s, 0);
    CU_CHECK(cuModuleLoadData(&mod, launch_ptx));
    CU_CHECK(cuModuleGetFunction(&f_empty, mod, "empty"));
    CU_CHECK(cuModuleGetFunction(&f_ptrs, mod, "empty_ptrs"));
    CU_CHECK(cuStreamCreate(&st, 0));
    CU_CHECK(cuMemAlloc(&a, 256));
    CU_CHECK(cuMemAlloc(&b, 256));
    ptr_params[0] = &a;
    ptr_params[1] = &b;

    r_empty = measure(f_empty, st, NULL, launches, runs, warmup);
    r_ptrs = measure(f_ptrs, st, ptr_params, launches, runs, warmup);

    printf("{");
    json_preamble(stdout, "launch", &s);
    printf(",\"launches\":%ld,\"runs\":%d,\"warmup\":%ld", launches, runs, warmup);
    print_result("empty", &r_empty, runs);
    print_result("two_ptr_params", &r_ptrs, runs);
    printf("}\n");

    CU_CHECK(cuMemFree(a));
    CU_CHECK(cuMemFree(b));
    CU_CHECK(cuStreamDestroy(st));
    CU_CHECK(cuModuleUnload(mod));
    cu_close(&s);
    return 0;
}
