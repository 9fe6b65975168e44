/*
 * Loses its backend mid-session: initializes, allocates and copies, prints
 * "READY", then waits for a line on stdin (the test kills the backend
 * meanwhile). Every later call that needs the device must return
 * CUDA_ERROR_DEVICE_UNAVAILABLE (46) within a time bound, never hang.
 *
 * Usage: backend_loss_client [MAX_MS_PER_CALL]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "check.h"

static double g_max_ms = 5000.0;

static void check_lost(CUresult rc, double t0, const char *what) {
    double elapsed = now_ms() - t0;
    printf("INFO %s returned %d (%s) after %.1f ms\n", what, (int)rc, cu_name(rc), elapsed);
    check_rc(rc, CUDA_ERROR_DEVICE_UNAVAILABLE, what);
    check(elapsed <= g_max_ms, "the call returns in bounded time", "%s took %.1f ms", what,
          elapsed);
}

int main(int argc, char **argv) {
    if (argc == 2) {
        g_max_ms = atof(argv[1]);
    }
    start_watchdog(120);

    CUdevice dev = 0;
    CUcontext ctx = NULL;
    CUdeviceptr p = 0;
    uint32_t host[1024];
    fill_pattern(host, sizeof host, 7);

    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    require_rc(cuMemAlloc(&p, sizeof host), "cuMemAlloc");
    require_rc(cuMemcpyHtoD(p, host, sizeof host), "cuMemcpyHtoD");

    printf("READY\n");
    fflush(stdout);
    char line[64];
    if (fgets(line, sizeof line, stdin) == NULL) {
        fail("stdin", "closed before the go-ahead");
        finish();
    }

    double t0 = now_ms();
    CUdeviceptr q = 0;
    check_lost(cuMemAlloc(&q, 4096), t0, "cuMemAlloc after the backend died");
    t0 = now_ms();
    check_lost(cuMemcpyHtoD(p, host, sizeof host), t0, "cuMemcpyHtoD after the backend died");
    t0 = now_ms();
    check_lost(cuMemcpyDtoH(host, p, sizeof host), t0, "cuMemcpyDtoH after the backend died");
    t0 = now_ms();
    size_t free_b = 0, total_b = 0;
    check_lost(cuMemGetInfo(&free_b, &total_b), t0, "cuMemGetInfo after the backend died");
    t0 = now_ms();
    check_lost(cuCtxSynchronize(), t0, "cuCtxSynchronize after the backend died");
    finish();
}
