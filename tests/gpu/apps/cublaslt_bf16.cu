// cublasLtMatmul with bf16 inputs, fp32 compute and fp32 output (D = A*B + C), the
// algorithm picked by cublasLtMatmulAlgoGetHeuristic. Inputs are small integers (exact in
// bf16), so the result is exact and checked against a host reference.
// Build: nvcc -o cublaslt_bf16 cublaslt_bf16.cu -lcublas -lcublasLt
#include <cublasLt.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "apps_common.h"

#define CB(call)                                                                         \
    do {                                                                                 \
        cublasStatus_t s_ = (call);                                                      \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                               \
            fprintf(stderr, "FAIL %s:%d %s: cublas status %d\n", __FILE__, __LINE__,     \
                    #call, (int)s_);                                                     \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

// bf16 is the top half of an fp32; exact for the small integers used here.
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

int main() {
    const int m = 256, n = 192, k = 320; // column-major A m x k, B k x n, C/D m x n
    std::vector<float> af((size_t)m * k), bf((size_t)k * n), c((size_t)m * n), d((size_t)m * n),
        ref((size_t)m * n);
    std::vector<uint16_t> a(af.size()), b(bf.size());
    for (size_t i = 0; i < af.size(); i++) af[i] = (float)((int)((i * 5) % 7) - 3);
    for (size_t i = 0; i < bf.size(); i++) bf[i] = (float)((int)((i * 3) % 5) - 2);
    for (size_t i = 0; i < c.size(); i++) c[i] = (float)((int)(i % 9) - 4);
    for (size_t i = 0; i < a.size(); i++) a[i] = to_bf16(af[i]);
    for (size_t i = 0; i < b.size(); i++) b[i] = to_bf16(bf[i]);
    for (int col = 0; col < n; col++)
        for (int row = 0; row < m; row++) {
            double s = 0;
            for (int p = 0; p < k; p++) s += (double)af[(size_t)p * m + row] * bf[(size_t)col * k + p];
            ref[(size_t)col * m + row] = (float)(s + c[(size_t)col * m + row]);
        }

    void *da, *db, *dc, *dd, *ws;
    const size_t ws_size = 32u << 20;
    CK(cudaMalloc(&da, a.size() * 2));
    report_libcuda();
    CK(cudaMalloc(&db, b.size() * 2));
    CK(cudaMalloc(&dc, c.size() * 4));
    CK(cudaMalloc(&dd, d.size() * 4));
    CK(cudaMalloc(&ws, ws_size));
    CK(cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dc, c.data(), c.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemset(dd, 0, d.size() * 4));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));

    cublasLtHandle_t lt;
    CB(cublasLtCreate(&lt));
    cublasLtMatmulDesc_t op;
    CB(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t tn = CUBLAS_OP_N;
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tn, sizeof tn));
    CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tn, sizeof tn));
    cublasLtMatrixLayout_t la, lb, lc, ld;
    CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, m, k, m));
    CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, n, k));
    CB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, m, n, m));
    CB(cublasLtMatrixLayoutCreate(&ld, CUDA_R_32F, m, n, m));
    cublasLtMatmulPreference_t pref;
    CB(cublasLtMatmulPreferenceCreate(&pref));
    CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &ws_size, sizeof ws_size));
    cublasLtMatmulHeuristicResult_t heur[4];
    int found = 0;
    CB(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, ld, pref, 4, heur, &found));
    if (found < 1) {
        printf("FAIL no cublasLt algorithm for bf16 x bf16 -> fp32\n");
        return 1;
    }
    const float alpha = 1.0f, beta = 1.0f;
    for (int rep = 0; rep < 2; rep++) // the same D twice: idempotent (D = A*B + C)
        CB(cublasLtMatmul(lt, op, &alpha, da, la, db, lb, &beta, dc, lc, dd, ld, &heur[0].algo, ws,
                          ws_size, st));
    CK(cudaMemcpyAsync(d.data(), dd, d.size() * 4, cudaMemcpyDeviceToHost, st));
    CK(cudaStreamSynchronize(st));

    double sum = 0, weighted = 0, maxerr = 0;
    for (size_t i = 0; i < d.size(); i++) {
        sum += d[i];
        weighted += (double)d[i] * (double)(i % 97);
        double e = d[i] > ref[i] ? d[i] - ref[i] : ref[i] - d[i];
        if (e > maxerr) maxerr = e;
    }
    printf("cublasLtMatmul bf16 %dx%dx%d -> fp32\n", m, n, k);
    printf("checksum %.1f weighted %.1f\n", sum, weighted);
    printf("max error %.6e\n", maxerr);
    CB(cublasLtMatmulPreferenceDestroy(pref));
    CB(cublasLtMatrixLayoutDestroy(la));
    CB(cublasLtMatrixLayoutDestroy(lb));
    CB(cublasLtMatrixLayoutDestroy(lc));
    CB(cublasLtMatrixLayoutDestroy(ld));
    CB(cublasLtMatmulDescDestroy(op));
    CB(cublasLtDestroy(lt));
    CK(cudaStreamDestroy(st));
    CK(cudaFree(da));
    CK(cudaFree(db));
    CK(cudaFree(dc));
    CK(cudaFree(dd));
    CK(cudaFree(ws));
    if (maxerr != 0.0) {
        printf("FAIL result differs from the host reference\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
