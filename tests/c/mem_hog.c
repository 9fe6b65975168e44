/*
 * Allocates BYTES of device memory in CHUNK-sized pieces, prints
 * "ALLOCATED <bytes>", then keeps copies in flight until it is killed (or its
 * watchdog fires). Used to check that a client killed mid-work leaves nothing
 * allocated behind.
 *
 * Usage: mem_hog BYTES CHUNK
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define MAX_CHUNKS 4096

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BYTES CHUNK\n", argv[0]);
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 0);
    size_t chunk = strtoull(argv[2], NULL, 0);
    if (chunk == 0 || bytes / chunk > MAX_CHUNKS) {
        fprintf(stderr, "bad sizes\n");
        return 2;
    }
    start_watchdog((unsigned)env_u64("VGPU_TEST_WATCHDOG_S", 60));

    static CUdeviceptr ptrs[MAX_CHUNKS];
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    CUstream stream = NULL;
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    require_rc(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");

    size_t n = bytes / chunk;
    for (size_t i = 0; i < n; i++) {
        require_rc(cuMemAlloc(&ptrs[i], chunk), "cuMemAlloc (chunk)");
        require_rc(cuMemsetD8(ptrs[i], (unsigned char)i, chunk), "cuMemsetD8 (chunk)");
    }
    void *pinned = NULL;
    size_t staging = chunk < (1u << 20) ? chunk : (1u << 20);
    require_rc(cuMemAllocHost(&pinned, staging), "cuMemAllocHost");
    memset(pinned, 0x5a, staging);

    printf("ALLOCATED %zu\n", n * chunk);
    fflush(stdout);

    /* Work until killed: async copies queued on a stream, synced now and then. */
    for (unsigned long round = 0;; round++) {
        CUdeviceptr p = ptrs[round % n];
        require_rc(cuMemcpyHtoDAsync(p, pinned, staging, stream), "cuMemcpyHtoDAsync");
        require_rc(cuMemcpyDtoHAsync(pinned, p, staging, stream), "cuMemcpyDtoHAsync");
        if (round % 16 == 15) {
            require_rc(cuStreamSynchronize(stream), "cuStreamSynchronize");
        }
    }
}
