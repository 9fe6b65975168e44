/*
 * Opens a session and prints the slice's memory: "MEMINFO free=<n> total=<n>".
 * Exits non-zero if any call fails.
 */
#include <stdio.h>

#include "check.h"

int main(void) {
    start_watchdog(60);
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    size_t free_b = 0, total_b = 0;
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    require_rc(cuMemGetInfo(&free_b, &total_b), "cuMemGetInfo");
    printf("MEMINFO free=%zu total=%zu\n", free_b, total_b);
    finish();
}
