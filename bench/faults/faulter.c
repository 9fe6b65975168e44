/*
 * The faulting tenant (bench/faults): runs vgpu_timed_spin kernels like worker.c for
 * RUN_MS milliseconds, then launches vgpu_fault(KIND) (KIND 0: an illegal address, 1: a
 * trap) on one thread, records the error the next synchronizing call returns and whether
 * it is sticky, destroys its context and exits 0. run.sh starts a new faulter at once;
 * recovery time = this FAULT_LAUNCH to the next process's FIRST_OK.
 * KIND -1 never faults: the tenant runs until RUN_MS passes or it is killed.
 *
 * Usage: faulter SPIN_MODULE FAULT_MODULE RUN_MS KIND KERNEL_US GRID BLOCK
 * Lines (besides those of faults_common.h):
 *   FAULT_LAUNCH t=.. kind=.. rc=..           cuLaunchKernel(vgpu_fault) returned rc
 *   FAULT_SEEN t=.. kind=.. rc=.. name=.. after=..  cuCtxSynchronize's error, after s
 *   STICKY t=.. kind=.. alloc=.. sync=.. same=0|1   later calls' results
 *   DESTROY t=.. rc=..                        cuCtxDestroy of the poisoned context
 * Exit: 0 done (faulted, or ran RUN_MS), 2 usage, 3 no set-up, 5 an error before the
 * fault, 9 watchdog.
 */
#include "faults_common.h"

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr,
                "usage: %s SPIN_MODULE FAULT_MODULE RUN_MS KIND KERNEL_US GRID BLOCK\n",
                argv[0]);
        return 2;
    }
    double start = now_s();
    double run_s = atof(argv[3]) / 1000.0;
    long long kind = atoll(argv[4]);
    struct spin s;
    memset(&s, 0, sizeof s);
    s.ns = strtoull(argv[5], NULL, 0) * 1000ull;
    s.grid = (unsigned)atoi(argv[6]);
    s.block = (unsigned)atoi(argv[7]);
    if (s.grid < 1 || s.block < 1) {
        fprintf(stderr, "bad GRID or BLOCK\n");
        return 2;
    }
    start_watchdog(run_s + 30);
    void *spin_image = read_file(argv[1]);
    void *fault_image = read_file(argv[2]);
    if (spin_image == NULL || fault_image == NULL) {
        fprintf(stderr, "cannot read %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    OUT("START t=%.6f pid=%d role=faulter kind=%lld\n", start, (int)getpid(), kind);

    const char *call = "cuInit";
    CUresult rc = cuInit(0);
    if (rc == CUDA_SUCCESS) {
        rc = spin_open(&s, spin_image, &call);
    }
    CUmodule fault_mod = NULL;
    CUfunction fault_fn = NULL;
    if (rc == CUDA_SUCCESS && (rc = cuModuleLoadData(&fault_mod, fault_image)) != CUDA_SUCCESS) {
        call = "cuModuleLoadData(vgpu_fault)";
    }
    if (rc == CUDA_SUCCESS &&
        (rc = cuModuleGetFunction(&fault_fn, fault_mod, "vgpu_fault")) != CUDA_SUCCESS) {
        call = "cuModuleGetFunction(vgpu_fault)";
    }
    if (rc != CUDA_SUCCESS) {
        report_err(call, rc);
        return 3;
    }
    OUT("READY t=%.6f\n", now_s());

    struct throughput tp = {now_s(), 0};
    unsigned long long kernels = 0;
    int first = 1;
    while (now_s() - start < run_s) {
        rc = spin_batch(&s, 4, &call);
        if (rc != CUDA_SUCCESS) {
            report_err(call, rc);
            tp_flush(&tp);
            return 5;
        }
        kernels += 4;
        if (first) {
            OUT("FIRST_OK t=%.6f since_start=%.6f\n", now_s(), now_s() - start);
            first = 0;
        }
        tp_add(&tp, 4);
    }
    tp_flush(&tp);
    if (kind < 0) {
        OUT("DONE t=%.6f kernels=%llu errors=0\n", now_s(), kernels);
        spin_close(&s);
        return 0;
    }

    unsigned long long arg = (unsigned long long)kind;
    void *params[] = {&arg};
    double t_launch = now_s();
    rc = cuLaunchKernel(fault_fn, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
    OUT("FAULT_LAUNCH t=%.6f kind=%lld rc=%d\n", t_launch, kind, (int)rc);
    CUresult seen = ctx_synchronize();
    double t_seen = now_s();
    OUT("FAULT_SEEN t=%.6f kind=%lld rc=%d name=%s after=%.6f\n", t_seen, kind, (int)seen,
        err_name(seen), t_seen - t_launch);
    CUdeviceptr p = 0;
    CUresult alloc = cuMemAlloc(&p, 4096);
    CUresult again = ctx_synchronize();
    OUT("STICKY t=%.6f kind=%lld alloc=%d sync=%d same=%d\n", now_s(), kind, (int)alloc,
        (int)again, seen != CUDA_SUCCESS && alloc == seen && again == seen);
    CUresult drc = spin_close(&s);
    OUT("DESTROY t=%.6f rc=%d\n", now_s(), (int)drc);
    OUT("DONE t=%.6f kernels=%llu errors=1\n", now_s(), kernels);
    return 0;
}
