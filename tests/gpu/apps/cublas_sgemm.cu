// cublasSgemm on 256x256 column-major matrices of small integers (exact in fp32), checked
// against a host reference. Build: nvcc -o cublas_sgemm cublas_sgemm.cu -lcublas -lcublasLt
#include <cublas_v2.h>
#include <cstdio>
#include <cstdlib>
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

int main() {
    const int m = 256, n = 256, k = 256;
    std::vector<float> a((size_t)m * k), b((size_t)k * n), c((size_t)m * n), ref((size_t)m * n);
    for (size_t i = 0; i < a.size(); i++) a[i] = (float)((int)(i % 7) - 3);
    for (size_t i = 0; i < b.size(); i++) b[i] = (float)((int)((i * 3) % 5) - 2);
    for (size_t i = 0; i < c.size(); i++) c[i] = (float)((int)(i % 3) - 1);
    const float alpha = 2.0f, beta = 1.0f;
    for (int col = 0; col < n; col++)
        for (int row = 0; row < m; row++) {
            double s = 0;
            for (int p = 0; p < k; p++) s += (double)a[(size_t)p * m + row] * b[(size_t)col * k + p];
            ref[(size_t)col * m + row] = (float)(alpha * s + beta * c[(size_t)col * m + row]);
        }

    float *da, *db, *dc;
    CK(cudaMalloc(&da, a.size() * sizeof(float)));
    report_libcuda();
    CK(cudaMalloc(&db, b.size() * sizeof(float)));
    CK(cudaMalloc(&dc, c.size() * sizeof(float)));
    cublasHandle_t h;
    CB(cublasCreate(&h));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    CB(cublasSetStream(h, st));
    CB(cublasSetMatrix(m, k, sizeof(float), a.data(), m, da, m));
    CB(cublasSetMatrix(k, n, sizeof(float), b.data(), k, db, k));
    CB(cublasSetMatrix(m, n, sizeof(float), c.data(), m, dc, m));
    CB(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, da, m, db, k, &beta, dc, m));
    CK(cudaStreamSynchronize(st));
    CB(cublasGetMatrix(m, n, sizeof(float), dc, m, c.data(), m));

    // A second call with the transposes, on the same handle: C2 = A^T * B^T (m = n = k).
    float *dc2;
    CK(cudaMalloc(&dc2, c.size() * sizeof(float)));
    const float one = 1.0f, zero = 0.0f;
    CB(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_T, m, n, k, &one, da, k, db, n, &zero, dc2, m));
    std::vector<float> c2(c.size());
    CK(cudaMemcpyAsync(c2.data(), dc2, c2.size() * sizeof(float), cudaMemcpyDeviceToHost, st));
    CK(cudaStreamSynchronize(st));

    double sum = 0, weighted = 0, sum2 = 0, maxerr = 0;
    for (size_t i = 0; i < c.size(); i++) {
        sum += c[i];
        weighted += (double)c[i] * (double)(i % 97);
        sum2 += (double)c2[i] * (double)(i % 89);
        double e = c[i] > ref[i] ? c[i] - ref[i] : ref[i] - c[i];
        if (e > maxerr) maxerr = e;
    }
    printf("cublasSgemm %dx%dx%d\n", m, n, k);
    printf("checksum %.1f weighted %.1f\n", sum, weighted);
    printf("transposed checksum %.1f\n", sum2);
    printf("max error %.6e\n", maxerr);
    CB(cublasDestroy(h));
    CK(cudaStreamDestroy(st));
    CK(cudaFree(da));
    CK(cudaFree(db));
    CK(cudaFree(dc));
    CK(cudaFree(dc2));
    if (maxerr != 0.0) {
        printf("FAIL result differs from the host reference\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
