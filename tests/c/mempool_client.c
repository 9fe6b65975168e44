/*
 * Stream-ordered memory pools through the driver API: the default pool and
 * its release threshold, cuMemAllocAsync accounted to it, an explicit pool
 * with cuMemAllocFromPoolAsync, used/reserved memory while allocations live
 * and after they are freed and the stream synchronized, and the refusals
 * (destroying the default pool, an unknown pool handle).
 *
 * Usage: mempool_client
 * Prints one PASS/FAIL line per check and exits non-zero on any failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "check.h"

#define MIB (1024ull * 1024ull)

static cuuint64_t attr_u64(CUmemoryPool pool, CUmemPool_attribute attr, const char *what) {
    cuuint64_t value = ~0ull;
    check_rc(cuMemPoolGetAttribute(pool, attr, &value), CUDA_SUCCESS, what);
    return value;
}

/* Writes a word pattern through the stream and reads it back. */
static void check_memory_is_real(CUdeviceptr p, size_t bytes, unsigned word, CUstream s,
                                 const char *what) {
    static uint32_t host[1024];
    size_t n = sizeof host / sizeof host[0];
    if (bytes < sizeof host) {
        n = bytes / 4;
    }
    if (cuMemsetD32Async(p, word, bytes / 4, s) != CUDA_SUCCESS ||
        cuStreamSynchronize(s) != CUDA_SUCCESS ||
        cuMemcpyDtoH(host, p + bytes - n * 4, n * 4) != CUDA_SUCCESS) {
        fail(what, "memset or copy back failed");
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (host[i] != word) {
            fail(what, "word %zu is %08x, expected %08x", i, host[i], word);
            return;
        }
    }
    pass(what);
}

int main(void) {
    start_watchdog(60);
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    size_t free_start = 0, total = 0, free_now = 0;
    require_rc(cuMemGetInfo(&free_start, &total), "cuMemGetInfo at start");

    /* The default pool is the device's current pool. */
    CUmemoryPool pool = NULL, current = NULL;
    require_rc(cuDeviceGetDefaultMemPool(&pool, dev), "cuDeviceGetDefaultMemPool");
    check(pool != NULL, "default pool handle is not NULL", "got NULL");
    check_rc(cuDeviceGetMemPool(&current, dev), CUDA_SUCCESS, "cuDeviceGetMemPool");
    check(current == pool, "the default pool is current", "current %p, default %p",
          (void *)current, (void *)pool);

    /* Attributes round-trip; reuse flags default to on. */
    cuuint64_t threshold = 64 * MIB;
    check_rc(cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &threshold),
             CUDA_SUCCESS, "set release threshold");
    cuuint64_t got = attr_u64(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, "get release threshold");
    check(got == threshold, "release threshold round-trips", "got %llu", got);
    int reuse = -1;
    check_rc(cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC, &reuse),
             CUDA_SUCCESS, "get reuse flag");
    check(reuse == 1, "reuse flag defaults to 1", "got %d", reuse);
    threshold = 0;
    check_rc(cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &threshold),
             CUDA_SUCCESS, "set release threshold back to 0");

    CUstream s = NULL;
    require_rc(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate");

    /* cuMemAllocAsync is accounted to the default pool. */
    CUdeviceptr a = 0;
    require_rc(cuMemAllocAsync(&a, 3 * MIB, s), "cuMemAllocAsync");
    cuuint64_t used = attr_u64(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, "get used memory");
    cuuint64_t reserved =
        attr_u64(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, "get reserved memory");
    check(used >= 3 * MIB, "default pool's used memory counts the allocation", "used %llu",
          used);
    check(reserved >= used, "reserved memory covers used memory", "reserved %llu used %llu",
          reserved, used);
    check_memory_is_real(a, 3 * MIB, 0xA5A5F00Du, s, "cuMemAllocAsync memory holds data");

    /* An explicit pool. */
    CUmemPoolProps props;
    memset(&props, 0, sizeof props);
    props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
    props.handleTypes = CU_MEM_HANDLE_TYPE_NONE;
    props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    props.location.id = dev;
    CUmemoryPool own = NULL;
    require_rc(cuMemPoolCreate(&own, &props), "cuMemPoolCreate");
    check(own != NULL && own != pool, "a new pool is a new handle", "got %p", (void *)own);
    CUdeviceptr b = 0;
    require_rc(cuMemAllocFromPoolAsync(&b, 2 * MIB, own, s), "cuMemAllocFromPoolAsync");
    check(b != 0 && b != a, "the pool allocation has its own address", "got %llx", b);
    cuuint64_t used_own = attr_u64(own, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, "get own used");
    cuuint64_t used_default =
        attr_u64(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, "get default used again");
    check(used_own >= 2 * MIB, "own pool's used memory counts its allocation", "used %llu",
          used_own);
    check(used_default == used, "the default pool is not charged for the other pool",
          "used %llu, was %llu", used_default, used);
    check_memory_is_real(b, 2 * MIB, 0x600DCAFEu, s, "pool allocation holds data");

    /* Freed in stream order; after a synchronize nothing is used. */
    check_rc(cuMemFreeAsync(a, s), CUDA_SUCCESS, "cuMemFreeAsync default pool allocation");
    check_rc(cuMemFreeAsync(b, s), CUDA_SUCCESS, "cuMemFreeAsync own pool allocation");
    check_rc(cuStreamSynchronize(s), CUDA_SUCCESS, "cuStreamSynchronize");
    check_rc(cuMemPoolTrimTo(own, 0), CUDA_SUCCESS, "cuMemPoolTrimTo");
    used_default = attr_u64(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, "get default used after");
    used_own = attr_u64(own, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, "get own used after");
    reserved = attr_u64(own, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, "get own reserved after");
    check(used_default == 0, "default pool uses nothing after the frees", "used %llu",
          used_default);
    check(used_own == 0, "own pool uses nothing after the frees", "used %llu", used_own);
    check(reserved == 0, "own pool reserves nothing after trimming", "reserved %llu", reserved);
    cuuint64_t high = attr_u64(own, CU_MEMPOOL_ATTR_USED_MEM_HIGH, "get own used high");
    check(high >= 2 * MIB, "the high watermark remembers the peak", "high %llu", high);

    /* Refusals. */
    check_rc(cuMemPoolDestroy(pool), CUDA_ERROR_INVALID_VALUE,
             "destroying the default pool is refused");
    cuuint64_t ignored = 0;
    check_rc(cuMemPoolGetAttribute((CUmemoryPool)(uintptr_t)0x1230, CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                                   &ignored),
             CUDA_ERROR_INVALID_VALUE, "an unknown pool handle is invalid");
    cuuint64_t nonzero = 5;
    check_rc(cuMemPoolSetAttribute(own, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &nonzero),
             CUDA_ERROR_INVALID_VALUE, "used memory is read-only");

    check_rc(cuMemPoolDestroy(own), CUDA_SUCCESS, "cuMemPoolDestroy");
    check_rc(cuMemPoolTrimTo(own, 0), CUDA_ERROR_INVALID_VALUE, "a destroyed pool is invalid");
    check_rc(cuStreamDestroy(s), CUDA_SUCCESS, "cuStreamDestroy");

    /* The memory really went back to the slice. */
    check_rc(cuMemGetInfo(&free_now, &total), CUDA_SUCCESS, "cuMemGetInfo at end");
    check(free_now == free_start, "all pool memory is back in the slice",
          "free %zu, was %zu", free_now, free_start);
    finish();
}
