/*
 * The raw driver's figures that elastic memory is measured against, on the real libcuda:
 *
 *   vmm_native copy      pinned copy bandwidth, 2 MiB chunks over 4 streams, each way
 *   vmm_native map       cuMemCreate + cuMemMap + cuMemSetAccess, and cuMemUnmap +
 *                        cuMemRelease, per 2 MiB chunk (mean over 512 chunks)
 *   vmm_native pin       pinning 4 GiB of host memory in 64 MiB slabs, the cost a cold swap-out
 *                        pays: cuMemHostAlloc, and anonymous memory (transparent huge pages
 *                        asked for, faulted in first) registered with cuMemHostRegister, as the
 *                        backend's swap reserve pins
 *   vmm_native pattern   the allocation pattern of PyTorch's caching allocator (segments of
 *                        2 MiB for small blocks, 20 MiB for medium ones, large ones rounded up
 *                        to 2 MiB) with cuMemAlloc/cuMemFree: also run through a slice, where
 *                        the backend serves it from elastic memory
 *
 * Prints one JSON object per line. Exit status 1 on any CUDA error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <cuda.h>

#define MIB (1024ull * 1024ull)
#define CHUNK (2 * MIB)

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

#define CK(call)                                                                                  \
    do {                                                                                          \
        CUresult rc_ = (call);                                                                    \
        if (rc_ != CUDA_SUCCESS) {                                                                \
            const char *n_ = "?";                                                                 \
            cuGetErrorName(rc_, &n_);                                                             \
            fprintf(stderr, "%s:%d: %s returned %d (%s)\n", __FILE__, __LINE__, #call, (int)rc_,  \
                    n_);                                                                          \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

static void copy_bench(size_t total) {
    CUdeviceptr dev;
    void *host;
    CUstream s[4];
    CK(cuMemAlloc(&dev, total));
    CK(cuMemHostAlloc(&host, total, 0));
    memset(host, 1, total);
    for (int i = 0; i < 4; i++) {
        CK(cuStreamCreate(&s[i], CU_STREAM_NON_BLOCKING));
    }
    size_t chunks = total / CHUNK;
    double best_d2h = 0, best_h2d = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now_s();
        for (size_t c = 0; c < chunks; c++) {
            CK(cuMemcpyDtoHAsync((char *)host + c * CHUNK, dev + c * CHUNK, CHUNK, s[c % 4]));
        }
        CK(cuCtxSynchronize());
        double d2h = (double)total / (now_s() - t0) / 1e9;
        t0 = now_s();
        for (size_t c = 0; c < chunks; c++) {
            CK(cuMemcpyHtoDAsync(dev + c * CHUNK, (char *)host + c * CHUNK, CHUNK, s[c % 4]));
        }
        CK(cuCtxSynchronize());
        double h2d = (double)total / (now_s() - t0) / 1e9;
        best_d2h = d2h > best_d2h ? d2h : best_d2h;
        best_h2d = h2d > best_h2d ? h2d : best_h2d;
    }
    printf("{\"test\":\"pinned_copy\",\"bytes\":%zu,\"chunk\":%llu,\"streams\":4,"
           "\"d2h_gbps\":%.2f,\"h2d_gbps\":%.2f}\n",
           total, CHUNK, best_d2h, best_h2d);
    for (int i = 0; i < 4; i++) {
        CK(cuStreamDestroy(s[i]));
    }
    CK(cuMemFreeHost(host));
    CK(cuMemFree(dev));
}

#define SLAB (64 * MIB)

static void pin_bench(size_t total) {
    size_t n = total / SLAB;
    void **p = calloc(n, sizeof *p);
    double t0 = now_s();
    for (size_t i = 0; i < n; i++) {
        CK(cuMemHostAlloc(&p[i], SLAB, CU_MEMHOSTALLOC_PORTABLE));
    }
    double host_alloc = now_s() - t0;
    for (size_t i = 0; i < n; i++) {
        CK(cuMemFreeHost(p[i]));
    }
    double touch = 0, reg = 0;
    for (size_t i = 0; i < n; i++) {
        double a = now_s();
        p[i] = mmap(NULL, SLAB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p[i] == MAP_FAILED) {
            fprintf(stderr, "mmap failed\n");
            exit(1);
        }
        madvise(p[i], SLAB, MADV_HUGEPAGE);
        if (madvise(p[i], SLAB, 23 /* MADV_POPULATE_WRITE, as the swap reserve */) != 0) {
            memset(p[i], 0, SLAB);
        }
        double b = now_s();
        CK(cuMemHostRegister(p[i], SLAB, CU_MEMHOSTREGISTER_PORTABLE));
        touch += b - a;
        reg += now_s() - b;
    }
    for (size_t i = 0; i < n; i++) {
        CK(cuMemHostUnregister(p[i]));
        munmap(p[i], SLAB);
    }
    free(p);
    printf("{\"test\":\"pin\",\"bytes\":%zu,\"slab\":%llu,\"host_alloc_gbps\":%.2f,"
           "\"thp_touch_gbps\":%.2f,\"register_gbps\":%.2f,\"touch_and_register_gbps\":%.2f}\n",
           total, SLAB, total / host_alloc / 1e9, total / touch / 1e9, total / reg / 1e9,
           total / (touch + reg) / 1e9);
}

