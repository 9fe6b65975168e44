/*
 * Session isolation: one process holds an allocation, another (a separate
 * session on the same slice) tries to read, write and free it by its
 * device address and must be refused every time.
 *
 * Usage: isolation_probe hold     allocates 1 MiB, fills it, prints
 *                                 "PTR 0x<addr>", waits for a stdin line,
 *                                 then checks its data is intact.
 *        isolation_probe probe ADDR
 *                                 every access to ADDR must fail.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define BYTES (1u << 20)

static void open_context(void) {
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
}

/* Memsets and device-to-device copies may be queued and fail only at the
 * next synchronizing call, as on native CUDA: count that as the answer. */
static void refused(CUresult rc, const char *what) {
    if (rc == CUDA_SUCCESS) {
        rc = cuCtxSynchronize();
    }
    printf("INFO %s returned %d (%s)\n", what, (int)rc, cu_name(rc));
    check(rc != CUDA_SUCCESS, what, "succeeded on another session's memory");
}

int main(int argc, char **argv) {
    start_watchdog(60);
    static uint8_t host[BYTES];
    if (argc == 2 && strcmp(argv[1], "hold") == 0) {
        CUdeviceptr p = 0;
        char line[64];
        open_context();
        require_rc(cuMemAlloc(&p, BYTES), "cuMemAlloc");
        fill_pattern(host, BYTES, 0x150u);
        require_rc(cuMemcpyHtoD(p, host, BYTES), "cuMemcpyHtoD");
        printf("PTR 0x%llx\n", p);
        fflush(stdout);
        check(fgets(line, sizeof line, stdin) != NULL, "resumed", "stdin closed");
        memset(host, 0, BYTES);
        check_rc(cuMemcpyDtoH(host, p, BYTES), CUDA_SUCCESS, "cuMemcpyDtoH of the held buffer");
        long at = find_pattern_mismatch(host, BYTES, 0x150u);
        check(at < 0, "the held buffer is intact", "word %ld changed", at);
        check_rc(cuMemFree(p), CUDA_SUCCESS, "cuMemFree of the held buffer");
        finish();
    }
    if (argc == 3 && strcmp(argv[1], "probe") == 0) {
        CUdeviceptr p = (CUdeviceptr)strtoull(argv[2], NULL, 0);
        open_context();
        memset(host, 0x77, BYTES);
        refused(cuMemcpyDtoH(host, p, BYTES), "cuMemcpyDtoH of a foreign pointer is refused");
        refused(cuMemcpyHtoD(p, host, BYTES), "cuMemcpyHtoD to a foreign pointer is refused");
        refused(cuMemsetD8(p, 0, BYTES), "cuMemsetD8 of a foreign pointer is refused");
        CUdeviceptr mine = 0;
        require_rc(cuMemAlloc(&mine, BYTES), "cuMemAlloc (own buffer)");
        refused(cuMemcpyDtoD(mine, p, BYTES), "cuMemcpyDtoD from a foreign pointer is refused");
        refused(cuMemcpyDtoD(p, mine, BYTES), "cuMemcpyDtoD to a foreign pointer is refused");
        refused(cuMemFree(p), "cuMemFree of a foreign pointer is refused");
        check_rc(cuCtxSynchronize(), CUDA_SUCCESS, "the session is still usable");
        check_rc(cuMemFree(mine), CUDA_SUCCESS, "cuMemFree (own buffer)");
        finish();
    }
    fprintf(stderr, "usage: %s hold | probe ADDR\n", argv[0]);
    return 2;
}
