/*
 * Shared helpers for the C test clients: PASS/FAIL reporting, a watchdog,
 * timing, and test patterns. Header-only; every client is one C file.
 */
#ifndef VGPU_TESTS_CHECK_H
#define VGPU_TESTS_CHECK_H

#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cuda.h"

static int g_checks __attribute__((unused)) = 0;
static int g_failures __attribute__((unused)) = 0;

/* The CUresult name, from the library if it knows it. */
static inline const char *cu_name(CUresult rc) {
    const char *name = NULL;
    if (cuGetErrorName(rc, &name) != CUDA_SUCCESS || name == NULL) {
        return "?";
    }
    return name;
}

static inline void pass(const char *what) {
    g_checks++;
    printf("PASS %s\n", what);
    fflush(stdout);
}

static inline void vfail(const char *what, const char *fmt, va_list ap) {
    g_checks++;
    g_failures++;
    printf("FAIL %s: ", what);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
}

static inline void fail(const char *what, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(what, fmt, ap);
    va_end(ap);
}

/* Records one check: passes when `ok`, else fails with the message. */
static inline int check(int ok, const char *what, const char *fmt, ...) {
    if (ok) {
        pass(what);
        return 1;
    }
    va_list ap;
    va_start(ap, fmt);
    vfail(what, fmt, ap);
    va_end(ap);
    return 0;
}

/* Records a check that a call returned `want`. */
static inline int check_rc(CUresult rc, CUresult want, const char *what) {
    if (rc == want) {
        pass(what);
        return 1;
    }
    fail(what, "returned %d (%s), expected %d", (int)rc, cu_name(rc), (int)want);
    return 0;
}

/* Prints the summary line and exits: 0 when every check passed. */
static inline void finish(void) {
    if (g_failures == 0) {
        printf("RESULT: PASS (%d checks)\n", g_checks);
        fflush(stdout);
        exit(0);
    }
    printf("RESULT: FAIL (%d of %d checks failed)\n", g_failures, g_checks);
    fflush(stdout);
    exit(1);
}

/* A check whose failure makes the rest meaningless: fails and exits. */
static inline void require_rc(CUresult rc, const char *what) {
    if (!check_rc(rc, CUDA_SUCCESS, what)) {
        printf("ABORT: %s is required for the remaining checks\n", what);
        finish();
    }
}

static inline void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "FAIL watchdog: the client hung\nRESULT: FAIL (hung)\n";
    ssize_t ignored = write(STDOUT_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    _exit(3);
}

/* Kills the process with a FAIL line if it runs longer than `seconds`. */
static inline void start_watchdog(unsigned seconds) {
    signal(SIGALRM, on_alarm);
    alarm(seconds);
}

static inline double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* A pattern that differs per word and per seed, so misplaced data shows. */
static inline void fill_pattern(void *buf, size_t bytes, uint32_t seed) {
    uint32_t *w = (uint32_t *)buf;
    for (size_t i = 0; i < bytes / 4; i++) {
        w[i] = (uint32_t)(i * 2654435761u) ^ seed;
    }
}

/* Index of the first 32-bit word that differs from the pattern, or -1. */
static inline long find_pattern_mismatch(const void *buf, size_t bytes, uint32_t seed) {
    const uint32_t *w = (const uint32_t *)buf;
    for (size_t i = 0; i < bytes / 4; i++) {
        if (w[i] != ((uint32_t)(i * 2654435761u) ^ seed)) {
            return (long)i;
        }
    }
    return -1;
}

/* Reads an unsigned integer from the environment, or `fallback`. */
static inline unsigned long long env_u64(const char *name, unsigned long long fallback) {
    const char *v = getenv(name);
    if (v == NULL || *v == '\0') {
        return fallback;
    }
    return strtoull(v, NULL, 0);
}

#endif /* VGPU_TESTS_CHECK_H */
