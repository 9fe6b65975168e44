/*
 * A tenant whose kernel faults: launches vgpu_fault (tests/ptx/vgpu_fault.ptx)
 * with kind 0 (illegal address) and then kind 1 (trap), each in its own context,
 * and checks the native CUDA behaviour: the launch is accepted, the next
 * synchronizing call returns the sticky error (700, then 719), every later call
 * in that context returns it too, cuCtxDestroy succeeds and frees what the
 * context held, and a fresh context then works.
 *
 * Usage: fault_client FAULT_PTX SPIN_PTX [KIND]
 * Sets up a context (and runs one timed kernel), prints "READY", waits for a line
 * on stdin, then faults. Prints "FAULTED kind=<k> rc=<rc>" per fault. With KIND, only
 * that one fault and its sticky checks: on a real GPU a fault costs the backend process
 * its CUDA state, and the slice's backend restarts (the fresh-context steps then belong
 * to a new process).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define BUF_BYTES (1u << 20)

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

static void *g_fault_ptx;
static void *g_spin_ptx;

struct tenant {
    CUcontext ctx;
    CUfunction fault;
    CUfunction spin;
    CUdeviceptr buf;
};

/* A fresh context with both modules loaded, a buffer, and one timed kernel run. */
static void open_tenant(struct tenant *t, const char *when) {
    char what[160];
    CUmodule faults = NULL, spins = NULL;
    CUdevice dev = 0;
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    snprintf(what, sizeof what, "cuCtxCreate %s", when);
    require_rc(cuCtxCreate(&t->ctx, 0, dev), what);
    require_rc(cuModuleLoadData(&faults, g_fault_ptx), "cuModuleLoadData(vgpu_fault.ptx)");
    require_rc(cuModuleGetFunction(&t->fault, faults, "vgpu_fault"), "cuModuleGetFunction(vgpu_fault)");
    require_rc(cuModuleLoadData(&spins, g_spin_ptx), "cuModuleLoadData(vgpu_timed_spin.ptx)");
    require_rc(cuModuleGetFunction(&t->spin, spins, "vgpu_timed_spin"),
               "cuModuleGetFunction(vgpu_timed_spin)");
    require_rc(cuMemAlloc(&t->buf, BUF_BYTES), "cuMemAlloc");
    unsigned long long ns = 100000;
    void *params[] = {&ns};
    snprintf(what, sizeof what, "a timed kernel runs in a context created %s", when);
    require_rc(cuLaunchKernel(t->spin, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL), what);
    require_rc(cuCtxSynchronize(), what);
}

static size_t free_memory(void) {
    size_t free_b = 0, total_b = 0;
    require_rc(cuMemGetInfo(&free_b, &total_b), "cuMemGetInfo");
    return free_b;
}

static void fault_once(struct tenant *t, unsigned long long kind, CUresult sticky) {
    char what[160];
    static uint32_t host[1024];
    unsigned long long ns = 100000;
    void *spin_params[] = {&ns};
    void *fault_params[] = {&kind};

    snprintf(what, sizeof what, "cuLaunchKernel(vgpu_fault kind %llu) is accepted", kind);
    check_rc(cuLaunchKernel(t->fault, 1, 1, 1, 1, 1, 1, 0, NULL, fault_params, NULL),
             CUDA_SUCCESS, what);
    CUresult rc = cuCtxSynchronize();
    printf("FAULTED kind=%llu rc=%d\n", kind, (int)rc);
    snprintf(what, sizeof what, "kind %llu: the next cuCtxSynchronize returns the sticky error",
             kind);
    check_rc(rc, sticky, what);

    CUdeviceptr p = 0;
    snprintf(what, sizeof what, "kind %llu: cuMemAlloc returns the sticky error", kind);
    check_rc(cuMemAlloc(&p, 4096), sticky, what);
    snprintf(what, sizeof what, "kind %llu: cuMemcpyHtoD returns the sticky error", kind);
    check_rc(cuMemcpyHtoD(t->buf, host, sizeof host), sticky, what);
    snprintf(what, sizeof what, "kind %llu: cuMemcpyDtoH returns the sticky error", kind);
    check_rc(cuMemcpyDtoH(host, t->buf, sizeof host), sticky, what);
    CUmodule m = NULL;
    snprintf(what, sizeof what, "kind %llu: cuModuleLoadData returns the sticky error", kind);
    check_rc(cuModuleLoadData(&m, g_spin_ptx), sticky, what);

    /* Natively a launch into a poisoned context fails at once; a remoted launch is
     * queued and its error arrives with the next synchronizing call. Both are right. */
    rc = cuLaunchKernel(t->spin, 1, 1, 1, 1, 1, 1, 0, NULL, spin_params, NULL);
    printf("INFO kind %llu: cuLaunchKernel into the poisoned context returned %d (%s)\n", kind,
           (int)rc, cu_name(rc));
    snprintf(what, sizeof what, "kind %llu: cuLaunchKernel succeeds or returns the sticky error",
             kind);
    check(rc == CUDA_SUCCESS || rc == sticky, what, "returned %d (%s)", (int)rc, cu_name(rc));
    for (int i = 0; i < 2; i++) {
        snprintf(what, sizeof what, "kind %llu: cuCtxSynchronize stays sticky (%d)", kind, i + 1);
        check_rc(cuCtxSynchronize(), sticky, what);
    }

    snprintf(what, sizeof what, "kind %llu: cuCtxDestroy of the poisoned context", kind);
    check_rc(cuCtxDestroy(t->ctx), CUDA_SUCCESS, what);
    t->ctx = NULL;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s FAULT_PTX SPIN_PTX [KIND]\n", argv[0]);
        return 2;
    }
    start_watchdog((unsigned)env_u64("VGPU_TEST_WATCHDOG_S", 120));
    g_fault_ptx = read_file(argv[1]);
    g_spin_ptx = read_file(argv[2]);
    if (!check(g_fault_ptx != NULL && g_spin_ptx != NULL, "read the PTX files",
               "cannot read %s or %s", argv[1], argv[2])) {
        finish();
    }
    require_rc(cuInit(0), "cuInit");

    struct tenant t;
    memset(&t, 0, sizeof t);
    open_tenant(&t, "at start");
    size_t free_with_buffer = free_memory();

    printf("READY\n");
    fflush(stdout);
    char line[64];
    if (fgets(line, sizeof line, stdin) == NULL) {
        fail("wait for the go-ahead", "stdin closed");
        finish();
    }

    if (argc == 4) {
        /* One fault of KIND and nothing after it: on a real GPU the fault costs the whole
         * backend process its CUDA state, so the slice's backend restarts. */
        unsigned long long kind = strtoull(argv[3], NULL, 0);
        fault_once(&t, kind, kind == 0 ? CUDA_ERROR_ILLEGAL_ADDRESS : CUDA_ERROR_LAUNCH_FAILED);
        finish();
    }

    fault_once(&t, 0, CUDA_ERROR_ILLEGAL_ADDRESS);
    open_tenant(&t, "after an illegal-address fault");
    size_t free_after = free_memory();
    check(free_after == free_with_buffer, "destroying the poisoned context freed its memory",
          "free %zu, expected %zu", free_after, free_with_buffer);

    fault_once(&t, 1, CUDA_ERROR_LAUNCH_FAILED);
    open_tenant(&t, "after a trap");
    free_after = free_memory();
    check(free_after == free_with_buffer, "destroying the trapped context freed its memory",
          "free %zu, expected %zu", free_after, free_with_buffer);

    require_rc(cuCtxDestroy(t.ctx), "cuCtxDestroy");
    finish();
}
