/*
 * meter_load: a known GPU workload whose GPU time is measured with CUDA events, to check
 * what the vgpu ledger bills (bench/metering/run.sh). Every piece of GPU work the program
 * does is one kernel on one stream, bracketed by its own event pair; the GPU time is the sum
 * of those intervals (one stream: they never overlap). The program copies nothing, so the
 * kernels are all of its GPU work.
 *
 * Workloads:
 *   spin SPIN_PTX COUNT US           COUNT launches of vgpu_timed_spin(US microseconds)
 *                                    (tests/ptx/vgpu_timed_spin.ptx, loaded as PTX)
 *   gemm KERNELS_MODULE COUNT N      fills A and B (n x n bf16, fill_bf16), then COUNT
 *                                    gemm_nn (bench/colocation/kernels.cu) of n x n x n
 *
 * At most DEPTH (64) kernels are queued at once: before the next launch the program waits
 * for the end event of the launch DEPTH before it.
 *
 * stdout: one JSON object {"bench":"meter_load","workload":..,"kernels":N,
 * "event_ns":sum of the kernels' event intervals,"wall_ns":first launch to the end,
 * "libcuda":..., "device":...}. Exit status: 0 ok, 2 driver error.
 *
 * Build: gcc -O2 -I/usr/local/cuda/include -Ibench -Ibench/colocation meter_load.c -lcuda -ldl -lm
 */
#include "coloc_common.h"

#define DEPTH 64

typedef struct {
    CUstream st;
    CUevent start[DEPTH], end[DEPTH];
    long launched;
    double event_ms;
} timer;

static void timer_init(timer *t)
{
    int i;
    memset(t, 0, sizeof *t);
    CU_CHECK(cuStreamCreate(&t->st, CU_STREAM_NON_BLOCKING));
    for (i = 0; i < DEPTH; i++) {
        CU_CHECK(cuEventCreate(&t->start[i], CU_EVENT_DEFAULT));
        CU_CHECK(cuEventCreate(&t->end[i], CU_EVENT_DEFAULT));
    }
}

/* Accounts the kernel in slot i (its end event has completed or is waited for). */
static void timer_collect(timer *t, int i)
{
    float ms = 0.0f;
    CU_CHECK(cuEventSynchronize(t->end[i]));
    CU_CHECK(cuEventElapsedTime(&ms, t->start[i], t->end[i]));
    t->event_ms += (double)ms;
}

/* Brackets the launch that `launch` queues with an event pair. */
#define TIMED(t, launch)                                                                       \
    do {                                                                                       \
        int slot_ = (int)((t)->launched % DEPTH);                                              \
        if ((t)->launched >= DEPTH)                                                            \
            timer_collect((t), slot_);                                                         \
        CU_CHECK(cuEventRecord((t)->start[slot_], (t)->st));                                   \
        CU_CHECK(launch);                                                                      \
        CU_CHECK(cuEventRecord((t)->end[slot_], (t)->st));                                     \
        (t)->launched++;                                                                       \
    } while (0)

/* Waits for everything and accounts the kernels not yet accounted. */
static void timer_finish(timer *t)
{
    long k;
    long from = t->launched > DEPTH ? t->launched - DEPTH : 0;
    CU_CHECK(cuStreamSynchronize(t->st));
    for (k = from; k < t->launched; k++)
        timer_collect(t, (int)(k % DEPTH));
}

int main(int argc, char **argv)
{
    cu_session s;
    timer t;
    CUmodule mod;
    const char *workload;
    long count;
    uint64_t t0, wall;

    if (argc != 5 || (strcmp(argv[1], "spin") != 0 && strcmp(argv[1], "gemm") != 0)) {
        fprintf(stderr, "usage: %s spin SPIN_PTX COUNT US | gemm KERNELS_MODULE COUNT N\n",
                argv[0]);
        return 2;
    }
    workload = argv[1];
    count = arg_long(argc, argv, 3, 1);
    cu_open(&s, 0);
    mod = load_module_file(argv[2]);
    timer_init(&t);
    t0 = now_ns();
    if (strcmp(workload, "spin") == 0) {
        CUfunction spin = get_function(mod, "vgpu_timed_spin");
        unsigned long long ns = (unsigned long long)arg_long(argc, argv, 4, 1) * 1000ull;
        void *params[] = {&ns};
        long i;
        for (i = 0; i < count; i++)
            TIMED(&t, cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, t.st, params, NULL));
    } else {
        int n = (int)arg_long(argc, argv, 4, 4096);
        CUfunction fill = get_function(mod, "fill_bf16");
        gemm_kernels g = gemm_kernels_load(mod);
        unsigned long long elems = (unsigned long long)n * (unsigned long long)n;
        CUdeviceptr a, b, c;
        long i;
        CU_CHECK(cuMemAlloc(&a, elems * 2));
        CU_CHECK(cuMemAlloc(&b, elems * 2));
        CU_CHECK(cuMemAlloc(&c, elems * 4));
        TIMED(&t, fill_bf16(fill, t.st, a, elems, 1u, 1.0f));
        TIMED(&t, fill_bf16(fill, t.st, b, elems, 2u, 1.0f));
        for (i = 0; i < count; i++)
            TIMED(&t, gemm_launch(g.nn, t.st, a, b, c, n, n, n));
    }
    timer_finish(&t);
    wall = now_ns() - t0;
    printf("{");
    json_preamble(stdout, "meter_load", &s);
    printf(",\"workload\":");
    json_str(stdout, workload);
    printf(",\"kernels\":%ld,\"event_ns\":%.0f,\"wall_ns\":%llu}\n", t.launched,
           t.event_ms * 1e6, (unsigned long long)wall);
    CU_CHECK(cuModuleUnload(mod));
    cu_close(&s);
    return 0;
}
