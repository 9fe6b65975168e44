/*
 * lc_decode: the latency-critical tenant of the colocation benchmark, a decode-like step.
 *
 * One step is a chain of `layers` bf16 GEMVs (gemv_bf16 in kernels.cu: y = W x, W rows x
 * cols, fp32 accumulation, one warp per row) over `weights_gib` GiB of weights in total,
 * each layer reading the previous one's output. The chain is captured once into a CUDA
 * graph; a step is cuGraphLaunch + cuStreamSynchronize. Steps are paced by the host at
 * `rate` a second: step i starts at t0 + i/rate (at once when late). The latency of a step
 * is the wall time from just before the launch to the return of the synchronize.
 *
 * Before measuring: a GEMV check against a host reference, a check that the graph computes
 * what the plain launches compute, 20 warm-up steps (the exclusive GPU time of one step is
 * taken there with events), then the start barrier (COLOC_READY / COLOC_GO, see
 * coloc_common.h). If the library has no graph API, or capture fails, the step is the plain
 * chain of launches and the JSON says "graph":false with the reason. COLOC_NO_GRAPH=1
 * forces that.
 *
 * Usage: lc_decode KERNELS.cubin [seconds=10] [rate=200] [weights_gib=2] [rows=4096] [cols=8192]
 * stdout: one JSON object (latency in µs). Exit status: 0 ok, 1 check failed, 2 driver error.
 */
#include "coloc_common.h"

#define WARMUP_STEPS 20

typedef struct {
    CUfunction gemv;
    CUstream st;
    int layers, rows, cols;
    CUdeviceptr *w;     /* per layer, rows x cols bf16 */
    CUdeviceptr x0;     /* input of layer 0 (cols bf16), never written */
    CUdeviceptr act[2]; /* ping-pong activations, max(rows, cols) bf16 each */
} chain_t;

static CUresult gemv_launch(CUfunction f, CUstream st, CUdeviceptr w, CUdeviceptr x,
                            CUdeviceptr y, int rows, int cols)
{
    void *params[] = {&w, &x, &y, &rows, &cols};
    return cuLaunchKernel(f, (unsigned int)((rows + 7) / 8), 1, 1, 256, 1, 1, 0, st, params, NULL);
}

/* Output of the last layer. */
static CUdeviceptr chain_output(const chain_t *c)
{
    return c->act[c->layers & 1];
}

static CUresult chain_enqueue(const chain_t *c)
{
    int l;
    for (l = 0; l < c->layers; l++) {
        CUdeviceptr in = l == 0 ? c->x0 : c->act[l & 1];
        CU_TRY(gemv_launch(c->gemv, c->st, c->w[l], in, c->act[(l + 1) & 1], c->rows, c->cols));
    }
    return CUDA_SUCCESS;
}

/* GEMV on a small problem against a host reference. */
static void gemv_check(CUfunction f)
{
    const int rows = 256, cols = 2048;
    size_t nw = (size_t)rows * cols, i;
    uint16_t *hw = malloc(nw * 2), *hx = malloc((size_t)cols * 2), *hy = malloc((size_t)rows * 2);
    CUdeviceptr dw, dx, dy;
    int r, c, bad = 0;
    if (hw == NULL || hx == NULL || hy == NULL)
        exit(2);
    for (i = 0; i < nw; i++)
        hw[i] = host_f2bf((float)((int)(host_hash((uint32_t)i + 11u) % 2001u) - 1000) / 1000.0f);
    for (c = 0; c < cols; c++)
        hx[c] = host_f2bf((float)((int)(host_hash((uint32_t)c * 3u + 5u) % 2001u) - 1000) / 1000.0f);
    CU_CHECK(cuMemAlloc(&dw, nw * 2));
    CU_CHECK(cuMemAlloc(&dx, (size_t)cols * 2));
    CU_CHECK(cuMemAlloc(&dy, (size_t)rows * 2));
    CU_CHECK(cuMemcpyHtoD(dw, hw, nw * 2));
    CU_CHECK(cuMemcpyHtoD(dx, hx, (size_t)cols * 2));
    CU_CHECK(cuMemsetD8(dy, 0xff, (size_t)rows * 2));
    CU_CHECK(gemv_launch(f, NULL, dw, dx, dy, rows, cols));
    CU_CHECK(cuCtxSynchronize());
    CU_CHECK(cuMemcpyDtoH(hy, dy, (size_t)rows * 2));
    for (r = 0; r < rows; r++) {
        double ref = 0.0, mag = 0.0, got = host_bf2f(hy[r]);
        for (c = 0; c < cols; c++) {
            double p = (double)host_bf2f(hw[(size_t)r * cols + c]) * (double)host_bf2f(hx[c]);
            ref += p;
            mag += fabs(p);
        }
        /* bf16 output: 2^-8 relative, plus fp32 accumulation error. */
        if (fabs(got - ref) > fabs(ref) / 128.0 + mag * 1e-5) {
            if (bad < 5)
                fprintf(stderr, "gemv check: y[%d] = %g, expected %g\n", r, got, ref);
            bad++;
        }
    }
    cuMemFree(dw);
    cuMemFree(dx);
    cuMemFree(dy);
    free(hw);
    free(hx);
    free(hy);
    if (bad) {
        fprintf(stderr, "FAIL gemv check: %d of %d rows wrong\n", bad, rows);
        exit(1);
    }
    fprintf(stderr, "gemv check (%dx%d): pass\n", rows, cols);
}

