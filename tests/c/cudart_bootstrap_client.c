/*
 * Does what the statically linked CUDA runtime does at start-up, through a
 * dlopen'ed libcuda.so.1 only: resolves entry points with
 * cuGetProcAddress_v2 (versions and the per-thread-stream flag), fetches
 * the private export tables, loads an nvcc fatbin through a fatbin wrapper
 * with cuLibraryLoadData, gets a CUkernel with cuLibraryGetKernel and
 * launches it with cuLaunchKernel, as the runtime does for `kernel<<<>>>`.
 *
 * Usage: cudart_bootstrap_client FATBIN_SECTION
 *   FATBIN_SECTION: an nvcc `.nv_fatbin` section dump; the fatbin holding
 *   the PTX of vectorAdd(const float *, const float *, float *, int) is used.
 * Env: VGPU_EXPECT_EXECUTION=1|0 as for driver_api_client.
 *
 * Prints one PASS/FAIL line per check and exits non-zero on any failure.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define N 1000
#define KERNEL "_Z9vectorAddPKfS0_Pfi"

typedef CUresult (*get_proc_t)(const char *, void **, int, cuuint64_t, int *);
typedef CUresult (*init_t)(unsigned);
typedef CUresult (*device_get_t)(CUdevice *, int);
typedef CUresult (*get_name_t)(char *, int, CUdevice);
typedef CUresult (*retain_t)(CUcontext *, CUdevice);
typedef CUresult (*set_current_t)(CUcontext);
typedef CUresult (*alloc_t)(CUdeviceptr *, size_t);
typedef CUresult (*free_t)(CUdeviceptr);
typedef CUresult (*htod_t)(CUdeviceptr, const void *, size_t);
typedef CUresult (*dtoh_t)(void *, CUdeviceptr, size_t);
typedef CUresult (*sync_t)(void);
typedef CUresult (*stream_sync_t)(CUstream);
typedef CUresult (*export_t)(const void **, const unsigned char *);
typedef CUresult (*lib_load_t)(void **, const void *, void *, void **, unsigned, void *, void **,
                               unsigned);
typedef CUresult (*lib_kernel_t)(void **, void *, const char *);
typedef CUresult (*lib_unload_t)(void *);
typedef CUresult (*loading_mode_t)(int *);
typedef CUresult (*launch_t)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, CUstream, void **, void **);
typedef CUresult (*param_info_t)(void *, size_t, size_t *, size_t *);
typedef CUresult (*primary_t)(CUcontext *, CUdevice);
typedef CUresult (*integrity_t)(unsigned, unsigned long long, unsigned long long *);
typedef CUresult (*cls_put_t)(CUcontext, void *, void *, void *);
typedef CUresult (*cls_get_t)(void **, CUcontext, void *);

struct wrapper {
    uint32_t magic;
    uint32_t version;
    const void *data;
    const void *prelinked;
};

static void *g_lib;
static get_proc_t g_gpa;

/* cuGetProcAddress_v2(name, version, flags); checks the symbol it maps to. */
static void *resolve(const char *name, int version, unsigned flags, const char *want) {
    void *fn = NULL;
    int status = -1;
    char what[160];
    snprintf(what, sizeof what, "cuGetProcAddress_v2(%s, %d, %u) is %s", name, version, flags,
             want);
    CUresult rc = g_gpa(name, &fn, version, flags, &status);
    void *expected = dlsym(g_lib, want);
    check(rc == CUDA_SUCCESS && status == 0 && fn != NULL && fn == expected, what,
          "rc %d status %d fn %p, dlsym %p", (int)rc, status, fn, expected);
    return fn;
}

