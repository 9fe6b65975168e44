/*
 * A CUDA driver-API client: exercises what a plain C program asks of
 * libcuda.so.1 and verifies every byte it gets back.
 *
 * Usage: driver_api_client [--shared] [--pause]
 *   --shared  other clients use the same slice at the same time, so the
 *             exact free-memory checks (which assume this client is alone)
 *             are replaced by range checks.
 *   --pause   after the first allocations, print "PAUSED" and wait for a
 *             line on stdin (lets a test line up several clients).
 * Env: VGPU_EXPECT_EXECUTION=1|0  whether kernels really run (default: yes,
 *             unless the device name says it is emulated).
 *      VGPU_MEM_SLACK_BYTES=N  how far the final free memory may fall short
 *             of the start value (default 0: a vGPU slice accounts exactly;
 *             the native driver keeps about 2 MiB of lazily made internal
 *             allocations, so differential runs against it pass 4194304).
 *
 * Prints one PASS/FAIL line per check and exits non-zero on any failure.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define BUF_BYTES (4u << 20)
#define SAXPY_N 4096u

/* saxpy: y[i] = a * x[i] + y[i] for i < n; plus one initialized global. */
static const char SAXPY_PTX[] =
    ".version 7.0\n"
    ".target sm_75\n"
    ".address_size 64\n"
    "\n"
    ".visible .global .align 4 .u32 vgpu_marker = 42;\n"
    "\n"
    ".visible .entry saxpy(\n"
    "    .param .u32 saxpy_n,\n"
    "    .param .f32 saxpy_a,\n"
    "    .param .u64 saxpy_x,\n"
    "    .param .u64 saxpy_y\n"
    ")\n"
    "{\n"
    "    .reg .pred %p<2>;\n"
    "    .reg .b32 %r<6>;\n"
    "    .reg .f32 %f<5>;\n"
    "    .reg .b64 %rd<8>;\n"
    "\n"
    "    ld.param.u32 %r1, [saxpy_n];\n"
    "    ld.param.f32 %f1, [saxpy_a];\n"
    "    ld.param.u64 %rd1, [saxpy_x];\n"
    "    ld.param.u64 %rd2, [saxpy_y];\n"
    "    mov.u32 %r2, %ctaid.x;\n"
    "    mov.u32 %r3, %ntid.x;\n"
    "    mov.u32 %r4, %tid.x;\n"
    "    mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "    setp.ge.u32 %p1, %r5, %r1;\n"
    "    @%p1 bra DONE;\n"
    "    cvta.to.global.u64 %rd3, %rd1;\n"
    "    cvta.to.global.u64 %rd4, %rd2;\n"
    "    mul.wide.u32 %rd5, %r5, 4;\n"
    "    add.s64 %rd6, %rd3, %rd5;\n"
    "    add.s64 %rd7, %rd4, %rd5;\n"
    "    ld.global.f32 %f2, [%rd6];\n"
    "    ld.global.f32 %f3, [%rd7];\n"
    "    fma.rn.f32 %f4, %f1, %f2, %f3;\n"
    "    st.global.f32 [%rd7], %f4;\n"
    "DONE:\n"
    "    ret;\n"
    "}\n";

static int g_shared = 0;
static int g_pause = 0;

/* Whether launched kernels really execute on this device. */
static int expect_execution(const char *device_name) {
    const char *env = getenv("VGPU_EXPECT_EXECUTION");
    if (env != NULL && *env != '\0') {
        return strcmp(env, "0") != 0;
    }
    return strstr(device_name, "mulated") == NULL;
}

static void check_pattern(const void *buf, size_t bytes, uint32_t seed, const char *what) {
    long at = find_pattern_mismatch(buf, bytes, seed);
    check(at < 0, what, "word %ld differs from the pattern", at);
}

static void check_bytes(const uint8_t *buf, size_t from, size_t to, uint8_t value,
                        const char *what) {
    for (size_t i = from; i < to; i++) {
        if (buf[i] != value) {
            fail(what, "byte %zu is 0x%02x, expected 0x%02x", i, buf[i], value);
            return;
        }
    }
    pass(what);
}

