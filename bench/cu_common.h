/*
 * Shared helpers for the vgpu GPU-machine programs (the C files in bench/ and tests/gpu/).
 *
 * Driver API only. Include this header first (it defines _GNU_SOURCE).
 * Build: gcc -O2 -I/usr/local/cuda/include -Ibench prog.c -lcuda -ldl -lm
 *
 * Context creation goes through dlsym so one binary works against both the real
 * libcuda.so.1 and ours whatever cuda.h maps cuCtxCreate to (CUDA 13 maps it to
 * cuCtxCreate_v4): it tries cuCtxCreate_v2, then cuCtxCreate_v4, then the primary
 * context. Diagnostics go to stderr; stdout carries only the program's result.
 */
#ifndef VGPU_CU_COMMON_H
#define VGPU_CU_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <cuda.h>
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Looks a driver entry point up in the global scope (the libcuda.so.1 the program loaded). */
static inline void *cu_sym(const char *name)
{
    return dlsym(RTLD_DEFAULT, name);
}

static inline const char *cu_err_name(CUresult rc)
{
    CUresult (*get_name)(CUresult, const char **) = NULL;
    const char *name = NULL;
    *(void **)(&get_name) = cu_sym("cuGetErrorName");
    if (get_name != NULL && get_name(rc, &name) == CUDA_SUCCESS && name != NULL)
        return name;
    return "unknown error";
}

#define CU_CHECK(call)                                                                   \
    do {                                                                                 \
        CUresult cu_rc_ = (call);                                                        \
        if (cu_rc_ != CUDA_SUCCESS) {                                                    \
            fprintf(stderr, "%s:%d: %s failed: %d (%s)\n", __FILE__, __LINE__, #call,    \
                    (int)cu_rc_, cu_err_name(cu_rc_));                                   \
            exit(2);                                                                     \
        }                                                                                \
    } while (0)

/* Like CU_CHECK but returns the error from the enclosing CUresult function. */
#define CU_TRY(call)                                                                     \
    do {                                                                                 \
        CUresult cu_rc_ = (call);                                                        \
        if (cu_rc_ != CUDA_SUCCESS) {                                                    \
            fprintf(stderr, "%s:%d: %s failed: %d (%s)\n", __FILE__, __LINE__, #call,    \
                    (int)cu_rc_, cu_err_name(cu_rc_));                                   \
            return cu_rc_;                                                               \
        }                                                                                \
    } while (0)

static inline int cu_find_lib_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    const char *name = info->dlpi_name;
    const char *base;
    if (name == NULL || name[0] == '\0')
        return 0;
    base = strrchr(name, '/');
    base = base != NULL ? base + 1 : name;
    if (strncmp(base, "libcuda.so", 10) != 0)
        return 0;
    *(const char **)data = name;
    return 1;
}

/* Real path of the libcuda.so* this process loaded (so a run can prove which one it used). */
static inline const char *cu_lib_path(void)
{
    static char resolved[PATH_MAX];
    const char *name = NULL;
    dl_iterate_phdr(cu_find_lib_cb, &name);
    if (name == NULL)
        return "unknown";
    if (realpath(name, resolved) == NULL) {
        strncpy(resolved, name, sizeof resolved - 1);
        resolved[sizeof resolved - 1] = '\0';
    }
    return resolved;
}

typedef struct {
    CUdevice dev;
    CUcontext ctx;
    int primary;     /* 1: primary context, released on close */
    const char *how; /* which entry point created the context */
    char name[256];  /* device name */
    int driver_version;
} cu_session;

/* Reports a failed context creation; true when the next entry point should be tried. */
static inline int cu_ctx_fallthrough(const char *entry, CUresult rc)
{
    /* 801 CUDA_ERROR_NOT_SUPPORTED, 500 CUDA_ERROR_NOT_FOUND (numeric: minimal headers). */
    int next = (int)rc == 801 || (int)rc == 500;
    fprintf(stderr, "%s failed: %d (%s)%s\n", entry, (int)rc, cu_err_name(rc),
            next ? ", trying the next entry point" : "");
    return next;
}

