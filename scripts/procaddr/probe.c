/*
 * Probes the real driver's cuGetProcAddress_v2: for every exported cu* name (base name, with
 * the _v2/_v3/.../_ptsz/_ptds suffixes removed), every flag (0 default, 1 legacy stream,
 * 2 per-thread default stream) and every CUDA version 1000..13000 step 10, asks for the entry
 * point and maps the pointer back to the exported symbol(s) at that address.
 *
 * Output (stdout), one line per run of versions that resolve alike:
 *   <name> <flags> <first_version> <last_version> <symbol|-> <symbol_status> <rc>
 * symbol "-": not found (rc != 0 or null pointer); "?+0xOFF": a pointer to no exported symbol.
 * Header lines start with '#': driver version.
 *
 * Usage: probe LIBCUDA_PATH NAMES_FILE   (NAMES_FILE: exported names and their addresses
 *        as printed by `nm -D --defined-only`, i.e. "<hex> T <name>"; lines "0 X <name>" add
 *        names to probe that are not exported, e.g. those applications were seen asking for)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int (*get_proc_v2_t)(const char *, void **, int, unsigned long long, int *);
typedef int (*init_t)(unsigned);
typedef int (*version_t)(int *);

struct sym {
    uintptr_t off;
    char name[256];
};

static struct sym syms[8192];
static size_t nsyms;

static int by_off(const void *a, const void *b) {
    const struct sym *x = a, *y = b;
    if (x->off != y->off) return x->off < y->off ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* All exported names at offset `off`, comma separated, into buf. */
static void names_at(uintptr_t off, char *buf, size_t cap) {
    buf[0] = '\0';
    size_t lo = 0, hi = nsyms;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (syms[mid].off < off) lo = mid + 1; else hi = mid;
    }
    for (size_t i = lo; i < nsyms && syms[i].off == off; i++) {
        if (buf[0] != '\0') strncat(buf, ",", cap - strlen(buf) - 1);
        strncat(buf, syms[i].name, cap - strlen(buf) - 1);
    }
}

static const char *suffixes[] = {"_v2", "_v3", "_v4", "_v5", "_v6", "_v7", "_v8", "_v9",
                                 "_v10", "_v11", "_v12", "_ptsz", "_ptds", NULL};

/* The base name: strips _ptsz/_ptds, then one _vN. */
static void base_of(const char *name, char *out, size_t cap) {
    snprintf(out, cap, "%s", name);
    for (int pass = 0; pass < 2; pass++) {
        size_t n = strlen(out);
        for (int i = 0; suffixes[i] != NULL; i++) {
            size_t k = strlen(suffixes[i]);
            if (n > k && strcmp(out + n - k, suffixes[i]) == 0) {
                out[n - k] = '\0';
                break;
            }
        }
    }
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s LIBCUDA NAMES_FILE\n", argv[0]);
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    get_proc_v2_t gpa = (get_proc_v2_t)dlsym(lib, "cuGetProcAddress_v2");
    init_t cu_init = (init_t)dlsym(lib, "cuInit");
    version_t drv = (version_t)dlsym(lib, "cuDriverGetVersion");
    if (gpa == NULL || cu_init == NULL || drv == NULL) {
        fprintf(stderr, "missing cuGetProcAddress_v2/cuInit/cuDriverGetVersion\n");
        return 1;
    }
    int init_rc = cu_init(0);
    int version = 0;
    drv(&version);
    Dl_info info;
    if (!dladdr((void *)gpa, &info)) {
        fprintf(stderr, "dladdr failed\n");
        return 1;
    }
    uintptr_t base = (uintptr_t)info.dli_fbase;

    FILE *f = fopen(argv[2], "r");
    if (f == NULL) {
        perror("names file");
        return 1;
    }
    char line[512];
    static char *bases[8192];
    size_t nbases = 0;
    while (fgets(line, sizeof line, f) != NULL && nsyms < 8192) {
        unsigned long long off;
        char type[8], name[256];
        if (sscanf(line, "%llx %7s %255s", &off, type, name) != 3) continue;
        if (strncmp(name, "cu", 2) != 0) continue;
        char *at = strchr(name, '@');
        if (at != NULL) *at = '\0';
        if (strcmp(type, "X") == 0) { /* a name to probe that is not exported */
            bases[nbases++] = strdup(name);
            continue;
        }
        syms[nsyms].off = (uintptr_t)off;
        snprintf(syms[nsyms].name, sizeof syms[nsyms].name, "%s", name);
        nsyms++;
        char b[256];
        base_of(name, b, sizeof b);
        bases[nbases++] = strdup(b);
    }
    fclose(f);
    qsort(syms, nsyms, sizeof syms[0], by_off);
    qsort(bases, nbases, sizeof bases[0], cmp_str);

    printf("# driver_version %d cuInit %d symbols %zu\n", version, init_rc, nsyms);
    printf("# name flags first_version last_version symbol symbol_status rc\n");
    const char *prev = "";
    for (size_t b = 0; b < nbases; b++) {
        if (strcmp(bases[b], prev) == 0) continue;
        prev = bases[b];
        for (unsigned long long flags = 0; flags <= 2; flags++) {
            char cur[1024] = "", last[1024] = "";
            int first_v = 1000, last_v = 1000;
            for (int v = 1000; v <= 13000; v += 10) {
                void *p = NULL;
                int st = -1;
                int rc = gpa(bases[b], &p, v, flags, &st);
                char names[900];
                if (rc != 0 || p == NULL) {
                    snprintf(names, sizeof names, "-");
                } else {
                    names_at((uintptr_t)p - base, names, sizeof names);
                    if (names[0] == '\0')
                        snprintf(names, sizeof names, "?+0x%lx", (unsigned long)((uintptr_t)p - base));
                }
                snprintf(cur, sizeof cur, "%s %d %d", names, st, rc);
                if (v == 1000) {
                    snprintf(last, sizeof last, "%s", cur);
                    first_v = last_v = v;
                } else if (strcmp(cur, last) == 0) {
                    last_v = v;
                } else {
                    printf("%s %llu %d %d %s\n", bases[b], flags, first_v, last_v, last);
                    snprintf(last, sizeof last, "%s", cur);
                    first_v = last_v = v;
                }
            }
            printf("%s %llu %d %d %s\n", bases[b], flags, first_v, last_v, last);
        }
    }
    return 0;
}
