// thrust::sort of 1M pseudo-random ints (fixed LCG seed) in a device_vector, plus a device
// reduce and a sort_by_key. Prints checksums and whether the result is sorted.
// Build: nvcc -o thrust_sort thrust_sort.cu
#include <thrust/copy.h>
#include <thrust/device_vector.h>
#include <thrust/functional.h>
#include <thrust/host_vector.h>
#include <thrust/reduce.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>
#include <cstdint>
#include <cstdio>
#include <exception>
#include "apps_common.h"

static int check(cudaError_t e, const char *what) {
    if (e != cudaSuccess) {
        fprintf(stderr, "FAIL %s: %s\n", what, cudaGetErrorString(e));
        return 1;
    }
    return 0;
}

static int run() {
    const int n = 1 << 20;
    thrust::host_vector<int> h(n);
    uint32_t x = 12345u;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        h[i] = (int)(x >> 1) - (1 << 30); // negative and positive values
    }
    long long host_sum = 0;
    for (int i = 0; i < n; i++) host_sum += h[i];

    thrust::device_vector<int> d = h;
    report_libcuda();
    long long dev_sum = thrust::reduce(d.begin(), d.end(), 0LL, thrust::plus<long long>());
    thrust::sort(d.begin(), d.end());
    if (check(cudaDeviceSynchronize(), "sort")) return 1;
    thrust::host_vector<int> s = d;

    // Keys descending, values carried along.
    thrust::device_vector<int> keys = h;
    thrust::device_vector<int> vals(n);
    thrust::sequence(vals.begin(), vals.end());
    thrust::sort_by_key(keys.begin(), keys.end(), vals.begin(), thrust::greater<int>());
    if (check(cudaDeviceSynchronize(), "sort_by_key")) return 1;
    thrust::host_vector<int> hk = keys, hv = vals;

    bool sorted = true, desc = true, pairs = true;
    uint64_t cks = 0, cks2 = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && s[i - 1] > s[i]) sorted = false;
        if (i > 0 && hk[i - 1] < hk[i]) desc = false;
        if (hv[i] < 0 || hv[i] >= n || h[hv[i]] != hk[i]) pairs = false;
        cks = cks * 1000003u + (uint32_t)s[i];
        cks2 += (uint64_t)(uint32_t)hv[i] * (uint64_t)(i % 1009 + 1);
    }
    printf("thrust sort n %d\n", n);
    printf("sum host %lld device %lld\n", host_sum, dev_sum);
    printf("min %d max %d median %d\n", s[0], s[n - 1], s[n / 2]);
    printf("checksum %llu\n", (unsigned long long)cks);
    printf("sorted %s\n", sorted ? "yes" : "no");
    printf("sort_by_key descending %s pairs %s checksum %llu\n", desc ? "yes" : "no",
           pairs ? "ok" : "BAD", (unsigned long long)cks2);
    if (!sorted || !desc || !pairs || host_sum != dev_sum) {
        printf("FAIL\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}

int main() {
    try {
        return run();
    } catch (const std::exception &e) {
        fprintf(stderr, "FAIL exception: %s\n", e.what());
        return 1;
    }
}