int main(int argc, char **argv)
{
    cu_session s;
    chain_t c;
    CUmodule mod;
    CUfunction fill;
    graph_api g;
    void *graph = NULL, *exec = NULL;
    const char *graph_error = NULL;
    char graph_error_buf[160];
    double seconds, rate, weights_gib, *lat;
    long max_steps, n = 0, late = 0, i;
    uint64_t period, t0, t_end, deadline;
    size_t layer_bytes, out_bytes;
    uint16_t *ref, *got;
    CUevent e0, e1;
    float step_ms = 0.0f;
    int l;

    if (argc < 2) {
        fprintf(stderr,
                "usage: %s KERNELS.cubin [seconds=10] [rate=200] [weights_gib=2] [rows=4096] "
                "[cols=8192]\n",
                argv[0]);
        return 2;
    }
    seconds = arg_double(argc, argv, 2, 10.0);
    rate = arg_double(argc, argv, 3, 200.0);
    weights_gib = arg_double(argc, argv, 4, 2.0);
    memset(&c, 0, sizeof c);
    c.rows = (int)arg_long(argc, argv, 5, 4096);
    c.cols = (int)arg_long(argc, argv, 6, 8192);
    if (c.cols % 1024 != 0) {
        fprintf(stderr, "cols must be a multiple of 1024\n");
        return 2;
    }
    layer_bytes = (size_t)c.rows * (size_t)c.cols * 2;
    c.layers = (int)(weights_gib * 1073741824.0 / (double)layer_bytes + 0.5);
    if (c.layers < 1)
        c.layers = 1;

    cu_open(&s, 0);
    mod = load_module_file(argv[1]);
    c.gemv = get_function(mod, "gemv_bf16");
    fill = get_function(mod, "fill_bf16");
    gemv_check(c.gemv);

    CU_CHECK(cuStreamCreate(&c.st, CU_STREAM_NON_BLOCKING));
    c.w = calloc((size_t)c.layers, sizeof *c.w);
    if (c.w == NULL)
        return 2;
    for (l = 0; l < c.layers; l++) {
        CU_CHECK(cuMemAlloc(&c.w[l], layer_bytes));
        /* Uniform in +-sqrt(3/cols): activations keep a magnitude of about 1 along the chain. */
        CU_CHECK(fill_bf16(fill, c.st, c.w[l], (unsigned long long)c.rows * c.cols,
                           1000u + (unsigned int)l, (float)sqrt(3.0 / c.cols)));
    }
    out_bytes = (size_t)(c.rows > c.cols ? c.rows : c.cols) * 2;
    CU_CHECK(cuMemAlloc(&c.x0, (size_t)c.cols * 2));
    CU_CHECK(fill_bf16(fill, c.st, c.x0, (unsigned long long)c.cols, 7u, 1.0f));
    for (l = 0; l < 2; l++) {
        CU_CHECK(cuMemAlloc(&c.act[l], out_bytes));
        CU_CHECK(cuMemsetD8(c.act[l], 0, out_bytes));
    }
    /* The memsets run on the NULL stream, which does not order with c.st (non-blocking). */
    CU_CHECK(cuCtxSynchronize());
    fprintf(stderr, "weights: %d layers of %dx%d bf16 (%.2f GiB)\n", c.layers, c.rows, c.cols,
            (double)layer_bytes * c.layers / 1073741824.0);

    /* Reference: the chain as plain launches. */
    ref = malloc((size_t)c.rows * 2);
    got = malloc((size_t)c.rows * 2);
    if (ref == NULL || got == NULL)
        return 2;
    CU_CHECK(chain_enqueue(&c));
    CU_CHECK(cuStreamSynchronize(c.st));
    CU_CHECK(cuMemcpyDtoH(ref, chain_output(&c), (size_t)c.rows * 2));

    /* The graph, captured once. */
    g = graph_api_load();
    if (getenv("COLOC_NO_GRAPH") != NULL && strcmp(getenv("COLOC_NO_GRAPH"), "1") == 0) {
        graph_error = "disabled by COLOC_NO_GRAPH=1";
    } else if (g.missing != NULL) {
        snprintf(graph_error_buf, sizeof graph_error_buf, "%s not found in %s", g.missing,
                 cu_lib_path());
        graph_error = graph_error_buf;
    } else {
        CUresult rc = g.begin_capture(c.st, 0 /* CU_STREAM_CAPTURE_MODE_GLOBAL */);
        CUresult rc_enqueue = CUDA_SUCCESS, rc_end = CUDA_SUCCESS;
        if (rc == CUDA_SUCCESS) {
            rc_enqueue = chain_enqueue(&c);
            rc_end = g.end_capture(c.st, &graph); /* always, to leave capture mode */
        }
        if (rc == CUDA_SUCCESS && rc_enqueue == CUDA_SUCCESS && rc_end == CUDA_SUCCESS)
            rc = g.instantiate(&exec, graph, 0);
        if (rc == CUDA_SUCCESS && rc_enqueue == CUDA_SUCCESS && rc_end == CUDA_SUCCESS) {
            CU_CHECK(cuMemsetD8(chain_output(&c), 0, (size_t)c.rows * 2));
            CU_CHECK(cuCtxSynchronize());
            rc = g.launch(exec, c.st);
            if (rc == CUDA_SUCCESS)
                rc = cuStreamSynchronize(c.st);
            if (rc == CUDA_SUCCESS)
                rc = cuMemcpyDtoH(got, chain_output(&c), (size_t)c.rows * 2);
            if (rc != CUDA_SUCCESS) {
                snprintf(graph_error_buf, sizeof graph_error_buf, "graph launch failed: %d (%s)",
                         (int)rc, cu_err_name(rc));
                graph_error = graph_error_buf;
            } else if (memcmp(ref, got, (size_t)c.rows * 2) != 0) {
                graph_error = "the graph's output differs from the plain launches' output";
            }
        } else {
            CUresult bad = rc != CUDA_SUCCESS ? rc : rc_enqueue != CUDA_SUCCESS ? rc_enqueue : rc_end;
            snprintf(graph_error_buf, sizeof graph_error_buf,
                     "capture failed: begin/instantiate %d, launch %d, end %d (%s)", (int)rc,
                     (int)rc_enqueue, (int)rc_end, cu_err_name(bad));
            graph_error = graph_error_buf;
        }
    }
    if (graph_error != NULL) {
        fprintf(stderr, "WARNING: not using a CUDA graph: %s\n", graph_error);
        exec = NULL;
        /* Make sure the stream still works (a failed capture may leave it unusable). */
        if (cuStreamSynchronize(c.st) != CUDA_SUCCESS) {
            fprintf(stderr, "stream unusable after the failed capture, making a new one\n");
            CU_CHECK(cuStreamCreate(&c.st, CU_STREAM_NON_BLOCKING));
        }
    } else {
        fprintf(stderr, "graph: %d kernels captured, output identical to plain launches\n",
                c.layers);
    }

    /* Warm-up; the last step is timed with events (exclusive GPU time when run alone). */
    CU_CHECK(cuEventCreate(&e0, CU_EVENT_DEFAULT));
    CU_CHECK(cuEventCreate(&e1, CU_EVENT_DEFAULT));
    for (i = 0; i < WARMUP_STEPS; i++) {
        if (i == WARMUP_STEPS - 1)
            CU_CHECK(cuEventRecord(e0, c.st));
        if (exec != NULL)
            CU_CHECK(g.launch(exec, c.st));
        else
            CU_CHECK(chain_enqueue(&c));
        if (i == WARMUP_STEPS - 1)
            CU_CHECK(cuEventRecord(e1, c.st));
        CU_CHECK(cuStreamSynchronize(c.st));
    }
    CU_CHECK(cuEventElapsedTime(&step_ms, e0, e1));
    fprintf(stderr, "warm-up step: %.1f us GPU time, %.0f GB/s\n", step_ms * 1e3,
            (double)layer_bytes * c.layers / (step_ms * 1e-3) / 1e9);

    max_steps = (long)(seconds * rate + 0.5);
    if (max_steps < 1)
        max_steps = 1;
    lat = malloc((size_t)max_steps * sizeof *lat);
    if (lat == NULL)
        return 2;
    period = (uint64_t)(1e9 / rate);

    coloc_barrier("lc_decode");

    t0 = now_ns();
    /* A tenant that cannot keep up stops at 1.5x the planned time plus 2 s. */
    deadline = t0 + (uint64_t)((seconds * 1.5 + 2.0) * 1e9);
    for (i = 0; i < max_steps; i++) {
        uint64_t target = t0 + (uint64_t)i * period, ts, te;
        uint64_t now = now_ns();
        if (now > deadline) {
            fprintf(stderr, "lc_decode: stopping after %ld steps, past the deadline\n", i);
            break;
        }
        if (now < target)
            sleep_until_ns(target);
        ts = now_ns();
        if (ts > target + period / 5)
            late++;
        if (exec != NULL)
            CU_CHECK(g.launch(exec, c.st));
        else
            CU_CHECK(chain_enqueue(&c));
        CU_CHECK(cuStreamSynchronize(c.st));
        te = now_ns();
        lat[n++] = (double)(te - ts) / 1e3;
    }
    t_end = now_ns();

    /* Output check after the run: the same as before. */
    CU_CHECK(cuMemcpyDtoH(got, chain_output(&c), (size_t)c.rows * 2));
    if (memcmp(ref, got, (size_t)c.rows * 2) != 0) {
        fprintf(stderr, "FAIL the output after the run differs from the reference\n");
        return 1;
    }

    printf("{");
    json_preamble(stdout, "lc_decode", &s);
    printf(",\"graph\":%s,\"graph_error\":", exec != NULL ? "true" : "false");
    if (graph_error != NULL)
        json_str(stdout, graph_error);
    else
        printf("null");
    printf(",\"layers\":%d,\"rows\":%d,\"cols\":%d,\"weights_bytes\":%zu", c.layers, c.rows,
           c.cols, layer_bytes * (size_t)c.layers);
    printf(",\"seconds_planned\":%.3f,\"rate_target\":%.1f,\"steps_planned\":%ld", seconds, rate,
           max_steps);
    printf(",\"steps\":%ld,\"late_steps\":%ld,\"seconds\":%.3f,\"achieved_rate\":%.2f", n, late,
           (double)(t_end - t0) / 1e9, n > 0 ? (double)n / ((double)(t_end - t0) / 1e9) : 0.0);
    printf(",\"warmup_step_gpu_us\":%.1f,\"warmup_gbps\":%.1f", step_ms * 1e3,
           step_ms > 0 ? (double)layer_bytes * c.layers / (step_ms * 1e-3) / 1e9 : 0.0);
    json_latency(stdout, "latency_us", lat, (size_t)n);
    printf("}\n");
    fflush(stdout);

    if (exec != NULL && g.exec_destroy != NULL)
        g.exec_destroy(exec);
    if (graph != NULL && g.graph_destroy != NULL)
        g.graph_destroy(graph);
    for (l = 0; l < c.layers; l++)
        cuMemFree(c.w[l]);
    cu_close(&s);
    return 0;
}
