/*
 * Keeps a slice saturated with timed kernels: `vgpu_timed_spin(ns)` spins for ns
 * nanoseconds on a real GPU (%globaltimer), and the emulated device runs it by holding
 * its emulated GPU for that long. Used to measure how the scheduler shares GPU time.
 *
 * Usage: timed_spin_client PTX_FILE SECONDS KERNEL_US [PERIOD_US]
 * With PERIOD_US, it is a latency-critical tenant instead: one kernel every PERIOD_US,
 * each followed by a synchronize, and it prints "LATENCY_US p50 <..> p99 <..> max <..> n <..>"
 * (launch to synchronize return) after the KERNELS line.
 * Prints "READY" once set up, waits for a line on stdin (any; so several clients can
 * start together), launches kernels for SECONDS (asynchronously, two batches of 4 queued),
 * then prints "KERNELS <n> KERNEL_NS <ns> ELAPSED_NS <wall>" and the RESULT line.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "check.h"

static void *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = calloc(1, (size_t)n + 1);
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s PTX_FILE SECONDS KERNEL_US [PERIOD_US]\n", argv[0]);
        return 2;
    }
    double seconds = atof(argv[2]);
    unsigned long long kernel_ns = strtoull(argv[3], NULL, 0) * 1000ull;
    start_watchdog((unsigned)env_u64("VGPU_TEST_WATCHDOG_S", (unsigned long long)seconds + 60));
    void *ptx = read_file(argv[1]);
    if (!check(ptx != NULL, "read the PTX", "cannot read %s", argv[1])) {
        finish();
    }

    CUdevice dev = 0;
    CUcontext ctx = NULL;
    CUmodule mod = NULL;
    CUfunction spin = NULL;
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
    require_rc(cuModuleLoadData(&mod, ptx), "cuModuleLoadData");
    require_rc(cuModuleGetFunction(&spin, mod, "vgpu_timed_spin"), "cuModuleGetFunction");

    printf("READY\n");
    fflush(stdout);
    char line[64];
    if (fgets(line, sizeof line, stdin) == NULL) {
        fail("wait for the start line", "stdin closed");
        finish();
    }

    if (argc == 5) {
        double period_ms = atof(argv[4]) / 1e3;
        static double lat[1 << 16];
        size_t nlat = 0;
        void *one[] = {&kernel_ns};
        double start = now_ms();
        double deadline = start + seconds * 1e3;
        for (double next = start; next < deadline && nlat < (1u << 16); next += period_ms) {
            /* Sleep, not spin, until the step is due: the machine may have few cores. */
            struct timespec due;
            due.tv_sec = (time_t)(next / 1e3);
            due.tv_nsec = (long)((next - (double)due.tv_sec * 1e3) * 1e6);
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &due, NULL) != 0) {
            }
            double t0 = now_ms();
            require_rc(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, NULL, one, NULL),
                       "cuLaunchKernel(vgpu_timed_spin)");
            require_rc(cuCtxSynchronize(), "cuCtxSynchronize");
            lat[nlat++] = (now_ms() - t0) * 1e3;
        }
        double elapsed = now_ms() - start;
        printf("KERNELS %zu KERNEL_NS %llu ELAPSED_NS %.0f\n", nlat, kernel_ns, elapsed * 1e6);
        qsort(lat, nlat, sizeof lat[0], cmp_double);
        check(nlat > 0, "kernels ran", "none completed");
        if (nlat > 0) {
            printf("LATENCY_US p50 %.1f p99 %.1f max %.1f n %zu\n", lat[nlat / 2],
                   lat[(nlat * 99) / 100], lat[nlat - 1], nlat);
        }
        require_rc(cuCtxDestroy(ctx), "cuCtxDestroy");
        finish();
    }

    /* Two batches of BATCH kernels stay queued, so the device never waits for the client:
     * launch a batch, record an event, and wait for the previous batch's event. */
    enum { BATCH = 4 };
    CUevent done[2];
    require_rc(cuEventCreate(&done[0], CU_EVENT_DISABLE_TIMING), "cuEventCreate");
    require_rc(cuEventCreate(&done[1], CU_EVENT_DISABLE_TIMING), "cuEventCreate");
    unsigned long long n = 0;
    void *params[] = {&kernel_ns};
    double start = now_ms();
    double deadline = start + seconds * 1e3;
    for (unsigned long long batch = 0; now_ms() < deadline; batch++) {
        for (int i = 0; i < BATCH; i++) {
            require_rc(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL),
                       "cuLaunchKernel(vgpu_timed_spin)");
        }
        require_rc(cuEventRecord(done[batch % 2], NULL), "cuEventRecord");
        if (batch > 0) {
            require_rc(cuEventSynchronize(done[(batch + 1) % 2]), "cuEventSynchronize");
            n += BATCH;
        }
    }
    /* Only kernels that completed inside the window count; the last batch is drained after. */
    double elapsed = now_ms() - start;
    require_rc(cuCtxSynchronize(), "cuCtxSynchronize");
    printf("KERNELS %llu KERNEL_NS %llu ELAPSED_NS %.0f\n", n, kernel_ns, elapsed * 1e6);
    check(n > 0, "kernels ran", "none completed");
    require_rc(cuModuleUnload(mod), "cuModuleUnload");
    require_rc(cuCtxDestroy(ctx), "cuCtxDestroy");
    finish();
}
