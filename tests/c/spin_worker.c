/*
 * A steady tenant for the fault-isolation tests: launches timed kernels
 * (vgpu_timed_spin) in batches of 4, synchronising after each batch, until
 * told to stop. Any failing call is a FAIL (a survivor must see no error).
 *
 * Usage: spin_worker SPIN_PTX KERNEL_US
 * Prints "READY" once set up and starts at once. Commands on stdin, one per
 * line: "report" prints "COUNT <kernels completed>"; "stop" (or end of
 * input) ends the loop, printing "KERNELS <n> ERRORS <e>" and the RESULT line.
 */
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

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

static char g_in[256];
static size_t g_in_len = 0;

/* Reads whatever stdin has without blocking. Returns 1 to stop. */
static int handle_stdin(unsigned long long kernels) {
    struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
    while (poll(&p, 1, 0) > 0) {
        if (g_in_len == sizeof g_in) {
            g_in_len = 0; /* an overlong line: drop it */
        }
        ssize_t n = read(STDIN_FILENO, g_in + g_in_len, sizeof g_in - g_in_len);
        if (n <= 0) {
            return 1; /* end of input */
        }
        g_in_len += (size_t)n;
        char *nl;
        while ((nl = memchr(g_in, '\n', g_in_len)) != NULL) {
            *nl = '\0';
            if (strcmp(g_in, "stop") == 0) {
                return 1;
            }
            if (strcmp(g_in, "report") == 0) {
                printf("COUNT %llu\n", kernels);
                fflush(stdout);
            }
            size_t used = (size_t)(nl - g_in) + 1;
            memmove(g_in, nl + 1, g_in_len - used);
            g_in_len -= used;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SPIN_PTX KERNEL_US\n", argv[0]);
        return 2;
    }
    unsigned long long kernel_ns = strtoull(argv[2], NULL, 0) * 1000ull;
    start_watchdog((unsigned)env_u64("VGPU_TEST_WATCHDOG_S", 120));
    void *ptx = read_file(argv[1]);
    if (!check(ptx != NULL, "read the PTX", "cannot read %s", argv[1])) {
        finish();
    }

    CUdevice dev = 0;
    CUcontext ctx = NULL;
    CUmodule mod = NULL;
    CUfunction spin = NULL;
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuCtxCreate(&ctx, 0, dev), "cuCtxCreate");
    require_rc(cuModuleLoadData(&mod, ptx), "cuModuleLoadData");
    require_rc(cuModuleGetFunction(&spin, mod, "vgpu_timed_spin"), "cuModuleGetFunction");
    printf("READY\n");
    fflush(stdout);

    unsigned long long n = 0;
    void *params[] = {&kernel_ns};
    while (!handle_stdin(n)) {
        for (int i = 0; i < 4; i++) {
            CUresult rc = cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
            if (rc != CUDA_SUCCESS) {
                fail("cuLaunchKernel(vgpu_timed_spin)", "returned %d (%s) after %llu kernels",
                     (int)rc, cu_name(rc), n);
                finish();
            }
        }
        CUresult rc = cuCtxSynchronize();
        if (rc != CUDA_SUCCESS) {
            fail("cuCtxSynchronize", "returned %d (%s) after %llu kernels", (int)rc, cu_name(rc),
                 n);
            finish();
        }
        n += 4;
    }
    printf("KERNELS %llu ERRORS 0\n", n);
    check(n > 0, "kernels ran", "none completed");
    require_rc(cuModuleUnload(mod), "cuModuleUnload");
    require_rc(cuCtxDestroy(ctx), "cuCtxDestroy");
    finish();
}
