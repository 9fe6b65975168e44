// CUDA graph by stream capture on a non-default stream (memset, kernels, DtoD and DtoH
// copies), instantiated once and replayed 10 times, then 10 more times back to back.
// The accumulator lives outside the graph's memset, so each replay's output differs.
// Build: nvcc -o graph_replay graph_replay.cu
#include <cstdio>
#include <cstdlib>
#include "apps_common.h"


__global__ void add_index(int *a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += i % 100;
}
__global__ void scale(int *a, int s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] *= s;
}
__global__ void accumulate(int *acc, const int *b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += b[i] + 1;
}

static long long sum_of(const int *h, int n) {
    long long s = 0;
    for (int i = 0; i < n; i++) s += (long long)h[i] * (i % 13 + 1);
    return s;
}

int main() {
    const int n = 1 << 16;
    const size_t bytes = n * sizeof(int);
    int *a, *b, *acc, *h;
    CK(cudaMalloc(&a, bytes));
    report_libcuda();
    CK(cudaMalloc(&b, bytes));
    CK(cudaMalloc(&acc, bytes));
    CK(cudaMallocHost(&h, bytes));
    CK(cudaMemset(acc, 0, bytes));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const int blocks = (n + 255) / 256;

    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    CK(cudaStreamIsCapturing(s, &cs));
    printf("capturing %s\n", cs == cudaStreamCaptureStatusActive ? "yes" : "no");
    CK(cudaMemsetAsync(a, 0, bytes, s));
    add_index<<<blocks, 256, 0, s>>>(a, n);
    CK(cudaGetLastError());
    scale<<<blocks, 256, 0, s>>>(a, 3, n);
    CK(cudaGetLastError());
    CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s));
    accumulate<<<blocks, 256, 0, s>>>(acc, b, n);
    CK(cudaGetLastError());
    CK(cudaMemcpyAsync(h, acc, bytes, cudaMemcpyDeviceToHost, s));
    cudaGraph_t graph;
    CK(cudaStreamEndCapture(s, &graph));
    CK(cudaStreamIsCapturing(s, &cs));
    printf("capturing after end %s\n", cs == cudaStreamCaptureStatusActive ? "yes" : "no");
    size_t nodes = 0;
    CK(cudaGraphGetNodes(graph, nullptr, &nodes));
    printf("graph nodes %zu\n", nodes);

    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, graph, 0));
    bool ok = true;
    for (int r = 1; r <= 10; r++) {
        for (int i = 0; i < n; i++) h[i] = -7;
        CK(cudaGraphLaunch(exec, s));
        CK(cudaStreamSynchronize(s));
        // After r replays: acc[i] = r * (3 * (i % 100) + 1).
        long long expect = 0;
        for (int i = 0; i < n; i++) expect += (long long)r * (3 * (i % 100) + 1) * (i % 13 + 1);
        long long got = sum_of(h, n);
        if (got != expect) ok = false;
        printf("replay %d checksum %lld h[1] %d h[99] %d\n", r, got, h[1], h[99]);
    }
    for (int r = 0; r < 10; r++) CK(cudaGraphLaunch(exec, s));
    CK(cudaStreamSynchronize(s));
    long long expect20 = 0;
    for (int i = 0; i < n; i++) expect20 += 20LL * (3 * (i % 100) + 1) * (i % 13 + 1);
    long long got20 = sum_of(h, n);
    if (got20 != expect20) ok = false;
    printf("after 20 replays checksum %lld\n", got20);

    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(s));
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(acc));
    CK(cudaFreeHost(h));
    if (!ok) {
        printf("FAIL replay results differ from the expected values\n");
        return 1;
    }
    printf("PASS\n");
    return 0;
}
