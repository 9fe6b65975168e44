/*
 * A tenant whose device memory is reclaimed and restored under it (elastic memory): it fills
 * buffers with patterns, and checks every byte whenever asked, so swap-out and swap-in must
 * keep every byte at the same device address.
 *
 * Usage: memory_client
 * Prints "READY" once its context exists, then reads commands on stdin, one per line, and
 * answers each with one line (after any FAIL lines):
 *   alloc MIB COUNT   allocates COUNT buffers of MIB MiB plus 7 small ones (1 B .. 300 KiB),
 *                     fills them with the round's pattern       -> "ALLOCATED <bytes> <ms>"
 *   allocm MIB COUNT  the same without the small ones, each buffer filled on the device
 *                     with one 32-bit word (fast, for tens of GiB) -> "ALLOCATED <bytes> <ms>"
 *                     (<ms>: the time the allocations took, fills excluded)
 *   fill ROUND        refills every buffer with ROUND's pattern (copies, plus a memset of
 *                     the first 4 KiB of each large buffer)   -> "FILLED <round>"
 *   verify            reads every byte back and compares      -> "VERIFIED <bytes>"
 *   sample            the same for the first and last MiB of each buffer -> "SAMPLED <bytes>"
 *   meminfo           -> "MEMINFO <free> <total>"
 *   hammer MS         synchronous 4 KiB memsets on buffer 0 back to back for MS ms (a guest
 *                     busy with requests when its slice is reclaimed)
 *                     -> "HAMMERING" at the start, "TICK" every 64 memsets,
 *                        "HAMMERED <memsets>" at the end
 *   tryalloc MIB      one buffer of MIB MiB, which may be refused (an OUT_OF_MEMORY is an
 *                     answer, not a failure); kept and filled if allocated -> "TRIED <CUresult>"
 *   free              frees every buffer                       -> "FREED"
 *   stop (or end of input) ends: RESULT line.
 * Any failing call or mismatch is a FAIL line.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define MAX_BUFS 4096
#define MIB (1024ull * 1024ull)

static const size_t SMALL[] = {1, 17, 512, 4096, 65536, 100000, 300 * 1024};
#define N_SMALL (sizeof SMALL / sizeof SMALL[0])

static CUdeviceptr g_ptr[MAX_BUFS];
static size_t g_len[MAX_BUFS];
static int g_word[MAX_BUFS]; /* filled with memset_word only */
static int g_n = 0;
static unsigned g_round = 0;
static unsigned char *g_host = NULL;
static size_t g_host_len = 0;

/* Byte i of buffer b in round r. The first 4 KiB of buffers >= 1 MiB hold the memset word. */
static inline unsigned char pattern(int b, size_t i, unsigned r) {
    uint64_t x = (uint64_t)i * 0x9E3779B97F4A7C15ull ^ ((uint64_t)b << 40) ^ ((uint64_t)r << 56);
    return (unsigned char)(x >> 29);
}

static inline uint32_t memset_word(int b, unsigned r) {
    return 0xA5000000u ^ ((uint32_t)b << 8) ^ r;
}

static unsigned char expected(int b, size_t i, unsigned r) {
    if (g_word[b] || (g_len[b] >= MIB && i < 4096)) {
        uint32_t w = memset_word(b, r);
        return (unsigned char)(w >> (8 * (i % 4)));
    }
    return pattern(b, i, r);
}

static int ensure_host(size_t len) {
    if (len <= g_host_len) {
        return 1;
    }
    free(g_host);
    g_host = malloc(len);
    g_host_len = g_host == NULL ? 0 : len;
    return g_host != NULL;
}