/* The last fatbin of the section (nvcc puts the program's own code last). */
static const unsigned char *find_fatbin(const unsigned char *section, size_t len) {
    size_t off = 0;
    const unsigned char *last = NULL;
    while (off + 16 <= len) {
        uint32_t magic;
        uint16_t header;
        uint64_t size;
        memcpy(&magic, section + off, 4);
        memcpy(&header, section + off + 6, 2);
        memcpy(&size, section + off + 8, 8);
        if (magic != 0xBA55ED50u || off + header + size > len) {
            break;
        }
        last = section + off;
        off += header + size;
    }
    return last;
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    /* 8-byte aligned, as fatbins are in an executable. */
    unsigned char *buf = aligned_alloc(8, ((size_t)n + 7) & ~(size_t)7);
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void check_tables(CUcontext primary) {
    export_t get_table = (export_t)resolve("cuGetExportTable", 3000, 0, "cuGetExportTable");
    if (get_table == NULL) {
        return;
    }
    static const struct {
        const char *name;
        unsigned char id[16];
        size_t size;
    } tables[] = {
        {"6bd5fb6c", {0x6b, 0xd5, 0xfb, 0x6c, 0x5b, 0xf4, 0xe7, 0x4a, 0x89, 0x87, 0xd9, 0x39, 0x12,
                      0xfd, 0x9d, 0xf9}, 13 * 8},
        {"a094798c", {0xa0, 0x94, 0x79, 0x8c, 0x2e, 0x74, 0x2e, 0x74, 0x93, 0xf2, 0x08, 0x00, 0x20,
                      0x0c, 0x0a, 0x66}, 7 * 8},
        {"42d85a81", {0x42, 0xd8, 0x5a, 0x81, 0x23, 0xf6, 0xcb, 0x47, 0x82, 0x98, 0xf6, 0xe7, 0x8a,
                      0x3a, 0xec, 0xdc}, 3 * 8},
        {"c693336e", {0xc6, 0x93, 0x33, 0x6e, 0x11, 0x21, 0xdf, 0x11, 0xa8, 0xc3, 0x68, 0xf3, 0x55,
                      0xd8, 0x95, 0x93}, 0},
        {"263e8860", {0x26, 0x3e, 0x88, 0x60, 0x7c, 0xd2, 0x61, 0x43, 0x92, 0xf6, 0xbb, 0xd5, 0x00,
                      0x6d, 0xfa, 0x7e}, 15 * 8},
        {"d4082055", {0xd4, 0x08, 0x20, 0x55, 0xbd, 0xe6, 0x70, 0x4b, 0x8d, 0x34, 0xba, 0x12, 0x3c,
                      0x66, 0xe1, 0xf2}, 3 * 8},
        {"21318c60", {0x21, 0x31, 0x8c, 0x60, 0x97, 0x14, 0x32, 0x48, 0x8c, 0xa6, 0x41, 0xff, 0x73,
                      0x24, 0xc8, 0xf2}, 93 * 8},
    };
    void *const *t[7] = {0};
    for (int i = 0; i < 7; i++) {
        const void *table = NULL;
        char what[96];
        snprintf(what, sizeof what, "cuGetExportTable(%s)", tables[i].name);
        check_rc(get_table(&table, tables[i].id), CUDA_SUCCESS, what);
        t[i] = table;
        if (table != NULL && tables[i].size != 0) {
            snprintf(what, sizeof what, "export table %s is %zu bytes", tables[i].name,
                     tables[i].size);
            size_t size = *(const size_t *)table;
            check(size == tables[i].size, what, "its size slot says %zu", size);
        }
    }
    static const unsigned char unknown[16] = {0xf8, 0xcf, 0xf9, 0x51};
    const void *none = (const void *)1;
    check(get_table(&none, unknown) == CUDA_ERROR_INVALID_VALUE && none == NULL,
          "an unknown export table is refused", "it was not");
    if (t[0] != NULL) {
        CUcontext ctx = NULL;
        check_rc(((primary_t)t[0][2])(&ctx, 0), CUDA_SUCCESS, "cudart table slot 2");
        check(ctx == primary, "cudart slot 2 returns the primary context", "got %p", (void *)ctx);
    }
    if (t[3] != NULL) {
        static int key;
        int value = 7;
        void *got = NULL;
        check_rc(((cls_get_t)t[3][2])(&got, primary, &key), CUDA_ERROR_INVALID_HANDLE,
                 "context storage get before put");
        check_rc(((cls_put_t)t[3][0])(primary, &key, &value, NULL), CUDA_SUCCESS,
                 "context storage put");
        check_rc(((cls_get_t)t[3][2])(&got, NULL, &key), CUDA_SUCCESS,
                 "context storage get (current context)");
        check(got == &value, "context storage returns the value put", "got %p", got);
    }
    if (t[5] != NULL) {
        unsigned long long a[2] = {0}, b[2] = {1};
        integrity_t f = (integrity_t)t[5][1];
        check_rc(f(13002, 1700000000ull, a), CUDA_SUCCESS, "integrity check");
        f(13002, 1700000000ull, b);
        check(a[0] == b[0] && a[1] == b[1] && (a[0] | a[1]) != 0,
              "integrity answer is stable for the same inputs", "it changed");
        f(13002, 1700000001ull, b);
        check(a[0] != b[0] || a[1] != b[1], "integrity answer depends on the time",
              "it did not change");
    }
}

int main(int argc, char **argv) {
    start_watchdog(120);
    if (argc != 2) {
        fprintf(stderr, "usage: %s FATBIN_SECTION\n", argv[0]);
        return 2;
    }
    size_t section_len = 0;
    unsigned char *section = read_file(argv[1], &section_len);
    if (section == NULL) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 2;
    }
    const unsigned char *fatbin = find_fatbin(section, section_len);
    check(fatbin != NULL, "the section holds fatbins", "no fatbin in %s", argv[1]);
    if (fatbin == NULL) {
        finish();
    }

    g_lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    check(g_lib != NULL, "dlopen(libcuda.so.1)", "%s", dlerror());
    if (g_lib == NULL) {
        finish();
    }
    g_gpa = (get_proc_t)dlsym(g_lib, "cuGetProcAddress_v2");
    check(g_gpa != NULL, "dlsym(cuGetProcAddress_v2)", "missing");
    if (g_gpa == NULL) {
        finish();
    }

    init_t init = (init_t)resolve("cuInit", 2000, 0, "cuInit");
    device_get_t device_get = (device_get_t)resolve("cuDeviceGet", 2000, 0, "cuDeviceGet");
    get_name_t get_name = (get_name_t)resolve("cuDeviceGetName", 2000, 0, "cuDeviceGetName");
    retain_t retain =
        (retain_t)resolve("cuDevicePrimaryCtxRetain", 7000, 0, "cuDevicePrimaryCtxRetain");
    set_current_t set_current =
        (set_current_t)resolve("cuCtxSetCurrent", 4000, 0, "cuCtxSetCurrent");
    alloc_t mem_alloc = (alloc_t)resolve("cuMemAlloc", 3020, 0, "cuMemAlloc_v2");
    free_t mem_free = (free_t)resolve("cuMemFree", 3020, 0, "cuMemFree_v2");
    htod_t htod = (htod_t)resolve("cuMemcpyHtoD", 3020, 0, "cuMemcpyHtoD_v2");
    dtoh_t dtoh = (dtoh_t)resolve("cuMemcpyDtoH", 3020, 0, "cuMemcpyDtoH_v2");
    resolve("cuMemcpyHtoD", 7000, 2, "cuMemcpyHtoD_v2_ptds");
    sync_t ctx_sync = (sync_t)resolve("cuCtxSynchronize", 2000, 0, "cuCtxSynchronize");
    stream_sync_t stream_sync_pt =
        (stream_sync_t)resolve("cuStreamSynchronize", 7000, 2, "cuStreamSynchronize_ptsz");
    loading_mode_t loading_mode =
        (loading_mode_t)resolve("cuModuleGetLoadingMode", 11070, 0, "cuModuleGetLoadingMode");
    lib_load_t lib_load = (lib_load_t)resolve("cuLibraryLoadData", 12000, 0, "cuLibraryLoadData");
    lib_kernel_t lib_kernel =
        (lib_kernel_t)resolve("cuLibraryGetKernel", 12000, 0, "cuLibraryGetKernel");
    lib_unload_t lib_unload = (lib_unload_t)resolve("cuLibraryUnload", 12000, 0, "cuLibraryUnload");
    launch_t launch = (launch_t)resolve("cuLaunchKernel", 4000, 0, "cuLaunchKernel");
    launch_t launch_pt = (launch_t)resolve("cuLaunchKernel", 7000, 2, "cuLaunchKernel_ptsz");
    param_info_t param_info =
        (param_info_t)resolve("cuKernelGetParamInfo", 12040, 0, "cuKernelGetParamInfo");
    {
        void *fn = (void *)1;
        int status = -1;
        CUresult rc = g_gpa("cuNoSuchEntryPoint", &fn, 12000, 0, &status);
        check(rc == CUDA_SUCCESS && fn == NULL && status == 1,
              "an unknown name resolves to NULL with SYMBOL_NOT_FOUND", "rc %d fn %p status %d",
              (int)rc, fn, status);
        rc = g_gpa("cuMemAlloc", &fn, 1000, 0, &status);
        check(fn == NULL && status == 2, "too old a version is VERSION_NOT_SUFFICIENT",
              "fn %p status %d", fn, status);
    }
    if (!init || !device_get || !get_name || !retain || !set_current || !mem_alloc || !mem_free ||
        !htod || !dtoh || !ctx_sync || !stream_sync_pt || !loading_mode || !lib_load ||
        !lib_kernel || !lib_unload || !launch || !launch_pt || !param_info) {
        finish();
    }

    require_rc(init(0), "cuInit");
    CUdevice dev = -1;
    require_rc(device_get(&dev, 0), "cuDeviceGet");
    char name[256] = {0};
    require_rc(get_name(name, sizeof name, dev), "cuDeviceGetName");
    const char *env = getenv("VGPU_EXPECT_EXECUTION");
    int executes =
        env != NULL && *env != '\0' ? strcmp(env, "0") != 0 : strstr(name, "mulated") == NULL;
    CUcontext primary = NULL;
    require_rc(retain(&primary, dev), "cuDevicePrimaryCtxRetain");
    require_rc(set_current(primary), "cuCtxSetCurrent(primary)");
    check_tables(primary);

    int mode = 0;
    check_rc(loading_mode(&mode), CUDA_SUCCESS, "cuModuleGetLoadingMode");
    struct wrapper w = {0x466243b1u, 1, fatbin, NULL};
    void *library = NULL;
    require_rc(lib_load(&library, &w, NULL, NULL, 0, NULL, NULL, 0),
               "cuLibraryLoadData(fatbin wrapper)");
    void *kernel = NULL;
    require_rc(lib_kernel(&kernel, library, KERNEL), "cuLibraryGetKernel(vectorAdd)");
    void *again = NULL;
    check_rc(lib_kernel(&again, library, KERNEL), CUDA_SUCCESS, "cuLibraryGetKernel again");
    check(again == kernel, "the same name gives the same CUkernel", "%p vs %p", again, kernel);
    void *missing = NULL;
    check_rc(lib_kernel(&missing, library, "no_such_kernel"), CUDA_ERROR_NOT_FOUND,
             "cuLibraryGetKernel(unknown name)");
    size_t offset = 0, size = 0;
    check_rc(param_info(kernel, 3, &offset, &size), CUDA_SUCCESS, "cuKernelGetParamInfo(n)");
    check(offset == 24 && size == 4, "vectorAdd's n is at offset 24, 4 bytes",
          "offset %zu size %zu", offset, size);

    static float a[N], b[N], c[N];
    for (int i = 0; i < N; i++) {
        a[i] = (float)i;
        b[i] = 0.5f * (float)i;
        c[i] = -1.0f;
    }
    CUdeviceptr da = 0, db = 0, dc = 0;
    require_rc(mem_alloc(&da, sizeof a), "cuMemAlloc_v2 (a)");
    require_rc(mem_alloc(&db, sizeof b), "cuMemAlloc_v2 (b)");
    require_rc(mem_alloc(&dc, sizeof c), "cuMemAlloc_v2 (c)");
    check_rc(htod(da, a, sizeof a), CUDA_SUCCESS, "cuMemcpyHtoD_v2 (a)");
    check_rc(htod(db, b, sizeof b), CUDA_SUCCESS, "cuMemcpyHtoD_v2 (b)");
    check_rc(htod(dc, c, sizeof c), CUDA_SUCCESS, "cuMemcpyHtoD_v2 (c)");
    int n = N;
    void *params[] = {&da, &db, &dc, &n};
    check_rc(launch(kernel, (N + 255) / 256, 1, 1, 256, 1, 1, 0, NULL, params, NULL),
             CUDA_SUCCESS, "cuLaunchKernel(CUkernel)");
    check_rc(ctx_sync(), CUDA_SUCCESS, "cuCtxSynchronize after the launch");
    check_rc(launch_pt(kernel, (N + 255) / 256, 1, 1, 256, 1, 1, 0, NULL, params, NULL),
             CUDA_SUCCESS, "cuLaunchKernel_ptsz(CUkernel) on the per-thread stream");
    check_rc(stream_sync_pt(NULL), CUDA_SUCCESS, "cuStreamSynchronize_ptsz(NULL)");
    check_rc(dtoh(c, dc, sizeof c), CUDA_SUCCESS, "cuMemcpyDtoH_v2 (c)");
    if (executes) {
        int bad = -1;
        for (int i = 0; i < N; i++) {
            if (c[i] != 1.5f * (float)i) {
                bad = i;
                break;
            }
        }
        check(bad < 0, "vectorAdd computed c = a + b", "element %d is %f", bad,
              bad >= 0 ? (double)c[bad] : 0.0);
    } else {
        check(c[0] == -1.0f, "kernel was validated, not executed (emulated)",
              "c changed although the device does not execute kernels");
        printf("INFO kernel results not verified: the device does not execute kernels\n");
    }
    check_rc(mem_free(da), CUDA_SUCCESS, "cuMemFree_v2 (a)");
    check_rc(mem_free(db), CUDA_SUCCESS, "cuMemFree_v2 (b)");
    check_rc(mem_free(dc), CUDA_SUCCESS, "cuMemFree_v2 (c)");
    check_rc(lib_unload(library), CUDA_SUCCESS, "cuLibraryUnload");
    check_rc(lib_unload(library), CUDA_ERROR_INVALID_HANDLE, "cuLibraryUnload twice");
    free(section);
    finish();
}
