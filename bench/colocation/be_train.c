/*
 * be_train: a best-effort tenant of the colocation benchmark, a training loop of a small MLP
 * (`layers` square layers of `hidden` units, a batch of `batch` rows, bf16 weights and
 * activations, fp32 accumulation; the GEMM kernels of kernels.cu).
 *
 * One step:
 *   forward,  for each layer l:  Z = X[l] W[l] (gemm_nn);  X[l+1] = relu(Z)
 *   loss:     G = X[L] / batch (the gradient of 0.5 |X[L]|^2 / batch)
 *   backward, for l = L-1 .. 0:  dZ = G * relu'(X[l+1])
 *                                dW = X[l]^T dZ   (gemm_tn)
 *                                G  = dZ W[l]^T   (gemm_nt, not for l = 0)
 *                                W[l] -= lr dW    (SGD)
 * i.e. 3L-1 GEMMs of batch x hidden x hidden a step.
 *
 * Start: the GEMM check of coloc_common.h; one warm-up step timed with events; the start
 * barrier. Then steps are queued for `seconds`, at most 2 in flight.
 *
 * Usage: be_train KERNELS.cubin [seconds=10] [hidden=4096] [batch=4096] [layers=4]
 * stdout: one JSON object. Exit status: 0 ok, 1 check failed, 2 driver error.
 */
#include "coloc_common.h"

#define MAX_LAYERS 64
#define DEPTH 2

typedef struct {
    gemm_kernels g;
    CUfunction relu_fwd, relu_bwd, loss_grad, sgd;
    CUstream st;
    int hidden, batch, layers;
    CUdeviceptr w[MAX_LAYERS];      /* hidden x hidden bf16 */
    CUdeviceptr dw;                 /* hidden x hidden fp32 (one, reused) */
    CUdeviceptr x[MAX_LAYERS + 1];  /* batch x hidden bf16 activations */
    CUdeviceptr z;                  /* batch x hidden fp32 pre-activation / gradient */
    CUdeviceptr dz;                 /* batch x hidden bf16 */
} mlp_t;

static CUresult ew_launch(CUfunction f, CUstream st, void **params, unsigned long long n)
{
    return cuLaunchKernel(f, elementwise_grid(n), 1, 1, 256, 1, 1, 0, st, params, NULL);
}

static CUresult train_step(mlp_t *m)
{
    unsigned long long act_n = (unsigned long long)m->batch * m->hidden;
    unsigned long long w_n = (unsigned long long)m->hidden * m->hidden;
    float inv_batch = 1.0f / (float)m->batch, one = 1.0f, lr = 1e-4f;
    int l;
    for (l = 0; l < m->layers; l++) {
        void *p[] = {&m->z, &m->x[l + 1], &act_n};
        CU_TRY(gemm_launch(m->g.nn, m->st, m->x[l], m->w[l], m->z, m->batch, m->hidden, m->hidden));
        CU_TRY(ew_launch(m->relu_fwd, m->st, p, act_n));
    }
    {
        void *p[] = {&m->x[m->layers], &m->z, &act_n, &inv_batch};
        CU_TRY(ew_launch(m->loss_grad, m->st, p, act_n));
    }
    for (l = m->layers - 1; l >= 0; l--) {
        void *pb[] = {&m->z, &m->x[l + 1], &m->dz, &act_n, &one};
        void *ps[] = {&m->w[l], &m->dw, &w_n, &lr};
        CU_TRY(ew_launch(m->relu_bwd, m->st, pb, act_n));
        /* dW (hidden x hidden) = X[l]^T (hidden x batch) dZ (batch x hidden) */
        CU_TRY(gemm_launch(m->g.tn, m->st, m->x[l], m->dz, m->dw, m->hidden, m->hidden, m->batch));
        /* G (batch x hidden) = dZ (batch x hidden) W[l]^T; W[l] is read before its update */
        if (l > 0)
            CU_TRY(gemm_launch(m->g.nt, m->st, m->dz, m->w[l], m->z, m->batch, m->hidden,
                               m->hidden));
        CU_TRY(ew_launch(m->sgd, m->st, ps, w_n));
    }
    return CUDA_SUCCESS;
}

