// Shared by the programs in tests/gpu/apps (included as "apps_common.h", found next to the
// source by a plain `nvcc -o X X.cu`): error checks that exit non-zero, and a report on
// stderr of the libcuda the process loaded, which apps_check.sh uses to make sure a slice
// run did not silently use the real driver.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define CK(call)                                                                         \
    do {                                                                                 \
        cudaError_t e_ = (call);                                                         \
        if (e_ != cudaSuccess) {                                                         \
            fprintf(stderr, "FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #call,            \
                    cudaGetErrorString(e_));                                             \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

// Prints "libcuda: <path>" on stderr for the first libcuda.so* mapped into the process
// (call after the first CUDA call: static cudart loads the driver lazily).
static inline void report_libcuda() {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        char *p = strchr(line, '/');
        if (p && strstr(p, "/libcuda.so")) {
            p[strcspn(p, "\n")] = 0;
            fprintf(stderr, "libcuda: %s\n", p);
            break;
        }
    }
    fclose(f);
}