static inline void cu_open(cu_session *s, int ordinal)
{
    CUresult (*create_v2)(CUcontext *, unsigned int, CUdevice) = NULL;
    CUresult (*create_v4)(CUcontext *, void *, unsigned int, CUdevice) = NULL;
    CUresult (*retain)(CUcontext *, CUdevice) = NULL;
    CUresult (*set_current)(CUcontext) = NULL;
    CUresult (*driver_version)(int *) = NULL;
    CUresult rc;

    memset(s, 0, sizeof *s);
    CU_CHECK(cuInit(0));
    CU_CHECK(cuDeviceGet(&s->dev, ordinal));
    CU_CHECK(cuDeviceGetName(s->name, (int)sizeof s->name - 1, s->dev));
    *(void **)(&driver_version) = cu_sym("cuDriverGetVersion");
    if (driver_version == NULL || driver_version(&s->driver_version) != CUDA_SUCCESS)
        s->driver_version = 0;

    *(void **)(&create_v2) = cu_sym("cuCtxCreate_v2");
    *(void **)(&create_v4) = cu_sym("cuCtxCreate_v4");
    *(void **)(&retain) = cu_sym("cuDevicePrimaryCtxRetain");
    *(void **)(&set_current) = cu_sym("cuCtxSetCurrent");
    /* Each entry point in turn; one that exists but is refused as unsupported falls through. */
    if (create_v2 != NULL) {
        rc = create_v2(&s->ctx, 0, s->dev);
        if (rc == CUDA_SUCCESS)
            s->how = "cuCtxCreate_v2";
        else if (!cu_ctx_fallthrough("cuCtxCreate_v2", rc))
            exit(2);
    }
    if (s->how == NULL && create_v4 != NULL) {
        /* CUctxCreateParams, all members zero: a regular context. Oversized on purpose. */
        unsigned char params[64];
        memset(params, 0, sizeof params);
        rc = create_v4(&s->ctx, params, 0, s->dev);
        if (rc == CUDA_SUCCESS)
            s->how = "cuCtxCreate_v4";
        else if (!cu_ctx_fallthrough("cuCtxCreate_v4", rc))
            exit(2);
    }
    if (s->how == NULL && retain != NULL && set_current != NULL) {
        CU_CHECK(retain(&s->ctx, s->dev));
        CU_CHECK(set_current(s->ctx));
        s->primary = 1;
        s->how = "cuDevicePrimaryCtxRetain";
    }
    if (s->how == NULL) {
        fprintf(stderr, "no usable context-creation entry point in %s\n", cu_lib_path());
        exit(2);
    }
    fprintf(stderr, "libcuda: %s\ndevice: %s (driver %d), context via %s\n", cu_lib_path(),
            s->name, s->driver_version, s->how);
}

static inline void cu_close(cu_session *s)
{
    if (s->primary) {
        CUresult (*release)(CUdevice) = NULL;
        *(void **)(&release) = cu_sym("cuDevicePrimaryCtxRelease_v2");
        if (release != NULL)
            CU_CHECK(release(s->dev));
    } else {
        CU_CHECK(cuCtxDestroy(s->ctx));
    }
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of an array sorted ascending. */
static inline double percentile_sorted(const double *v, size_t n, double p)
{
    size_t rank;
    if (n == 0)
        return 0.0;
    rank = (size_t)((p / 100.0) * (double)n + 0.999999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return v[rank - 1];
}

/* Median of n values (sorts v in place). */
static inline double median(double *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_double);
    if (n == 0)
        return 0.0;
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Prints s as a JSON string literal. */
static inline void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

/* Common leading members of every benchmark's JSON object (no braces). */
static inline void json_preamble(FILE *f, const char *bench, const cu_session *s)
{
    fprintf(f, "\"bench\":");
    json_str(f, bench);
    fprintf(f, ",\"libcuda\":");
    json_str(f, cu_lib_path());
    fprintf(f, ",\"device\":");
    json_str(f, s->name);
    fprintf(f, ",\"driver_version\":%d,\"context_via\":", s->driver_version);
    json_str(f, s->how);
}

/* Positive integer from argv[i] if present, else def. */
static inline long arg_long(int argc, char **argv, int i, long def)
{
    char *end = NULL;
    long v;
    if (argc <= i)
        return def;
    v = strtol(argv[i], &end, 10);
    if (end == argv[i] || *end != '\0' || v <= 0) {
        fprintf(stderr, "bad argument %s\n", argv[i]);
        exit(2);
    }
    return v;
}

#endif /* VGPU_CU_COMMON_H */
