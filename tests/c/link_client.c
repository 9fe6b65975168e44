/*
 * The JIT linker and cooperative launches through the driver API, as
 * runtime-compiled code (cuDNN's fused engines) uses them: the plain
 * CUDA 5.5 entry points found with dlsym, one PTX input linked with log
 * buffers and the wall-time option, the image loaded with cuModuleLoadData
 * and launched, an input from a file, the failures (invalid PTX with its
 * error log, a missing file, no inputs), two PTX units linked into one
 * image (real GPU only), and cuLaunchCooperativeKernel / the cooperative
 * launch attribute.
 *
 * Usage: link_client
 * Env: VGPU_EXPECT_EXECUTION=1|0  whether kernels really run (default: yes,
 *      unless the device name says it is emulated).
 *
 * Prints one PASS/FAIL line per check (INFO lines differ by nature) and
 * exits non-zero on any failure. Natively and through a slice on the same
 * GPU the output is identical.
 */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

#define N 4096u
#define LOG_BYTES 8192

/* scale: out[i] = 3 * in[i] + 1 for i < n. */
static const char SCALE_PTX[] =
    ".version 7.0\n"
    ".target sm_75\n"
    ".address_size 64\n"
    "\n"
    ".visible .entry scale(\n"
    "    .param .u64 scale_out,\n"
    "    .param .u64 scale_in,\n"
    "    .param .u32 scale_n\n"
    ")\n"
    "{\n"
    "    .reg .pred %p<2>;\n"
    "    .reg .b32 %r<8>;\n"
    "    .reg .b64 %rd<8>;\n"
    "\n"
    "    ld.param.u64 %rd1, [scale_out];\n"
    "    ld.param.u64 %rd2, [scale_in];\n"
    "    ld.param.u32 %r1, [scale_n];\n"
    "    mov.u32 %r2, %ctaid.x;\n"
    "    mov.u32 %r3, %ntid.x;\n"
    "    mov.u32 %r4, %tid.x;\n"
    "    mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "    setp.ge.u32 %p1, %r5, %r1;\n"
    "    @%p1 bra DONE;\n"
    "    cvta.to.global.u64 %rd3, %rd1;\n"
    "    cvta.to.global.u64 %rd4, %rd2;\n"
    "    mul.wide.u32 %rd5, %r5, 4;\n"
    "    add.s64 %rd6, %rd4, %rd5;\n"
    "    ld.global.u32 %r6, [%rd6];\n"
    "    mad.lo.s32 %r7, %r6, 3, 1;\n"
    "    add.s64 %rd7, %rd3, %rd5;\n"
    "    st.global.u32 [%rd7], %r7;\n"
    "DONE:\n"
    "    ret;\n"
    "}\n";

/* Two relocatable units: twice_plus calls vgpu_twice, defined in the other. */
static const char CALLER_PTX[] =
    ".version 7.0\n"
    ".target sm_75\n"
    ".address_size 64\n"
    "\n"
    ".extern .func (.param .b32 func_retval0) vgpu_twice(.param .b32 vgpu_twice_param_0);\n"
    "\n"
    ".visible .entry twice_plus(\n"
    "    .param .u64 twice_plus_out,\n"
    "    .param .u64 twice_plus_in,\n"
    "    .param .u32 twice_plus_n\n"
    ")\n"
    "{\n"
    "    .reg .pred %p<2>;\n"
    "    .reg .b32 %r<9>;\n"
    "    .reg .b64 %rd<8>;\n"
    "\n"
    "    ld.param.u64 %rd1, [twice_plus_out];\n"
    "    ld.param.u64 %rd2, [twice_plus_in];\n"
    "    ld.param.u32 %r1, [twice_plus_n];\n"
    "    mov.u32 %r2, %ctaid.x;\n"
    "    mov.u32 %r3, %ntid.x;\n"
    "    mov.u32 %r4, %tid.x;\n"
    "    mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "    setp.ge.u32 %p1, %r5, %r1;\n"
    "    @%p1 bra DONE;\n"
    "    cvta.to.global.u64 %rd3, %rd1;\n"
    "    cvta.to.global.u64 %rd4, %rd2;\n"
    "    mul.wide.u32 %rd5, %r5, 4;\n"
    "    add.s64 %rd6, %rd4, %rd5;\n"
    "    ld.global.u32 %r6, [%rd6];\n"
    "    {\n"
    "    .param .b32 param0;\n"
    "    st.param.b32 [param0], %r6;\n"
    "    .param .b32 retval0;\n"
    "    call.uni (retval0), vgpu_twice, (param0);\n"
    "    ld.param.b32 %r7, [retval0];\n"
    "    }\n"
    "    add.s32 %r8, %r7, 1;\n"
    "    add.s64 %rd7, %rd3, %rd5;\n"
    "    st.global.u32 [%rd7], %r8;\n"
    "DONE:\n"
    "    ret;\n"
    "}\n";

