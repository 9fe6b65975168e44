// Copy/compute overlap with two streams and events: pinned host buffers, per-stream chunks
// of HtoD copy + kernel + DtoH copy, then a cross-stream dependency through
// cudaStreamWaitEvent. Prints data checksums (integer-valued, exact) and "events ok"; the
// elapsed time is checked, never printed. Build: nvcc -o streams_overlap streams_overlap.cu
#include <cstdio>
#include <cstdlib>
#include "apps_common.h"


__global__ void affine(const float *x, float *y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.0f * x[i] + 1.0f;
}

__global__ void add_shifted(const float *src, float *dst, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i] + src[(i + 1) % n];
}

int main() {
    const int nstreams = 2, nchunks = 8;
    const int n = 1 << 22; // 4M floats, 16 MiB
    const int chunk = n / nchunks;
    const size_t bytes = (size_t)n * sizeof(float);
    float *h_in, *h_out, *h_out2;
    CK(cudaMallocHost(&h_in, bytes));
    report_libcuda();
    CK(cudaMallocHost(&h_out, bytes));
    CK(cudaMallocHost(&h_out2, bytes));
    for (int i = 0; i < n; i++) {
        h_in[i] = (float)(i % 1000);
        h_out[i] = -1.0f;
        h_out2[i] = -1.0f;
    }
    float *d_in, *d_out, *d_out2;
    CK(cudaMalloc(&d_in, bytes));
    CK(cudaMalloc(&d_out, bytes));
    CK(cudaMalloc(&d_out2, bytes));
    cudaStream_t s[nstreams];
    for (int i = 0; i < nstreams; i++) CK(cudaStreamCreateWithFlags(&s[i], cudaStreamNonBlocking));
    cudaEvent_t start, stop, fork, join, produced;
    CK(cudaEventCreate(&start));
    CK(cudaEventCreate(&stop));
    CK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&produced, cudaEventDisableTiming));

    // Phase 1: chunks alternate between the streams; stream 1 starts after stream 0's start.
    CK(cudaEventRecord(start, s[0]));
    CK(cudaEventRecord(fork, s[0]));
    CK(cudaStreamWaitEvent(s[1], fork, 0));
    for (int c = 0; c < nchunks; c++) {
        cudaStream_t st = s[c % nstreams];
        size_t off = (size_t)c * chunk;
        CK(cudaMemcpyAsync(d_in + off, h_in + off, chunk * sizeof(float), cudaMemcpyHostToDevice, st));
        affine<<<(chunk + 255) / 256, 256, 0, st>>>(d_in + off, d_out + off, chunk);
        CK(cudaGetLastError());
        CK(cudaMemcpyAsync(h_out + off, d_out + off, chunk * sizeof(float), cudaMemcpyDeviceToHost, st));
    }
    CK(cudaEventRecord(join, s[1]));
    CK(cudaStreamWaitEvent(s[0], join, 0));
    CK(cudaEventRecord(stop, s[0]));
    CK(cudaEventSynchronize(stop));
    float ms = -1.0f;
    CK(cudaEventElapsedTime(&ms, start, stop));
    bool events_ok = ms >= 0.0f && cudaEventQuery(stop) == cudaSuccess &&
                     cudaEventQuery(join) == cudaSuccess && cudaStreamQuery(s[0]) == cudaSuccess &&
                     cudaStreamQuery(s[1]) == cudaSuccess;

    // Phase 2: stream 1 consumes what stream 0 produced, ordered by an event only.
    CK(cudaMemsetAsync(d_out2, 0, bytes, s[1]));
    affine<<<(n + 255) / 256, 256, 0, s[0]>>>(d_in, d_out, n);
    CK(cudaGetLastError());
    CK(cudaEventRecord(produced, s[0]));
    CK(cudaStreamWaitEvent(s[1], produced, 0));
    add_shifted<<<(n + 255) / 256, 256, 0, s[1]>>>(d_out, d_out2, n);
    CK(cudaGetLastError());
    CK(cudaMemcpyAsync(h_out2, d_out2, bytes, cudaMemcpyDeviceToHost, s[1]));
    CK(cudaStreamSynchronize(s[1]));
    CK(cudaStreamSynchronize(s[0]));
    CK(cudaDeviceSynchronize());

    double sum1 = 0, sum2 = 0;
    long bad = 0;
    for (int i = 0; i < n; i++) {
        float e1 = 2.0f * (float)(i % 1000) + 1.0f;
        float e2 = e1 + 2.0f * (float)(((i + 1) % n) % 1000) + 1.0f;
        if (h_out[i] != e1 || h_out2[i] != e2) bad++;
        sum1 += h_out[i];
        sum2 += (double)h_out2[i] * (i % 7);
    }
    printf("streams %d chunks %d n %d\n", nstreams, nchunks, n);
    printf("phase1 checksum %.1f\n", sum1);
    printf("phase2 checksum %.1f\n", sum2);
    printf("mismatches %ld\n", bad);
    printf("%s\n", events_ok ? "events ok" : "events FAILED");

    for (int i = 0; i < nstreams; i++) CK(cudaStreamDestroy(s[i]));
    CK(cudaEventDestroy(start));
    CK(cudaEventDestroy(stop));
    CK(cudaEventDestroy(fork));
    CK(cudaEventDestroy(join));
    CK(cudaEventDestroy(produced));
    CK(cudaFree(d_in));
    CK(cudaFree(d_out));
    CK(cudaFree(d_out2));
    CK(cudaFreeHost(h_in));
    CK(cudaFreeHost(h_out));
    CK(cudaFreeHost(h_out2));
    if (bad != 0 || !events_ok) {
        printf("FAIL\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