static void map_bench(int n) {
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = 0;
    size_t gran = 0;
    CK(cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    CUdeviceptr base;
    CK(cuMemAddressReserve(&base, (size_t)n * CHUNK, CHUNK, 0, 0));
    CUmemGenericAllocationHandle *h = calloc((size_t)n, sizeof *h);
    CUmemAccessDesc access;
    memset(&access, 0, sizeof access);
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    double t0 = now_s();
    for (int i = 0; i < n; i++) {
        CK(cuMemCreate(&h[i], CHUNK, &prop, 0));
        CK(cuMemMap(base + (size_t)i * CHUNK, CHUNK, 0, h[i], 0));
        CK(cuMemSetAccess(base + (size_t)i * CHUNK, CHUNK, &access, 1));
    }
    double map_us = (now_s() - t0) / n * 1e6;
    t0 = now_s();
    for (int i = 0; i < n; i++) {
        CK(cuMemUnmap(base + (size_t)i * CHUNK, CHUNK));
        CK(cuMemRelease(h[i]));
    }
    double unmap_us = (now_s() - t0) / n * 1e6;
    CK(cuMemAddressFree(base, (size_t)n * CHUNK));
    free(h);
    /* cuMemAlloc/cuMemFree of one 2 MiB block, for comparison. */
    CUdeviceptr *p = calloc((size_t)n, sizeof *p);
    t0 = now_s();
    for (int i = 0; i < n; i++) {
        CK(cuMemAlloc(&p[i], CHUNK));
    }
    double alloc_us = (now_s() - t0) / n * 1e6;
    t0 = now_s();
    for (int i = 0; i < n; i++) {
        CK(cuMemFree(p[i]));
    }
    double free_us = (now_s() - t0) / n * 1e6;
    free(p);
    printf("{\"test\":\"map_2mib\",\"chunks\":%d,\"granularity\":%zu,\"map_us\":%.2f,"
           "\"unmap_us\":%.2f,\"cumemalloc_us\":%.2f,\"cumemfree_us\":%.2f}\n",
           n, gran, map_us, unmap_us, alloc_us, free_us);
}

/* Segment sizes of PyTorch's caching allocator for a training-like mix of tensors. */
static size_t pattern_size(int i) {
    switch (i % 4) {
    case 0:
        return 2 * MIB; /* small pool segment */
    case 1:
        return 20 * MIB; /* medium requests: 20 MiB segments */
    case 2:
        return (size_t)(12 + (i % 7) * 6) * MIB; /* large, rounded to 2 MiB */
    default:
        return (size_t)(64 + (i % 5) * 32) * MIB;
    }
}

static void pattern_bench(int rounds, int n) {
    CUdeviceptr *p = calloc((size_t)n, sizeof *p);
    double alloc_s = 0, free_s = 0;
    size_t bytes = 0;
    for (int r = 0; r < rounds; r++) {
        double t0 = now_s();
        for (int i = 0; i < n; i++) {
            CK(cuMemAlloc(&p[i], pattern_size(i)));
            if (r == 0) {
                bytes += pattern_size(i);
            }
        }
        alloc_s += now_s() - t0;
        t0 = now_s();
        for (int i = 0; i < n; i++) {
            CK(cuMemFree(p[i]));
        }
        free_s += now_s() - t0;
    }
    free(p);
    printf("{\"test\":\"pytorch_pattern\",\"rounds\":%d,\"allocations\":%d,\"bytes\":%zu,"
           "\"alloc_us\":%.2f,\"free_us\":%.2f,\"total_ms\":%.3f}\n",
           rounds, n, bytes, alloc_s / rounds / n * 1e6, free_s / rounds / n * 1e6,
           (alloc_s + free_s) / rounds * 1e3);
}

int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "all";
    CUdevice dev;
    CUcontext ctx;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
    if (!strcmp(what, "copy") || !strcmp(what, "all")) {
        copy_bench(4096 * MIB);
    }
    if (!strcmp(what, "map") || !strcmp(what, "all")) {
        map_bench(512);
    }
    if (!strcmp(what, "pattern") || !strcmp(what, "all")) {
        pattern_bench(5, 200);
    }
    /* Last: pinning and unpinning 8 GiB of host memory could slow the driver calls measured
     * above if it ran before them. */
    if (!strcmp(what, "pin") || !strcmp(what, "all")) {
        pin_bench(4096 * MIB);
    }
    CK(cuDevicePrimaryCtxRelease(dev));
    return 0;
}
