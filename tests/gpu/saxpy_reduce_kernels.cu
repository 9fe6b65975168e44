// Kernels for saxpy_reduce.c. gpu-check.sh compiles this to PTX on the GPU machine:
//   nvcc -ptx -arch=sm_90 saxpy_reduce_kernels.cu -o saxpy_reduce.ptx
// saxpy_reduce_ptx.h embeds the same PTX (generated with nvcc 13.0.88) as a fallback.
// Both kernels are extern "C" so their names are not mangled.

// y[i] = a * x[i] + y[i] for i < n.
extern "C" __global__ void saxpy(int n, float a, const float *__restrict__ x,
                                 float *__restrict__ y)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] = a * x[i] + y[i];
}

// out[blockIdx.x] = sum of the in[] elements this block visits (grid-stride loop),
// summed through a shared-memory tree. blockDim.x must be a power of two <= 256.
extern "C" __global__ void reduce_sum(const float *__restrict__ in, float *__restrict__ out,
                                      int n)
{
    __shared__ float partial[256];
    float acc = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        acc += in[i];
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride)
            partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        out[blockIdx.x] = partial[0];
}