static const char CALLEE_PTX[] =
    ".version 7.0\n"
    ".target sm_75\n"
    ".address_size 64\n"
    "\n"
    ".visible .func (.param .b32 func_retval0) vgpu_twice(.param .b32 vgpu_twice_param_0)\n"
    "{\n"
    "    .reg .b32 %r<3>;\n"
    "\n"
    "    ld.param.u32 %r1, [vgpu_twice_param_0];\n"
    "    shl.b32 %r2, %r1, 1;\n"
    "    st.param.b32 [func_retval0], %r2;\n"
    "    ret;\n"
    "}\n";

/* Not PTX the assembler accepts: the body never ends. */
static const char BAD_PTX[] =
    ".version 7.0\n"
    ".target sm_75\n"
    ".address_size 64\n"
    "\n"
    ".visible .entry broken(.param .u64 p)\n"
    "{\n"
    "    this is not an instruction;\n";

/* The entry points with the CUDA 5.5 names, the ones cuDNN resolves. */
typedef CUresult (*link_create_fn)(unsigned int, CUjit_option *, void **, CUlinkState *);
typedef CUresult (*link_add_data_fn)(CUlinkState, CUjitInputType, void *, size_t, const char *,
                                     unsigned int, CUjit_option *, void **);

static int g_executes = 1;
static CUdeviceptr g_in = 0, g_out = 0;
static uint32_t g_host_in[N], g_host_out[N];

static int expect_execution(const char *device_name) {
    const char *env = getenv("VGPU_EXPECT_EXECUTION");
    if (env != NULL && *env != '\0') {
        return strcmp(env, "0") != 0;
    }
    return strstr(device_name, "mulated") == NULL;
}

/* Clears the output, launches `fn` over N elements (cooperatively if
 * asked), and checks out[i] == mul * in[i] + 1 where kernels run. */
static void run_and_check(CUfunction fn, unsigned mul, int cooperative, const char *what) {
    char name[160];
    unsigned n = N;
    void *params[] = {&g_out, &g_in, &n};
    check_rc(cuMemsetD32(g_out, 0, N), CUDA_SUCCESS, "cuMemsetD32 (clear the output)");
    CUresult rc = cooperative
                      ? cuLaunchCooperativeKernel(fn, N / 128, 1, 1, 128, 1, 1, 0, NULL, params)
                      : cuLaunchKernel(fn, N / 128, 1, 1, 128, 1, 1, 0, NULL, params, NULL);
    snprintf(name, sizeof name, "%s: launch", what);
    check_rc(rc, CUDA_SUCCESS, name);
    snprintf(name, sizeof name, "%s: cuCtxSynchronize", what);
    check_rc(cuCtxSynchronize(), CUDA_SUCCESS, name);
    snprintf(name, sizeof name, "%s: cuMemcpyDtoH", what);
    check_rc(cuMemcpyDtoH(g_host_out, g_out, sizeof g_host_out), CUDA_SUCCESS, name);
    if (g_executes) {
        unsigned bad = N;
        for (unsigned i = 0; i < N; i++) {
            if (g_host_out[i] != mul * g_host_in[i] + 1) {
                bad = i;
                break;
            }
        }
        snprintf(name, sizeof name, "%s: out = %u * in + 1", what, mul);
        check(bad == N, name, "element %u is %u", bad, bad < N ? g_host_out[bad] : 0);
    } else {
        printf("INFO %s: kernel results not verified: the device does not execute kernels\n",
               what);
    }
}

/* Loads a linked image and runs its kernel `entry`. */
static void load_and_run(const void *image, const char *entry, unsigned mul, const char *what) {
    CUmodule mod = NULL;
    CUfunction fn = NULL;
    char name[160];
    snprintf(name, sizeof name, "%s: cuModuleLoadData of the linked image", what);
    if (!check_rc(cuModuleLoadData(&mod, image), CUDA_SUCCESS, name)) {
        return;
    }
    snprintf(name, sizeof name, "%s: cuModuleGetFunction(%s)", what, entry);
    if (check_rc(cuModuleGetFunction(&fn, mod, entry), CUDA_SUCCESS, name)) {
        run_and_check(fn, mul, 0, what);
    }
    snprintf(name, sizeof name, "%s: cuModuleUnload", what);
    check_rc(cuModuleUnload(mod), CUDA_SUCCESS, name);
}