static void test_device_queries(CUdevice *dev, char *name, size_t name_len, size_t *total_mem) {
    int version = 0, count = 0, value = 0;
    check_rc(cuDriverGetVersion(&version), CUDA_SUCCESS, "cuDriverGetVersion");
    check(version >= 1000, "driver version is plausible", "got %d", version);

    require_rc(cuDeviceGetCount(&count), "cuDeviceGetCount");
    check(count >= 1, "at least one device", "count is %d", count);
    require_rc(cuDeviceGet(dev, 0), "cuDeviceGet(0)");

    memset(name, 0, name_len);
    check_rc(cuDeviceGetName(name, (int)name_len, *dev), CUDA_SUCCESS, "cuDeviceGetName");
    check(name[0] != '\0', "device name is not empty", "empty name");
    printf("INFO device 0: \"%s\", driver version %d\n", name, version);

    check_rc(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, *dev),
             CUDA_SUCCESS, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
    check(value >= 3 && value <= 20, "compute capability major is plausible", "got %d", value);
    int major = value;
    check_rc(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, *dev),
             CUDA_SUCCESS, "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
    check(value >= 0 && value <= 9, "compute capability minor is plausible", "got %d", value);
    printf("INFO compute capability %d.%d\n", major, value);
    check_rc(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, *dev),
             CUDA_SUCCESS, "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)");
    check(value >= 1, "SM count is at least 1", "got %d", value);
    check_rc(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_WARP_SIZE, *dev), CUDA_SUCCESS,
             "cuDeviceGetAttribute(WARP_SIZE)");
    check(value == 32, "warp size is 32", "got %d", value);
    check_rc(cuDeviceGetAttribute(&value, CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK, *dev),
             CUDA_SUCCESS, "cuDeviceGetAttribute(MAX_THREADS_PER_BLOCK)");
    check(value >= 256, "max threads per block is at least 256", "got %d", value);

    *total_mem = 0;
    check_rc(cuDeviceTotalMem(total_mem, *dev), CUDA_SUCCESS, "cuDeviceTotalMem");
    check(*total_mem > 0, "total memory is nonzero", "got 0");

    const char *err_name = NULL;
    check_rc(cuGetErrorName(CUDA_ERROR_NO_DEVICE, &err_name), CUDA_SUCCESS, "cuGetErrorName");
    check(err_name != NULL && strcmp(err_name, "CUDA_ERROR_NO_DEVICE") == 0,
          "cuGetErrorName names CUDA_ERROR_NO_DEVICE", "got \"%s\"", err_name ? err_name : "(null)");
}

