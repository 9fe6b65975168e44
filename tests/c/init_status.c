/*
 * Calls cuInit and checks that it returns the expected CUresult within a
 * time bound.
 *
 * Usage: init_status EXPECTED_RC [MAX_MS]
 * Prints "INIT rc=<n> name=<NAME> elapsed_ms=<ms>" and PASS/FAIL lines; exits
 * non-zero on any failure.
 */
#include <stdio.h>
#include <stdlib.h>

#include "check.h"

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s EXPECTED_RC [MAX_MS]\n", argv[0]);
        return 2;
    }
    CUresult want = (CUresult)atoi(argv[1]);
    double max_ms = argc == 3 ? atof(argv[2]) : 5000.0;
    start_watchdog(60);

    double t0 = now_ms();
    CUresult rc = cuInit(0);
    double elapsed = now_ms() - t0;
    printf("INIT rc=%d name=%s elapsed_ms=%.1f\n", (int)rc, cu_name(rc), elapsed);
    check_rc(rc, want, "cuInit returns the expected status");
    check(elapsed <= max_ms, "cuInit answers in bounded time", "took %.1f ms (limit %.0f ms)",
          elapsed, max_ms);

    if (want != CUDA_SUCCESS) {
        /* Nothing may work after a failed cuInit, and nothing may hang. */
        int count = -1;
        t0 = now_ms();
        CUresult rc2 = cuDeviceGetCount(&count);
        elapsed = now_ms() - t0;
        check(rc2 != CUDA_SUCCESS || count == 0, "no device is reported after a failed cuInit",
              "cuDeviceGetCount returned %d with count %d", (int)rc2, count);
        check(elapsed <= max_ms, "cuDeviceGetCount answers in bounded time", "took %.1f ms",
              elapsed);
    }
    finish();
}