static void test_symbols(void) {
    static const char *names[] = {
        "cuLinkCreate",    "cuLinkAddData",    "cuLinkAddFile",    "cuLinkComplete",
        "cuLinkDestroy",   "cuLinkCreate_v2",  "cuLinkAddData_v2", "cuLinkAddFile_v2",
        "cuLaunchCooperativeKernel",
    };
    void *lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (!check(lib != NULL, "dlopen(libcuda.so.1)", "%s", dlerror())) {
        return;
    }
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char what[96];
        snprintf(what, sizeof what, "dlsym(%s)", names[i]);
        check(dlsym(lib, names[i]) != NULL, what, "undefined symbol");
    }
}

/* One PTX input through the plain-named entry points, with every log
 * option, then loaded and launched; the module outlives the state. */
static void test_link_one_ptx(void) {
    link_create_fn create = (link_create_fn)dlsym(RTLD_DEFAULT, "cuLinkCreate");
    link_add_data_fn add = (link_add_data_fn)dlsym(RTLD_DEFAULT, "cuLinkAddData");
    if (!check(create != NULL && add != NULL, "plain link entry points resolve", "missing")) {
        return;
    }
    static char info[LOG_BYTES], error[LOG_BYTES];
    /* The verbose info log is written; the error log stays empty. */
    memset(info, 0x55, sizeof info);
    memset(error, 0, sizeof error);
    CUjit_option opts[] = {CU_JIT_WALL_TIME,
                           CU_JIT_INFO_LOG_BUFFER,
                           CU_JIT_INFO_LOG_BUFFER_SIZE_BYTES,
                           CU_JIT_ERROR_LOG_BUFFER,
                           CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
                           CU_JIT_OPTIMIZATION_LEVEL,
                           CU_JIT_LOG_VERBOSE};
    /* The header says the driver overwrites the wall-time value; programs
     * (NVIDIA's ptxjit sample) pass a pointer to a float. Either works. */
    float wall_storage = 0.0f;
    void *values[] = {&wall_storage,
                      info,
                      (void *)(uintptr_t)LOG_BYTES,
                      error,
                      (void *)(uintptr_t)LOG_BYTES,
                      (void *)(uintptr_t)3,
                      (void *)(uintptr_t)1};
    CUlinkState state = NULL;
    if (!check_rc(create(7, opts, values, &state), CUDA_SUCCESS, "cuLinkCreate with log options")) {
        return;
    }
    check_rc(add(state, CU_JIT_INPUT_PTX, (void *)SCALE_PTX, sizeof SCALE_PTX, "scale.ptx", 0,
                 NULL, NULL),
             CUDA_SUCCESS, "cuLinkAddData (PTX)");
    void *cubin = NULL;
    size_t size = 0;
    if (check_rc(cuLinkComplete(state, &cubin, &size), CUDA_SUCCESS, "cuLinkComplete")) {
        check(cubin != NULL && size > 0, "cuLinkComplete returns an image", "%p, %zu bytes",
              cubin, size);
        printf("INFO linked image: %zu bytes\n", size);
        check(memchr(info, 0, sizeof info) != NULL, "the info log is a string", "no NUL");
        check(error[0] == 0, "the error log is empty after a good link", "\"%.80s\"", error);
        size_t info_used = (size_t)(uintptr_t)values[2];
        check(info_used <= LOG_BYTES, "the info log size output fits the buffer", "%zu",
              info_used);
        float wall = wall_storage;
        if (values[0] != (void *)&wall_storage) {
            memcpy(&wall, &values[0], sizeof wall);
        }
        check(wall >= 0.0f && wall < 600000.0f, "the wall time output is a time", "%f",
              (double)wall);
        printf("INFO link wall time %.3f ms\n", (double)wall);
        CUmodule mod = NULL;
        CUfunction fn = NULL;
        if (check_rc(cuModuleLoadData(&mod, cubin), CUDA_SUCCESS,
                     "cuModuleLoadData of the linked image") &&
            check_rc(cuModuleGetFunction(&fn, mod, "scale"), CUDA_SUCCESS,
                     "cuModuleGetFunction(scale) in the linked image")) {
            run_and_check(fn, 3, 0, "linked scale");
            check_rc(cuLinkDestroy(state), CUDA_SUCCESS, "cuLinkDestroy");
            state = NULL;
            run_and_check(fn, 3, 0, "linked scale after cuLinkDestroy");
            run_and_check(fn, 3, 1, "cuLaunchCooperativeKernel(scale)");
            check_rc(cuModuleUnload(mod), CUDA_SUCCESS, "cuModuleUnload (linked)");
        }
    }
    if (state != NULL) {
        check_rc(cuLinkDestroy(state), CUDA_SUCCESS, "cuLinkDestroy");
    }
}