/* Sync copies of a 4 MiB pattern through two device buffers. */
static void test_sync_copies(CUdeviceptr a, CUdeviceptr b, uint8_t *host, uint8_t *back) {
    fill_pattern(host, BUF_BYTES, 0x5eed0001u);
    memset(back, 0, BUF_BYTES);
    check_rc(cuMemcpyHtoD(a, host, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyHtoD 4 MiB");
    check_rc(cuMemcpyDtoH(back, a, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoH 4 MiB");
    check_pattern(back, BUF_BYTES, 0x5eed0001u, "HtoD then DtoH returns the pattern");

    memset(back, 0, BUF_BYTES);
    check_rc(cuMemcpyDtoD(b, a, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoD 4 MiB");
    check_rc(cuMemcpyDtoH(back, b, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoH after DtoD");
    check_pattern(back, BUF_BYTES, 0x5eed0001u, "DtoD copies the pattern");

    /* An unaligned sub-range round trip: offsets must be honoured. */
    memset(back, 0, BUF_BYTES);
    check_rc(cuMemcpyDtoH(back, a + 12, 1000), CUDA_SUCCESS, "cuMemcpyDtoH at offset 12");
    check(memcmp(back, host + 12, 1000) == 0, "DtoH at an offset returns the right bytes",
          "bytes differ");
}

static void test_memsets(CUdeviceptr b, uint8_t *back) {
    check_rc(cuMemsetD8(b, 0xab, BUF_BYTES), CUDA_SUCCESS, "cuMemsetD8");
    check_rc(cuMemcpyDtoH(back, b, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoH after D8");
    check_bytes(back, 0, BUF_BYTES, 0xab, "memsetD8 fills every byte");

    check_rc(cuMemsetD16(b, 0xbeef, BUF_BYTES / 2), CUDA_SUCCESS, "cuMemsetD16");
    check_rc(cuMemcpyDtoH(back, b, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoH after D16");
    {
        const uint16_t *h = (const uint16_t *)back;
        size_t bad = BUF_BYTES;
        for (size_t i = 0; i < BUF_BYTES / 2; i++) {
            if (h[i] != 0xbeef) {
                bad = i;
                break;
            }
        }
        check(bad == BUF_BYTES, "memsetD16 fills every halfword", "halfword %zu differs", bad);
    }

    check_rc(cuMemsetD32(b, 0xdeadbeefu, BUF_BYTES / 4), CUDA_SUCCESS, "cuMemsetD32");
    /* A small D8 at an odd offset inside the D32 fill. */
    check_rc(cuMemsetD8(b + 5, 0x11, 3), CUDA_SUCCESS, "cuMemsetD8 at offset 5");
    check_rc(cuMemcpyDtoH(back, b, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoH after D32");
    {
        const uint32_t *w = (const uint32_t *)back;
        size_t bad = BUF_BYTES;
        for (size_t i = 2; i < BUF_BYTES / 4; i++) {
            if (w[i] != 0xdeadbeefu) {
                bad = i;
                break;
            }
        }
        check(bad == BUF_BYTES, "memsetD32 fills every word", "word %zu differs", bad);
        const uint8_t want[8] = {0xef, 0xbe, 0xad, 0xde, 0xef, 0x11, 0x11, 0x11};
        check(memcmp(back, want, 8) == 0, "memsetD8 at an offset touches only its bytes",
              "first bytes are %02x %02x %02x %02x %02x %02x %02x %02x", back[0], back[1],
              back[2], back[3], back[4], back[5], back[6], back[7]);
    }
}

static void test_pinned(CUdeviceptr a) {
    void *src = NULL, *dst = NULL;
    if (!check_rc(cuMemAllocHost(&src, BUF_BYTES), CUDA_SUCCESS, "cuMemAllocHost (source)")) {
        return;
    }
    if (!check_rc(cuMemAllocHost(&dst, BUF_BYTES), CUDA_SUCCESS, "cuMemAllocHost (target)")) {
        cuMemFreeHost(src);
        return;
    }
    fill_pattern(src, BUF_BYTES, 0x5eed0002u);
    memset(dst, 0, BUF_BYTES);
    check_rc(cuMemcpyHtoD(a, src, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyHtoD from pinned memory");
    check_rc(cuMemcpyDtoH(dst, a, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoH into pinned memory");
    check_pattern(dst, BUF_BYTES, 0x5eed0002u, "pinned round trip returns the pattern");
    check_rc(cuMemFreeHost(src), CUDA_SUCCESS, "cuMemFreeHost (source)");
    check_rc(cuMemFreeHost(dst), CUDA_SUCCESS, "cuMemFreeHost (target)");
}

/* Two streams ordered by an event; timing events; a pageable async copy. */
static void test_streams_events(CUdeviceptr a, CUdeviceptr b, uint8_t *pageable) {
    CUstream s1 = NULL, s2 = NULL;
    CUevent start = NULL, mid = NULL, end = NULL;
    void *src = NULL, *dst = NULL;

    require_rc(cuStreamCreate(&s1, CU_STREAM_NON_BLOCKING), "cuStreamCreate (non-blocking)");
    require_rc(cuStreamCreate(&s2, CU_STREAM_DEFAULT), "cuStreamCreate (default flags)");
    require_rc(cuEventCreate(&start, CU_EVENT_DEFAULT), "cuEventCreate (start)");
    require_rc(cuEventCreate(&mid, CU_EVENT_DISABLE_TIMING), "cuEventCreate (mid)");
    require_rc(cuEventCreate(&end, CU_EVENT_DEFAULT), "cuEventCreate (end)");
    require_rc(cuMemAllocHost(&src, BUF_BYTES), "cuMemAllocHost (async source)");
    require_rc(cuMemAllocHost(&dst, BUF_BYTES), "cuMemAllocHost (async target)");
    fill_pattern(src, BUF_BYTES, 0x5eed0003u);
    memset(dst, 0, BUF_BYTES);

    /* s1: HtoD into a; s2 waits for it, then copies a -> b -> host. */
    check_rc(cuEventRecord(start, s1), CUDA_SUCCESS, "cuEventRecord (start on s1)");
    check_rc(cuMemcpyHtoDAsync(a, src, BUF_BYTES, s1), CUDA_SUCCESS, "cuMemcpyHtoDAsync on s1");
    check_rc(cuEventRecord(mid, s1), CUDA_SUCCESS, "cuEventRecord (mid on s1)");
    check_rc(cuStreamWaitEvent(s2, mid, 0), CUDA_SUCCESS, "cuStreamWaitEvent (s2 on mid)");
    check_rc(cuMemcpyDtoDAsync(b, a, BUF_BYTES, s2), CUDA_SUCCESS, "cuMemcpyDtoDAsync on s2");
    check_rc(cuMemcpyDtoHAsync(dst, b, BUF_BYTES, s2), CUDA_SUCCESS, "cuMemcpyDtoHAsync on s2");
    check_rc(cuEventRecord(end, s2), CUDA_SUCCESS, "cuEventRecord (end on s2)");
    CUresult q = cuEventQuery(end);
    check(q == CUDA_SUCCESS || q == CUDA_ERROR_NOT_READY, "cuEventQuery before sync",
          "returned %d (%s)", (int)q, cu_name(q));
    check_rc(cuEventSynchronize(end), CUDA_SUCCESS, "cuEventSynchronize (end)");
    check_rc(cuEventQuery(end), CUDA_SUCCESS, "cuEventQuery after sync");
    check_pattern(dst, BUF_BYTES, 0x5eed0003u, "async HtoD -> event -> DtoD -> DtoH chain");
    float ms = -1.0f;
    check_rc(cuEventElapsedTime(&ms, start, end), CUDA_SUCCESS, "cuEventElapsedTime");
    check(ms >= 0.0f, "elapsed time is not negative", "got %f ms", (double)ms);
    printf("INFO two-stream 4 MiB chain took %.3f ms\n", (double)ms);
    check_rc(cuStreamSynchronize(s1), CUDA_SUCCESS, "cuStreamSynchronize (s1)");
    check_rc(cuStreamQuery(s1), CUDA_SUCCESS, "cuStreamQuery (s1 idle)");

    /* A pageable async HtoD may be reused as soon as the call returns. */
    fill_pattern(pageable, BUF_BYTES, 0x5eed0004u);
    check_rc(cuMemcpyHtoDAsync(a, pageable, BUF_BYTES, s1), CUDA_SUCCESS,
             "cuMemcpyHtoDAsync from pageable memory");
    memset(pageable, 0, BUF_BYTES);
    check_rc(cuMemsetD32Async(b, 0x01020304u, BUF_BYTES / 4, s2), CUDA_SUCCESS,
             "cuMemsetD32Async on s2");
    check_rc(cuStreamSynchronize(s1), CUDA_SUCCESS, "cuStreamSynchronize after pageable copy");
    check_rc(cuStreamSynchronize(s2), CUDA_SUCCESS, "cuStreamSynchronize after async memset");
    check_rc(cuMemcpyDtoH(pageable, a, BUF_BYTES), CUDA_SUCCESS, "cuMemcpyDtoH of pageable copy");
    check_pattern(pageable, BUF_BYTES, 0x5eed0004u,
                  "pageable async source was consumed before the call returned");
    check_rc(cuMemcpyDtoHAsync(dst, b, BUF_BYTES, s2), CUDA_SUCCESS,
             "cuMemcpyDtoHAsync after async memset");
    check_rc(cuStreamSynchronize(s2), CUDA_SUCCESS, "cuStreamSynchronize (s2)");
    {
        const uint32_t *w = (const uint32_t *)dst;
        size_t bad = BUF_BYTES;
        for (size_t i = 0; i < BUF_BYTES / 4; i++) {
            if (w[i] != 0x01020304u) {
                bad = i;
                break;
            }
        }
        check(bad == BUF_BYTES, "async memsetD32 fills every word", "word %zu differs", bad);
    }

    check_rc(cuEventDestroy(start), CUDA_SUCCESS, "cuEventDestroy (start)");
    check_rc(cuEventDestroy(mid), CUDA_SUCCESS, "cuEventDestroy (mid)");
    check_rc(cuEventDestroy(end), CUDA_SUCCESS, "cuEventDestroy (end)");
    check_rc(cuStreamDestroy(s1), CUDA_SUCCESS, "cuStreamDestroy (s1)");
    check_rc(cuStreamDestroy(s2), CUDA_SUCCESS, "cuStreamDestroy (s2)");
    check_rc(cuMemFreeHost(src), CUDA_SUCCESS, "cuMemFreeHost (async source)");
    check_rc(cuMemFreeHost(dst), CUDA_SUCCESS, "cuMemFreeHost (async target)");
}

static void test_module_launch(int executes) {
    CUmodule mod = NULL;
    CUfunction fn = NULL;
    CUstream stream = NULL;
    CUdeviceptr x = 0, y = 0;
    float hx[SAXPY_N], hy[SAXPY_N], out[SAXPY_N];

    require_rc(cuModuleLoadData(&mod, SAXPY_PTX), "cuModuleLoadData (saxpy PTX)");
    require_rc(cuModuleGetFunction(&fn, mod, "saxpy"), "cuModuleGetFunction(saxpy)");
    CUfunction missing = NULL;
    check_rc(cuModuleGetFunction(&missing, mod, "no_such_kernel"), CUDA_ERROR_NOT_FOUND,
             "cuModuleGetFunction of a missing name is NOT_FOUND");

    CUdeviceptr marker = 0;
    size_t marker_bytes = 0;
    if (check_rc(cuModuleGetGlobal(&marker, &marker_bytes, mod, "vgpu_marker"), CUDA_SUCCESS,
                 "cuModuleGetGlobal(vgpu_marker)")) {
        check(marker != 0 && marker_bytes == 4, "global has an address and 4 bytes",
              "dptr 0x%llx, %zu bytes", marker, marker_bytes);
        if (executes) {
            uint32_t v = 0;
            check_rc(cuMemcpyDtoH(&v, marker, 4), CUDA_SUCCESS, "cuMemcpyDtoH of the global");
            check(v == 42, "global holds its initializer", "got %u", v);
        }
    }

    for (unsigned i = 0; i < SAXPY_N; i++) {
        hx[i] = (float)i;
        hy[i] = 1.0f;
    }
    require_rc(cuMemAlloc(&x, sizeof hx), "cuMemAlloc (saxpy x)");
    require_rc(cuMemAlloc(&y, sizeof hy), "cuMemAlloc (saxpy y)");
    check_rc(cuMemcpyHtoD(x, hx, sizeof hx), CUDA_SUCCESS, "cuMemcpyHtoD (saxpy x)");
    check_rc(cuMemcpyHtoD(y, hy, sizeof hy), CUDA_SUCCESS, "cuMemcpyHtoD (saxpy y)");
    require_rc(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate (launch)");

    unsigned n = SAXPY_N;
    float alpha = 2.0f;
    void *params[] = {&n, &alpha, &x, &y};
    check_rc(cuLaunchKernel(fn, SAXPY_N / 256, 1, 1, 256, 1, 1, 0, stream, params, NULL),
             CUDA_SUCCESS, "cuLaunchKernel(saxpy)");
    check_rc(cuStreamSynchronize(stream), CUDA_SUCCESS, "cuStreamSynchronize after launch");
    check_rc(cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, NULL, params, NULL), CUDA_SUCCESS,
             "cuLaunchKernel on the default stream");
    check_rc(cuCtxSynchronize(), CUDA_SUCCESS, "cuCtxSynchronize after launch");
    check_rc(cuMemcpyDtoH(out, y, sizeof out), CUDA_SUCCESS, "cuMemcpyDtoH (saxpy y)");
    if (executes) {
        /* Elements < 32 ran twice (second launch), the rest once. */
        unsigned bad = SAXPY_N;
        for (unsigned i = 0; i < SAXPY_N; i++) {
            float want = i < 32 ? 4.0f * (float)i + 1.0f : 2.0f * (float)i + 1.0f;
            if (out[i] != want) {
                bad = i;
                break;
            }
        }
        check(bad == SAXPY_N, "saxpy computed y = a*x + y", "element %u is %f", bad,
              bad < SAXPY_N ? (double)out[bad] : 0.0);
    } else {
        check(memcmp(out, hy, sizeof hy) == 0, "kernel was validated, not executed (emulated)",
              "y changed although the device does not execute kernels");
        printf("INFO kernel results not verified: the device does not execute kernels\n");
    }

    check_rc(cuStreamDestroy(stream), CUDA_SUCCESS, "cuStreamDestroy (launch)");
    check_rc(cuMemFree(x), CUDA_SUCCESS, "cuMemFree (saxpy x)");
    check_rc(cuMemFree(y), CUDA_SUCCESS, "cuMemFree (saxpy y)");
    check_rc(cuModuleUnload(mod), CUDA_SUCCESS, "cuModuleUnload");
}

/* A second context's allocations go away with it. */
static void test_created_context(CUdevice dev, CUcontext primary) {
    CUcontext ctx = NULL, cur = NULL;
    CUdeviceptr p = 0;
    if (!check_rc(cuCtxCreate(&ctx, 0, dev), CUDA_SUCCESS, "cuCtxCreate")) {
        return;
    }
    check_rc(cuCtxGetCurrent(&cur), CUDA_SUCCESS, "cuCtxGetCurrent after cuCtxCreate");
    check(cur == ctx, "cuCtxCreate makes the new context current", "current is %p", (void *)cur);
    check_rc(cuMemAlloc(&p, 1u << 20), CUDA_SUCCESS, "cuMemAlloc in the created context");
    check_rc(cuCtxDestroy(ctx), CUDA_SUCCESS, "cuCtxDestroy (with a live allocation)");
    require_rc(cuCtxSetCurrent(primary), "cuCtxSetCurrent back to the primary context");
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--shared") == 0) {
            g_shared = 1;
        } else if (strcmp(argv[i], "--pause") == 0) {
            g_pause = 1;
        } else {
            fprintf(stderr, "usage: %s [--shared] [--pause]\n", argv[0]);
            return 2;
        }
    }
    start_watchdog((unsigned)env_u64("VGPU_TEST_WATCHDOG_S", 120));

    require_rc(cuInit(0), "cuInit");

    CUdevice dev = 0;
    char name[256];
    size_t total_mem = 0;
    test_device_queries(&dev, name, sizeof name, &total_mem);
    int executes = expect_execution(name);

    CUcontext ctx = NULL, cur = NULL;
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    check_rc(cuCtxGetCurrent(&cur), CUDA_SUCCESS, "cuCtxGetCurrent");
    check(cur == ctx, "the primary context is current", "current is %p", (void *)cur);

    size_t free0 = 0, total0 = 0;
    require_rc(cuMemGetInfo(&free0, &total0), "cuMemGetInfo");
    check(free0 <= total0 && total0 > 0, "free <= total", "free %zu total %zu", free0, total0);
    check(total0 == total_mem, "cuMemGetInfo total equals cuDeviceTotalMem",
          "%zu vs %zu", total0, total_mem);
    printf("INFO memory: %zu free of %zu\n", free0, total0);

    CUdeviceptr a = 0, b = 0;
    require_rc(cuMemAlloc(&a, BUF_BYTES), "cuMemAlloc 4 MiB (a)");
    require_rc(cuMemAlloc(&b, BUF_BYTES), "cuMemAlloc 4 MiB (b)");
    check(a != 0 && b != 0 && (a + BUF_BYTES <= b || b + BUF_BYTES <= a),
          "allocations are nonzero and disjoint", "a 0x%llx b 0x%llx", a, b);
    size_t free1 = 0, total1 = 0;
    check_rc(cuMemGetInfo(&free1, &total1), CUDA_SUCCESS, "cuMemGetInfo after alloc");
    if (g_shared) {
        check(free1 + 2 * BUF_BYTES <= total1, "free memory reflects our allocations",
              "free %zu total %zu", free1, total1);
    } else {
        check(free1 + 2 * BUF_BYTES <= free0, "free memory drops by at least 8 MiB",
              "free went from %zu to %zu", free0, free1);
    }

    if (g_pause) {
        char line[64];
        printf("PAUSED\n");
        fflush(stdout);
        check(fgets(line, sizeof line, stdin) != NULL, "resumed", "stdin closed while paused");
    }

    uint8_t *host = malloc(BUF_BYTES);
    uint8_t *back = malloc(BUF_BYTES);
    if (host == NULL || back == NULL) {
        fail("host buffers", "malloc failed");
        finish();
    }

    test_sync_copies(a, b, host, back);
    test_memsets(b, back);
    test_pinned(a);
    test_streams_events(a, b, host);
    test_module_launch(executes);
    test_created_context(dev, ctx);

    check_rc(cuMemFree(a), CUDA_SUCCESS, "cuMemFree (a)");
    check_rc(cuMemFree(b), CUDA_SUCCESS, "cuMemFree (b)");
    free(host);
    free(back);

    size_t free2 = 0, total2 = 0;
    check_rc(cuMemGetInfo(&free2, &total2), CUDA_SUCCESS, "cuMemGetInfo at the end");
    check(total2 == total0, "total memory is unchanged", "%zu vs %zu", total2, total0);
    if (g_shared) {
        check(free2 <= total2, "free <= total at the end", "free %zu total %zu", free2, total2);
    } else {
        size_t slack = (size_t)env_u64("VGPU_MEM_SLACK_BYTES", 0);
        check(free2 <= free0 && free2 + slack >= free0, "free memory is back to its start value",
              "started at %zu, ended at %zu (slack %zu)", free0, free2, slack);
    }
    finish();
}
