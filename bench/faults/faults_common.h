/*
 * Shared by worker.c and faulter.c (bench/faults): time stamps, module loading and the
 * steady kernel loop, on the CUDA driver API only (so the programs run natively, under
 * MPS, and through vgpu's libcuda.so.1 alike).
 *
 * Every line a program prints starts with a keyword and carries t=<CLOCK_REALTIME seconds>,
 * so run.sh and report.py can line events of several processes up:
 *   READY t=..                        set up (context, module), about to launch
 *   FIRST_OK t=.. since_start=..      the first batch of kernels completed
 *   TP t=.. n=.. dt=..                n kernels completed in the last dt seconds (~0.1 s)
 *   ERR t=.. call=.. rc=.. name=..    a call failed
 *   INFO ..                           anything else worth keeping
 *   DONE t=.. kernels=.. errors=..    the end of a run that was not killed
 */
#ifndef VGPU_BENCH_FAULTS_COMMON_H
#define VGPU_BENCH_FAULTS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cuda.h>

#define OUT(...)                                                                               \
    do {                                                                                       \
        printf(__VA_ARGS__);                                                                   \
        fflush(stdout);                                                                        \
    } while (0)

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline const char *err_name(CUresult rc) {
    const char *name = NULL;
    if (cuGetErrorName(rc, &name) != CUDA_SUCCESS || name == NULL) {
        return "?";
    }
    return name;
}

static inline void report_err(const char *call, CUresult rc) {
    OUT("ERR t=%.6f call=%s rc=%d name=%s\n", now_s(), call, (int)rc, err_name(rc));
}

/* The whole file plus a NUL (PTX must be NUL-terminated), or NULL. */
static inline void *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return NULL;
    }
    long n = ftell(f);
    if (n < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    char *buf = calloc(1, (size_t)n + 1);
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

static inline void on_watchdog(int sig) {
    (void)sig;
    static const char msg[] = "INFO watchdog: the program ran past its limit\n";
    ssize_t ignored = write(STDOUT_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    _exit(9);
}

/* Ends the process (exit 9) if it is still running after `seconds`. */
static inline void start_watchdog(double seconds) {
    signal(SIGALRM, on_watchdog);
    alarm((unsigned)(seconds + 1));
}

/* A driver entry point from the libcuda.so.1 the process loaded (NULL if it lacks it). */
static inline void *cu_sym(const char *name) {
    return dlsym(RTLD_DEFAULT, name);
}

/* A new context, current on this thread. cuda.h of CUDA 13 maps cuCtxCreate to
 * cuCtxCreate_v4, so the entry points are looked up by name: _v2, then _v4. */
static inline CUresult ctx_create(CUcontext *ctx, CUdevice dev) {
    CUresult (*v2)(CUcontext *, unsigned int, CUdevice) = NULL;
    CUresult (*v4)(CUcontext *, void *, unsigned int, CUdevice) = NULL;
    CUresult rc = CUDA_ERROR_NOT_SUPPORTED;
    *(void **)(&v2) = cu_sym("cuCtxCreate_v2");
    *(void **)(&v4) = cu_sym("cuCtxCreate_v4");
    if (v2 != NULL) {
        rc = v2(ctx, 0, dev);
        /* 801 NOT_SUPPORTED, 500 NOT_FOUND: try the next entry point. */
        if ((int)rc != 801 && (int)rc != 500) {
            return rc;
        }
    }
    if (v4 != NULL) {
        unsigned char params[64]; /* CUctxCreateParams, all zero; oversized on purpose */
        memset(params, 0, sizeof params);
        rc = v4(ctx, params, 0, dev);
    }
    return rc;
}

/* cuCtxSynchronize() of the current context (CUDA 13's cuda.h may map the name to the
 * _v2 that takes a context, so it is looked up by name). */
static inline CUresult ctx_synchronize(void) {
    CUresult (*sync)(void) = NULL;
    *(void **)(&sync) = cu_sym("cuCtxSynchronize");
    if (sync == NULL) {
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    return sync();
}

/* One context running vgpu_timed_spin(ns) on grid x block threads. */
struct spin {
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    CUevent done;
    unsigned long long ns;
    unsigned grid, block;
};

/* Creates the context, loads `image` and looks the kernel up. On failure returns the
 * error with *call naming the failed call (the context, if created, stays for
 * spin_close). */
static inline CUresult spin_open(struct spin *s, const void *image, const char **call) {
    CUdevice dev = 0;
    CUresult rc;
    s->ctx = NULL;
    s->mod = NULL;
    s->done = NULL;
    if ((rc = cuDeviceGet(&dev, 0)) != CUDA_SUCCESS) {
        *call = "cuDeviceGet";
        return rc;
    }
    if ((rc = ctx_create(&s->ctx, dev)) != CUDA_SUCCESS) {
        s->ctx = NULL;
        *call = "cuCtxCreate";
        return rc;
    }
    if ((rc = cuModuleLoadData(&s->mod, image)) != CUDA_SUCCESS) {
        *call = "cuModuleLoadData";
        return rc;
    }
    if ((rc = cuModuleGetFunction(&s->fn, s->mod, "vgpu_timed_spin")) != CUDA_SUCCESS) {
        *call = "cuModuleGetFunction";
        return rc;
    }
    if ((rc = cuEventCreate(&s->done, CU_EVENT_DISABLE_TIMING)) != CUDA_SUCCESS) {
        s->done = NULL;
        *call = "cuEventCreate";
        return rc;
    }
    return CUDA_SUCCESS;
}

/* Destroys the context (and everything in it). Returns cuCtxDestroy's result. */
static inline CUresult spin_close(struct spin *s) {
    CUresult rc = CUDA_SUCCESS;
    if (s->ctx != NULL) {
        rc = cuCtxDestroy(s->ctx);
    }
    s->ctx = NULL;
    s->mod = NULL;
    s->done = NULL;
    return rc;
}

/* Launches `n` kernels, records an event behind them and waits for it. */
static inline CUresult spin_batch(struct spin *s, int n, const char **call) {
    void *params[] = {&s->ns};
    CUresult rc;
    for (int i = 0; i < n; i++) {
        rc = cuLaunchKernel(s->fn, s->grid, 1, 1, s->block, 1, 1, 0, NULL, params, NULL);
        if (rc != CUDA_SUCCESS) {
            *call = "cuLaunchKernel";
            return rc;
        }
    }
    if ((rc = cuEventRecord(s->done, NULL)) != CUDA_SUCCESS) {
        *call = "cuEventRecord";
        return rc;
    }
    if ((rc = cuEventSynchronize(s->done)) != CUDA_SUCCESS) {
        *call = "cuEventSynchronize";
        return rc;
    }
    return CUDA_SUCCESS;
}

/* Kernels completed, printed as a TP line about every 100 ms. */
struct throughput {
    double since;
    unsigned long long n;
};

static inline void tp_add(struct throughput *tp, unsigned long long kernels) {
    double t = now_s();
    tp->n += kernels;
    if (t - tp->since >= 0.1) {
        OUT("TP t=%.6f n=%llu dt=%.4f\n", t, tp->n, t - tp->since);
        tp->since = t;
        tp->n = 0;
    }
}

static inline void tp_flush(struct throughput *tp) {
    double t = now_s();
    if (tp->n > 0) {
        OUT("TP t=%.6f n=%llu dt=%.4f\n", t, tp->n, t - tp->since);
    }
    tp->since = t;
    tp->n = 0;
}

#endif /* VGPU_BENCH_FAULTS_COMMON_H */