static void test_link_file(void) {
    char path[] = "/tmp/vgpu-link-XXXXXX";
    int fd = mkstemp(path);
    if (!check(fd >= 0, "mkstemp for a PTX file", "failed")) {
        return;
    }
    /* A PTX file holds the text without its NUL. */
    ssize_t want = (ssize_t)(sizeof SCALE_PTX - 1);
    check(write(fd, SCALE_PTX, (size_t)want) == want, "write the PTX file", "short write");
    close(fd);
    CUlinkState state = NULL;
    if (check_rc(cuLinkCreate(0, NULL, NULL, &state), CUDA_SUCCESS, "cuLinkCreate (file)")) {
        check_rc(cuLinkAddFile(state, CU_JIT_INPUT_PTX, path, 0, NULL, NULL), CUDA_SUCCESS,
                 "cuLinkAddFile (PTX)");
        void *cubin = NULL;
        size_t size = 0;
        if (check_rc(cuLinkComplete(state, &cubin, &size), CUDA_SUCCESS,
                     "cuLinkComplete (file)")) {
            load_and_run(cubin, "scale", 3, "linked from a file");
        }
        check_rc(cuLinkDestroy(state), CUDA_SUCCESS, "cuLinkDestroy (file)");
    }
    unlink(path);
}

static void test_link_failures(void) {
    static char error[LOG_BYTES];
    memset(error, 0, sizeof error);
    CUjit_option opts[] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void *values[] = {error, (void *)(uintptr_t)LOG_BYTES};
    CUlinkState state = NULL;
    if (check_rc(cuLinkCreate(2, opts, values, &state), CUDA_SUCCESS, "cuLinkCreate (bad PTX)")) {
        /* Natively the PTX is compiled when added; a slice compiles it at
         * completion. Either way the link fails with INVALID_PTX. */
        CUresult rc = cuLinkAddData(state, CU_JIT_INPUT_PTX, (void *)BAD_PTX, sizeof BAD_PTX,
                                    "broken.ptx", 0, NULL, NULL);
        if (rc == CUDA_SUCCESS) {
            void *cubin = NULL;
            size_t size = 0;
            rc = cuLinkComplete(state, &cubin, &size);
        }
        check_rc(rc, CUDA_ERROR_INVALID_PTX, "invalid PTX fails the link with INVALID_PTX");
        check(error[0] != 0, "the error log says why", "empty");
        printf("INFO error log: %.200s\n", error);
        check_rc(cuLinkDestroy(state), CUDA_SUCCESS, "cuLinkDestroy (bad PTX)");
    }

    if (check_rc(cuLinkCreate(0, NULL, NULL, &state), CUDA_SUCCESS, "cuLinkCreate (missing)")) {
        check_rc(cuLinkAddFile(state, CU_JIT_INPUT_PTX, "/nonexistent/vgpu/kernel.ptx", 0, NULL,
                               NULL),
                 CUDA_ERROR_FILE_NOT_FOUND, "cuLinkAddFile of a missing file is FILE_NOT_FOUND");
        void *cubin = NULL;
        size_t size = 0;
        char what[128];
        CUresult rc = cuLinkComplete(state, &cubin, &size);
        snprintf(what, sizeof what, "cuLinkComplete with no inputs returns %s", cu_name(rc));
        pass(what);
        check_rc(cuLinkDestroy(state), CUDA_SUCCESS, "cuLinkDestroy (no inputs)");
    }
    check_rc(cuLinkCreate(0, NULL, NULL, NULL), CUDA_ERROR_INVALID_VALUE,
             "cuLinkCreate with a NULL state pointer is INVALID_VALUE");
}

/* Two relocatable PTX units: a device function call across them. The
 * emulated device links one input only. */
static void test_link_two_units(void) {
    if (!g_executes) {
        printf("INFO two-unit link not tried: the emulated device links one input only\n");
        return;
    }
    CUlinkState state = NULL;
    if (!check_rc(cuLinkCreate(0, NULL, NULL, &state), CUDA_SUCCESS, "cuLinkCreate (two units)")) {
        return;
    }
    check_rc(cuLinkAddData(state, CU_JIT_INPUT_PTX, (void *)CALLER_PTX, sizeof CALLER_PTX,
                           "caller.ptx", 0, NULL, NULL),
             CUDA_SUCCESS, "cuLinkAddData (caller unit)");
    check_rc(cuLinkAddData(state, CU_JIT_INPUT_PTX, (void *)CALLEE_PTX, sizeof CALLEE_PTX,
                           "callee.ptx", 0, NULL, NULL),
             CUDA_SUCCESS, "cuLinkAddData (callee unit)");
    void *cubin = NULL;
    size_t size = 0;
    if (check_rc(cuLinkComplete(state, &cubin, &size), CUDA_SUCCESS,
                 "cuLinkComplete (two units)")) {
        load_and_run(cubin, "twice_plus", 2, "two linked units");
    }
    check_rc(cuLinkDestroy(state), CUDA_SUCCESS, "cuLinkDestroy (two units)");
}

