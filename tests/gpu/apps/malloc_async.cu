// Stream-ordered allocation: cudaMallocAsync/cudaFreeAsync in a loop on a stream (each
// block used by kernels before it is freed), the default pool's release threshold, and an
// explicit pool (cudaMemPoolCreate, cudaMallocFromPoolAsync, cudaMemPoolTrimTo).
// Build: nvcc -o malloc_async malloc_async.cu
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "apps_common.h"


__global__ void fill(unsigned *p, size_t n, unsigned seed) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = (unsigned)(i % 1000) + seed;
}
__global__ void sum_into(const unsigned *p, size_t n, unsigned long long *out) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(out, (unsigned long long)p[i]);
}

static unsigned long long expected(size_t n, unsigned seed) {
    unsigned long long s = 0;
    for (size_t i = 0; i < n; i++) s += (i % 1000) + seed;
    return s;
}

int main() {
    int dev = 0;
    CK(cudaGetDevice(&dev));
    int supported = 0;
    CK(cudaDeviceGetAttribute(&supported, cudaDevAttrMemoryPoolsSupported, dev));
    printf("memory pools supported %d\n", supported ? 1 : 0);
    cudaMemPool_t pool;
    CK(cudaDeviceGetDefaultMemPool(&pool, dev));
    report_libcuda();
    uint64_t threshold = 64ull << 20, got = 0;
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    CK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &got));
    printf("release threshold %llu\n", (unsigned long long)got);

    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned long long *d_sum, h_sum[2] = {0, 0};
    CK(cudaMallocAsync((void **)&d_sum, 2 * sizeof(unsigned long long), s));
    CK(cudaMemsetAsync(d_sum, 0, 2 * sizeof(unsigned long long), s));
    unsigned long long want = 0;
    for (int it = 0; it < 40; it++) {
        size_t n = ((size_t)(it % 8) + 1) * 131072 + (size_t)it * 1000; // 0.5 .. 4.2 MiB
        unsigned *p;
        CK(cudaMallocAsync((void **)&p, n * sizeof(unsigned), s));
        unsigned blocks = (unsigned)((n + 255) / 256);
        fill<<<blocks, 256, 0, s>>>(p, n, (unsigned)it);
        CK(cudaGetLastError());
        sum_into<<<blocks, 256, 0, s>>>(p, n, d_sum);
        CK(cudaGetLastError());
        CK(cudaFreeAsync(p, s));
        want += expected(n, (unsigned)it);
    }
    CK(cudaStreamSynchronize(s));

    // An explicit pool on the same device.
    cudaMemPoolProps props;
    memset(&props, 0, sizeof props);
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = dev;
    cudaMemPool_t own;
    CK(cudaMemPoolCreate(&own, &props));
    unsigned long long want2 = 0;
    for (int it = 0; it < 8; it++) {
        size_t n = 262144 + (size_t)it * 4096;
        unsigned *p;
        CK(cudaMallocFromPoolAsync((void **)&p, n * sizeof(unsigned), own, s));
        fill<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(p, n, 7u * (unsigned)it);
        CK(cudaGetLastError());
        sum_into<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(p, n, d_sum + 1);
        CK(cudaGetLastError());
        CK(cudaFreeAsync(p, s));
        want2 += expected(n, 7u * (unsigned)it);
    }
    CK(cudaMemcpyAsync(h_sum, d_sum, sizeof h_sum, cudaMemcpyDeviceToHost, s));
    CK(cudaFreeAsync(d_sum, s));
    CK(cudaStreamSynchronize(s));
    CK(cudaMemPoolTrimTo(own, 0));
    uint64_t used_own = 1, used_default = 1;
    CK(cudaMemPoolGetAttribute(own, cudaMemPoolAttrUsedMemCurrent, &used_own));
    CK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used_default));
    CK(cudaMemPoolDestroy(own));
    CK(cudaStreamDestroy(s));
    CK(cudaDeviceSynchronize());

    printf("default pool sum %llu expected %llu\n", h_sum[0], want);
    printf("own pool sum %llu expected %llu\n", h_sum[1], want2);
    printf("used after free: default %llu own %llu\n", (unsigned long long)used_default,
           (unsigned long long)used_own);
    if (h_sum[0] != want || h_sum[1] != want2 || used_own != 0 || used_default != 0) {
        printf("FAIL\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
