/*
 * A steady tenant (bench/faults): runs vgpu_timed_spin kernels back to back for DURATION_S
 * seconds (BATCH kernels, then an event waited for), printing the throughput about every
 * 100 ms (TP lines) and every error with its time (ERR lines); see faults_common.h.
 *
 * Usage: worker SPIN_MODULE DURATION_S KERNEL_US GRID BLOCK [BATCH]
 *   SPIN_MODULE  a PTX or cubin file holding vgpu_timed_spin(u64 ns)
 *
 * After an error it destroys its context and tries to build a fresh one (and go on) for
 * FAULTS_RECOVER_S seconds (default 3); if that fails, or the device is gone
 * (CUDA_ERROR_DEVICE_UNAVAILABLE, CUDA_ERROR_NO_DEVICE), it exits 4 and run.sh starts a
 * new process. Exit: 0 at the end of the run, 2 bad usage, 3 no set-up, 4 gave up, 9
 * watchdog.
 */
#include "faults_common.h"

static int device_gone(CUresult rc) {
    return (int)rc == 46 || (int)rc == 100; /* DEVICE_UNAVAILABLE, NO_DEVICE */
}

int main(int argc, char **argv) {
    if (argc < 6 || argc > 7) {
        fprintf(stderr, "usage: %s SPIN_MODULE DURATION_S KERNEL_US GRID BLOCK [BATCH]\n",
                argv[0]);
        return 2;
    }
    double start = now_s();
    double duration = atof(argv[2]);
    double deadline = start + duration;
    int batch = argc == 7 ? atoi(argv[6]) : 4;
    double recover_s = getenv("FAULTS_RECOVER_S") ? atof(getenv("FAULTS_RECOVER_S")) : 3.0;
    struct spin s;
    memset(&s, 0, sizeof s);
    s.ns = strtoull(argv[3], NULL, 0) * 1000ull;
    s.grid = (unsigned)atoi(argv[4]);
    s.block = (unsigned)atoi(argv[5]);
    if (batch < 1 || s.grid < 1 || s.block < 1) {
        fprintf(stderr, "bad BATCH, GRID or BLOCK\n");
        return 2;
    }
    start_watchdog(duration + 30);
    void *image = read_file(argv[1]);
    if (image == NULL) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    OUT("START t=%.6f pid=%d role=worker\n", start, (int)getpid());

    const char *call = "cuInit";
    CUresult rc = cuInit(0);
    if (rc == CUDA_SUCCESS) {
        rc = spin_open(&s, image, &call);
    }
    if (rc != CUDA_SUCCESS) {
        report_err(call, rc);
        return 3;
    }
    OUT("READY t=%.6f\n", now_s());

    struct throughput tp = {now_s(), 0};
    unsigned long long kernels = 0, errors = 0;
    int first = 1;
    while (now_s() < deadline) {
        rc = spin_batch(&s, batch, &call);
        if (rc == CUDA_SUCCESS) {
            kernels += (unsigned long long)batch;
            if (first) {
                OUT("FIRST_OK t=%.6f since_start=%.6f\n", now_s(), now_s() - start);
                first = 0;
            }
            tp_add(&tp, (unsigned long long)batch);
            continue;
        }
        double t_err = now_s();
        report_err(call, rc);
        errors++;
        tp_flush(&tp);
        if (device_gone(rc)) {
            OUT("INFO the device is gone; exiting for a fresh process\n");
            return 4;
        }
        /* A sticky error poisons the context: replace it. */
        CUresult drc = spin_close(&s);
        OUT("INFO cuCtxDestroy after the error returned %d (%s)\n", (int)drc, err_name(drc));
        int recovered = 0;
        while (now_s() - t_err < recover_s && now_s() < deadline) {
            CUresult orc = spin_open(&s, image, &call);
            if (orc == CUDA_SUCCESS) {
                recovered = 1;
                break;
            }
            OUT("INFO recovery: %s returned %d (%s)\n", call, (int)orc, err_name(orc));
            spin_close(&s);
            if (device_gone(orc)) {
                break;
            }
            usleep(50000);
        }
        if (!recovered) {
            OUT("INFO could not recover in-process within %.1f s; exiting\n", recover_s);
            return 4;
        }
        OUT("RECOVERED t=%.6f after=%.6f\n", now_s(), now_s() - t_err);
        first = 1;
        tp.since = now_s();
        tp.n = 0;
    }
    tp_flush(&tp);
    OUT("DONE t=%.6f kernels=%llu errors=%llu\n", now_s(), kernels, errors);
    CUresult drc = spin_close(&s);
    if (drc != CUDA_SUCCESS) {
        report_err("cuCtxDestroy", drc);
    }
    return 0;
}