static int fill(int b, unsigned r) {
    size_t len = g_len[b];
    if (g_word[b]) {
        CUresult rc = cuMemsetD32(g_ptr[b], memset_word(b, r), len / 4);
        if (rc != CUDA_SUCCESS) {
            fail("cuMemsetD32", "buffer %d returned %d (%s)", b, (int)rc, cu_name(rc));
            return 0;
        }
        return 1;
    }
    if (!ensure_host(len)) {
        fail("fill", "no host memory for %zu bytes", len);
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        g_host[i] = pattern(b, i, r);
    }
    CUresult rc = cuMemcpyHtoD(g_ptr[b], g_host, len);
    if (rc != CUDA_SUCCESS) {
        fail("cuMemcpyHtoD", "buffer %d (%zu bytes) returned %d (%s)", b, len, (int)rc, cu_name(rc));
        return 0;
    }
    if (len >= MIB) {
        rc = cuMemsetD32(g_ptr[b], memset_word(b, r), 1024);
        if (rc != CUDA_SUCCESS) {
            fail("cuMemsetD32", "buffer %d returned %d (%s)", b, (int)rc, cu_name(rc));
            return 0;
        }
    }
    return 1;
}

/* Compares [off, off + len) of buffer b. */
static int compare(int b, size_t off, size_t len) {
    if (!ensure_host(len)) {
        fail("verify", "no host memory for %zu bytes", len);
        return 0;
    }
    CUresult rc = cuMemcpyDtoH(g_host, g_ptr[b] + off, len);
    if (rc != CUDA_SUCCESS) {
        fail("cuMemcpyDtoH", "buffer %d returned %d (%s)", b, (int)rc, cu_name(rc));
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned char want = expected(b, off + i, g_round);
        if (g_host[i] != want) {
            fail("verify", "buffer %d (%zu bytes at 0x%llx) byte %zu is 0x%02x, expected 0x%02x",
                 b, g_len[b], (unsigned long long)g_ptr[b], off + i, g_host[i], want);
            return 0;
        }
    }
    return 1;
}

static void cmd_alloc(unsigned long long mib, int count, int word) {
    size_t total = 0;
    double alloc_ms = 0;
    int extra = word ? 0 : (int)N_SMALL;
    for (int i = 0; i < count + extra && g_n < MAX_BUFS; i++) {
        size_t len = i < count ? (size_t)(mib * MIB) : SMALL[i - count];
        double t0 = now_ms();
        CUresult rc = cuMemAlloc(&g_ptr[g_n], len);
        alloc_ms += now_ms() - t0;
        if (rc != CUDA_SUCCESS) {
            fail("cuMemAlloc", "%zu bytes (buffer %d) returned %d (%s)", len, g_n, (int)rc,
                 cu_name(rc));
            break;
        }
        g_len[g_n] = len;
        g_word[g_n] = word && len % 4 == 0;
        if (!fill(g_n, g_round)) {
            g_n++;
            break;
        }
        total += len;
        g_n++;
    }
    CUresult rc = cuCtxSynchronize();
    check(rc == CUDA_SUCCESS, "fills complete", "cuCtxSynchronize returned %d (%s)", (int)rc,
          cu_name(rc));
    printf("ALLOCATED %zu %.3f\n", total, alloc_ms);
}

static void cmd_tryalloc(unsigned long long mib) {
    CUdeviceptr p = 0;
    size_t len = (size_t)(mib * MIB);
    CUresult rc = g_n < MAX_BUFS ? cuMemAlloc(&p, len) : CUDA_ERROR_OUT_OF_MEMORY;
    if (rc == CUDA_SUCCESS) {
        g_ptr[g_n] = p;
        g_len[g_n] = len;
        g_word[g_n] = 0;
        if (fill(g_n, g_round)) {
            rc = cuCtxSynchronize();
        }
        g_n++;
    }
    printf("TRIED %d\n", (int)rc);
}