int main(int argc, char **argv)
{
    cu_session s;
    CUmodule mod;
    CUfunction fill;
    mlp_t m;
    CUevent ev[DEPTH], e0, e1;
    double seconds, flop_step;
    long steps = 0;
    uint64_t t0, t1, stop_at;
    float step_ms = 0.0f;
    size_t act_elems;
    int l;

    if (argc < 2) {
        fprintf(stderr, "usage: %s KERNELS.cubin [seconds=10] [hidden=4096] [batch=4096] [layers=4]\n",
                argv[0]);
        return 2;
    }
    memset(&m, 0, sizeof m);
    seconds = arg_double(argc, argv, 2, 10.0);
    m.hidden = (int)arg_long(argc, argv, 3, 4096);
    m.batch = (int)arg_long(argc, argv, 4, 4096);
    m.layers = (int)arg_long(argc, argv, 5, 4);
    if (m.layers > MAX_LAYERS || m.hidden % 128 != 0 || m.batch % 128 != 0) {
        fprintf(stderr, "hidden and batch must be multiples of 128, layers <= %d\n", MAX_LAYERS);
        return 2;
    }
    flop_step = 2.0 * m.batch * (double)m.hidden * m.hidden * (3.0 * m.layers - 1.0);

    cu_open(&s, 0);
    mod = load_module_file(argv[1]);
    m.g = gemm_kernels_load(mod);
    m.relu_fwd = get_function(mod, "relu_fwd");
    m.relu_bwd = get_function(mod, "relu_bwd");
    m.loss_grad = get_function(mod, "loss_grad");
    m.sgd = get_function(mod, "sgd_update");
    fill = get_function(mod, "fill_bf16");
    gemm_check_all(&m.g);

    CU_CHECK(cuStreamCreate(&m.st, CU_STREAM_NON_BLOCKING));
    act_elems = (size_t)m.batch * m.hidden;
    for (l = 0; l < m.layers; l++) {
        CU_CHECK(cuMemAlloc(&m.w[l], (size_t)m.hidden * m.hidden * 2));
        CU_CHECK(fill_bf16(fill, m.st, m.w[l], (unsigned long long)m.hidden * m.hidden,
                           100u + (unsigned int)l, (float)sqrt(6.0 / m.hidden)));
    }
    for (l = 0; l <= m.layers; l++)
        CU_CHECK(cuMemAlloc(&m.x[l], act_elems * 2));
    CU_CHECK(fill_bf16(fill, m.st, m.x[0], (unsigned long long)act_elems, 5u, 1.0f));
    CU_CHECK(cuMemAlloc(&m.dw, (size_t)m.hidden * m.hidden * 4));
    CU_CHECK(cuMemAlloc(&m.z, act_elems * 4));
    CU_CHECK(cuMemAlloc(&m.dz, act_elems * 2));
    for (l = 0; l < DEPTH; l++)
        CU_CHECK(cuEventCreate(&ev[l], CU_EVENT_DISABLE_TIMING));
    CU_CHECK(cuEventCreate(&e0, CU_EVENT_DEFAULT));
    CU_CHECK(cuEventCreate(&e1, CU_EVENT_DEFAULT));

    CU_CHECK(train_step(&m));
    CU_CHECK(cuEventRecord(e0, m.st));
    CU_CHECK(train_step(&m));
    CU_CHECK(cuEventRecord(e1, m.st));
    CU_CHECK(cuStreamSynchronize(m.st));
    CU_CHECK(cuEventElapsedTime(&step_ms, e0, e1));
    fprintf(stderr, "warm-up step (%d layers of %d, batch %d): %.3f ms, %.1f TFLOP/s\n", m.layers,
            m.hidden, m.batch, step_ms, flop_step / (step_ms * 1e-3) / 1e12);

    coloc_barrier("be_train");

    t0 = now_ns();
    stop_at = t0 + (uint64_t)(seconds * 1e9);
    while (now_ns() < stop_at) {
        int slot = (int)(steps % DEPTH);
        if (steps >= DEPTH)
            CU_CHECK(cuEventSynchronize(ev[slot]));
        CU_CHECK(train_step(&m));
        CU_CHECK(cuEventRecord(ev[slot], m.st));
        steps++;
    }
    CU_CHECK(cuStreamSynchronize(m.st));
    t1 = now_ns();

    printf("{");
    json_preamble(stdout, "be_train", &s);
    printf(",\"hidden\":%d,\"batch\":%d,\"layers\":%d,\"gemms_per_step\":%d,\"check\":\"pass\"",
           m.hidden, m.batch, m.layers, 3 * m.layers - 1);
    printf(",\"warmup_step_ms\":%.3f,\"warmup_tflops\":%.2f", step_ms,
           step_ms > 0 ? flop_step / (step_ms * 1e-3) / 1e12 : 0.0);
    printf(",\"seconds_planned\":%.3f,\"steps\":%ld,\"seconds\":%.3f", seconds, steps,
           (double)(t1 - t0) / 1e9);
    printf(",\"steps_per_s\":%.3f,\"tflops\":%.2f}\n", (double)steps / ((double)(t1 - t0) / 1e9),
           flop_step * (double)steps / ((double)(t1 - t0) / 1e9) / 1e12);
    fflush(stdout);

    for (l = 0; l < m.layers; l++)
        cuMemFree(m.w[l]);
    cu_close(&s);
    return 0;
}
