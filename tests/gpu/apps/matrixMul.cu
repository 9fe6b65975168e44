// Tiled matrix multiply with shared memory (512x512, 16x16 tiles), checked against a host
// reference. Inputs are small integers, so every product and sum is exact in fp32 and the
// output is the same on any correct device. Build: nvcc -o matrixMul matrixMul.cu
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "apps_common.h"


#define TILE 16

__global__ void matmul_tiled(const float *A, const float *B, float *C, int n) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (int t = 0; t < n / TILE; t++) {
        as[threadIdx.y][threadIdx.x] = A[row * n + t * TILE + threadIdx.x];
        bs[threadIdx.y][threadIdx.x] = B[(t * TILE + threadIdx.y) * n + col];
        __syncthreads();
        for (int k = 0; k < TILE; k++) acc += as[threadIdx.y][k] * bs[k][threadIdx.x];
        __syncthreads();
    }
    C[row * n + col] = acc;
}

int main() {
    const int n = 512;
    const size_t bytes = (size_t)n * n * sizeof(float);
    std::vector<float> a(n * n), b(n * n), c(n * n), ref(n * n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            a[i * n + j] = (float)((i * 7 + j * 3) % 17 - 8);
            b[i * n + j] = (float)((i * 5 + j * 11) % 13 - 6);
        }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += (double)a[i * n + k] * b[k * n + j];
            ref[i * n + j] = (float)s;
        }

    float *da, *db, *dc;
    CK(cudaMalloc(&da, bytes));
    report_libcuda();
    CK(cudaMalloc(&db, bytes));
    CK(cudaMalloc(&dc, bytes));
    CK(cudaMemcpy(da, a.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, b.data(), bytes, cudaMemcpyHostToDevice));
    CK(cudaMemset(dc, 0, bytes));
    dim3 block(TILE, TILE), grid(n / TILE, n / TILE);
    for (int rep = 0; rep < 3; rep++) {
        matmul_tiled<<<grid, block>>>(da, db, dc, n);
        CK(cudaGetLastError());
    }
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(c.data(), dc, bytes, cudaMemcpyDeviceToHost));

    double sum = 0, weighted = 0, maxerr = 0;
    for (int i = 0; i < n * n; i++) {
        sum += c[i];
        weighted += (double)c[i] * (i % 101);
        double e = fabs((double)c[i] - ref[i]);
        if (e > maxerr) maxerr = e;
    }
    printf("matrixMul %dx%d tile %d\n", n, n, TILE);
    printf("checksum %.1f weighted %.1f\n", sum, weighted);
    printf("c[0] %.1f c[last] %.1f\n", c[0], c[n * n - 1]);
    printf("max error %.6e\n", maxerr);
    CK(cudaFree(da));
    CK(cudaFree(db));
    CK(cudaFree(dc));
    if (maxerr != 0.0) {
        printf("FAIL result differs from the host reference\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