static void cmd_hammer(unsigned ms) {
    if (g_n == 0) {
        fail("hammer", "no buffer");
        return;
    }
    printf("HAMMERING\n");
    fflush(stdout);
    unsigned long long n = 0;
    double end = now_ms() + ms;
    while (now_ms() < end) {
        CUresult rc = cuMemsetD8(g_ptr[0], (unsigned char)n, 4096);
        if (rc != CUDA_SUCCESS) {
            fail("cuMemsetD8", "returned %d (%s)", (int)rc, cu_name(rc));
            break;
        }
        if (++n % 64 == 0) {
            printf("TICK\n");
            fflush(stdout);
        }
    }
    /* Buffer 0's first 4 KiB no longer hold the pattern: put it back. */
    fill(0, g_round);
    printf("HAMMERED %llu\n", n);
}

static void cmd_fill(unsigned r) {
    g_round = r;
    for (int b = 0; b < g_n; b++) {
        if (!fill(b, r)) {
            break;
        }
    }
    printf("FILLED %u\n", r);
}

static void cmd_verify(int sample) {
    size_t checked = 0;
    int ok = 1;
    for (int b = 0; b < g_n && ok; b++) {
        size_t len = g_len[b];
        if (sample && len > 2 * MIB) {
            ok = compare(b, 0, MIB) && compare(b, len - MIB, MIB);
            checked += 2 * MIB;
        } else {
            ok = compare(b, 0, len);
            checked += len;
        }
    }
    if (ok) {
        pass(sample ? "sampled bytes intact" : "every byte intact");
    }
    printf("%s %zu\n", sample ? "SAMPLED" : "VERIFIED", ok ? checked : 0);
}

static void cmd_free(void) {
    for (int b = 0; b < g_n; b++) {
        CUresult rc = cuMemFree(g_ptr[b]);
        if (rc != CUDA_SUCCESS) {
            fail("cuMemFree", "buffer %d returned %d (%s)", b, (int)rc, cu_name(rc));
        }
    }
    g_n = 0;
    printf("FREED\n");
}

int main(void) {
    start_watchdog((unsigned)env_u64("VGPU_TEST_WATCHDOG_S", 300));
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    require_rc(cuInit(0), "cuInit");
    require_rc(cuDeviceGet(&dev, 0), "cuDeviceGet");
    require_rc(cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    require_rc(cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
    printf("READY\n");
    fflush(stdout);

    char line[256];
    while (fgets(line, sizeof line, stdin) != NULL) {
        unsigned long long mib = 0;
        int count = 0;
        unsigned r = 0;
        if (sscanf(line, "allocm %llu %d", &mib, &count) == 2) {
            cmd_alloc(mib, count, 1);
        } else if (sscanf(line, "alloc %llu %d", &mib, &count) == 2) {
            cmd_alloc(mib, count, 0);
        } else if (sscanf(line, "hammer %u", &r) == 1) {
            cmd_hammer(r);
        } else if (sscanf(line, "tryalloc %llu", &mib) == 1) {
            cmd_tryalloc(mib);
        } else if (sscanf(line, "fill %u", &r) == 1) {
            cmd_fill(r);
        } else if (strncmp(line, "verify", 6) == 0) {
            cmd_verify(0);
        } else if (strncmp(line, "sample", 6) == 0) {
            cmd_verify(1);
        } else if (strncmp(line, "meminfo", 7) == 0) {
            size_t free_b = 0, total_b = 0;
            CUresult rc = cuMemGetInfo(&free_b, &total_b);
            check(rc == CUDA_SUCCESS, "cuMemGetInfo", "returned %d (%s)", (int)rc, cu_name(rc));
            printf("MEMINFO %zu %zu\n", free_b, total_b);
        } else if (strncmp(line, "free", 4) == 0) {
            cmd_free();
        } else if (strncmp(line, "stop", 4) == 0) {
            break;
        } else {
            fail("command", "unknown: %s", line);
        }
        fflush(stdout);
    }
    cmd_free();
    require_rc(cuDevicePrimaryCtxRelease(dev), "cuDevicePrimaryCtxRelease");
    finish();
}