static void test_cooperative(CUdevice dev) {
    int coop = 0, sms = 0;
    check_rc(cuDeviceGetAttribute(&coop, CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH, dev),
             CUDA_SUCCESS, "cuDeviceGetAttribute(COOPERATIVE_LAUNCH)");
    check(coop == 1, "the device supports cooperative launches", "got %d", coop);
    check_rc(cuDeviceGetAttribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
             CUDA_SUCCESS, "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)");
    CUmodule mod = NULL;
    CUfunction fn = NULL;
    require_rc(cuModuleLoadData(&mod, SCALE_PTX), "cuModuleLoadData (scale PTX)");
    require_rc(cuModuleGetFunction(&fn, mod, "scale"), "cuModuleGetFunction(scale)");
    run_and_check(fn, 3, 1, "cuLaunchCooperativeKernel");

    /* 1024-thread blocks: at most 2 per multiprocessor can be resident. */
    unsigned n = N;
    void *params[] = {&g_out, &g_in, &n};
    check_rc(cuLaunchCooperativeKernel(fn, (unsigned)sms * 64, 1, 1, 1024, 1, 1, 0, NULL, params),
             CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE,
             "a cooperative grid larger than the device is COOPERATIVE_LAUNCH_TOO_LARGE");
    check_rc(cuCtxSynchronize(), CUDA_SUCCESS, "cuCtxSynchronize after the refused launch");

    CUlaunchAttribute attr;
    memset(&attr, 0, sizeof attr);
    attr.id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attr.value.cooperative = 1;
    CUlaunchConfig config = {N / 128, 1, 1, 128, 1, 1, 0, NULL, &attr, 1};
    check_rc(cuMemsetD32(g_out, 0, N), CUDA_SUCCESS, "cuMemsetD32 (clear for the Ex launch)");
    check_rc(cuLaunchKernelEx(&config, fn, params, NULL), CUDA_SUCCESS,
             "cuLaunchKernelEx with the cooperative attribute");
    check_rc(cuCtxSynchronize(), CUDA_SUCCESS, "cuCtxSynchronize after the Ex launch");
    check_rc(cuMemcpyDtoH(g_host_out, g_out, sizeof g_host_out), CUDA_SUCCESS,
             "cuMemcpyDtoH (Ex launch)");
    if (g_executes) {
        check(g_host_out[N - 1] == 3 * g_host_in[N - 1] + 1, "the cooperative Ex launch ran",
              "last element %u", g_host_out[N - 1]);
    }
    check_rc(cuModuleUnload(mod), CUDA_SUCCESS, "cuModuleUnload (scale)");
}

int main(void) {
    start_watchdog((unsigned)env_u64("VGPU_TEST_WATCHDOG_S", 120));
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    char name[256] = {0};
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    check_rc(cuDeviceGetName(name, sizeof name, dev), CUDA_SUCCESS, "cuDeviceGetName");
    g_executes = expect_execution(name);
    printf("INFO device \"%s\", kernels %s\n", name, g_executes ? "execute" : "are not executed");
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");

    for (unsigned i = 0; i < N; i++) {
        g_host_in[i] = i * 7u + 5u;
    }
    require_rc(cuMemAlloc(&g_in, sizeof g_host_in), "cuMemAlloc (in)");
    require_rc(cuMemAlloc(&g_out, sizeof g_host_out), "cuMemAlloc (out)");
    require_rc(cuMemcpyHtoD(g_in, g_host_in, sizeof g_host_in), "cuMemcpyHtoD (in)");

    test_symbols();
    test_link_one_ptx();
    test_link_file();
    test_link_failures();
    test_link_two_units();
    test_cooperative(dev);

    check_rc(cuMemFree(g_in), CUDA_SUCCESS, "cuMemFree (in)");
    check_rc(cuMemFree(g_out), CUDA_SUCCESS, "cuMemFree (out)");
    check_rc(cuDevicePrimaryCtxRelease(dev), CUDA_SUCCESS, "cuDevicePrimaryCtxRelease");
    finish();
    return 0;
}
