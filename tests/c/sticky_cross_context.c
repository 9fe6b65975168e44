/*
 * Sticky errors stay with their context. Context A faults (vgpu_fault) and gets one
 * more asynchronous launch, whose error the library receives while context B makes
 * calls. Natively: B's calls succeed, A's next synchronize returns the sticky error and
 * every later launch into A fails at once, and cuCtxDestroy(A) succeeds and frees A's
 * memory.
 *
 * Usage: sticky_cross_context FAULT_PTX SPIN_PTX
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "check.h"

#define A_BYTES (64u << 20)

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

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FAULT_PTX SPIN_PTX\n", argv[0]);
        return 2;
    }
    start_watchdog(60);
    void *fault_ptx = read_file(argv[1]);
    void *spin_ptx = read_file(argv[2]);
    if (!check(fault_ptx != NULL && spin_ptx != NULL, "read the PTX files", "cannot read them")) {
        finish();
    }
    CUdevice dev = 0;
    CUcontext a = NULL, b = NULL;
    CUmodule faults = NULL, spins = NULL;
    CUfunction fault = NULL, spin = NULL;
    CUdeviceptr p = 0;
    size_t free_before = 0, free_after = 0, total = 0;
    unsigned long long kind = 0, ns = 1000;
    void *fault_params[] = {&kind};
    void *spin_params[] = {&ns};

    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuCtxCreate(&b, 0, dev), "cuCtxCreate(B)");
    require_rc(cuMemGetInfo(&free_before, &total), "cuMemGetInfo");
    require_rc(cuCtxCreate(&a, 0, dev), "cuCtxCreate(A)");
    require_rc(cuModuleLoadData(&faults, fault_ptx), "cuModuleLoadData(vgpu_fault)");
    require_rc(cuModuleGetFunction(&fault, faults, "vgpu_fault"), "cuModuleGetFunction(vgpu_fault)");
    require_rc(cuModuleLoadData(&spins, spin_ptx), "cuModuleLoadData(vgpu_timed_spin)");
    require_rc(cuModuleGetFunction(&spin, spins, "vgpu_timed_spin"),
               "cuModuleGetFunction(vgpu_timed_spin)");
    require_rc(cuMemAlloc(&p, A_BYTES), "cuMemAlloc in A");

    require_rc(cuLaunchKernel(fault, 1, 1, 1, 1, 1, 1, 0, NULL, fault_params, NULL),
               "cuLaunchKernel(vgpu_fault) in A");
    /* Queued behind the fault: natively it may already fail, remoted its error comes later. */
    CUresult rc = cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, NULL, spin_params, NULL);
    check(rc == CUDA_SUCCESS || rc == CUDA_ERROR_ILLEGAL_ADDRESS, "a launch into A after the fault",
          "returned %d", (int)rc);

    require_rc(cuCtxSetCurrent(b), "cuCtxSetCurrent(B)");
    size_t f = 0;
    check_rc(cuMemGetInfo(&f, &total), CUDA_SUCCESS, "cuMemGetInfo in B");
    check_rc(cuCtxSynchronize(), CUDA_SUCCESS, "cuCtxSynchronize in B while A is poisoned");

    require_rc(cuCtxSetCurrent(a), "cuCtxSetCurrent(A)");
    check_rc(cuCtxSynchronize(), CUDA_ERROR_ILLEGAL_ADDRESS, "A's cuCtxSynchronize is sticky");
    check_rc(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, NULL, spin_params, NULL),
             CUDA_ERROR_ILLEGAL_ADDRESS, "a launch into the poisoned A fails at once");
    check_rc(cuCtxSynchronize(), CUDA_ERROR_ILLEGAL_ADDRESS, "A's error stays sticky");

    require_rc(cuCtxSetCurrent(b), "cuCtxSetCurrent(B)");
    check_rc(cuMemGetInfo(&f, &total), CUDA_SUCCESS, "cuMemGetInfo in B again");
    check_rc(cuCtxDestroy(a), CUDA_SUCCESS, "cuCtxDestroy(A) of the poisoned context");
    require_rc(cuCtxSetCurrent(b), "cuCtxSetCurrent(B)");
    check_rc(cuCtxSynchronize(), CUDA_SUCCESS, "cuCtxSynchronize in B is not A's error");
    check_rc(cuMemGetInfo(&free_after, &total), CUDA_SUCCESS, "cuMemGetInfo in B after");
    check(free_after == free_before, "destroying A freed its memory", "free %zu, was %zu",
          free_after, free_before);
    require_rc(cuCtxDestroy(b), "cuCtxDestroy(B)");
    finish();
}
