// cudaDeviceReset under the shim: the leak check point must fire (cudart 13 reaches the v1
// cuDevicePrimaryCtxReset), and memory allocated after the reset must be usable.
#include <cstdio>
#include <cuda_runtime.h>

__global__ void fill(int *p, int v, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) p[i] = v; }

int main()
{
    int *a = nullptr, *b = nullptr;
    if (cudaMalloc(&a, 3000) != cudaSuccess) return 1;  // leaked: reported at the reset
    fprintf(stderr, "MARK before-reset\n");
    if (cudaDeviceReset() != cudaSuccess) return 2;
    fprintf(stderr, "MARK after-reset\n");
    const int n = 1 << 20;
    if (cudaMalloc(&b, n * sizeof(int)) != cudaSuccess) return 3;
    fill<<<(n + 255) / 256, 256>>>(b, 7, n);
    int host[4] = {0};
    if (cudaMemcpy(host, b + n - 4, sizeof host, cudaMemcpyDeviceToHost) != cudaSuccess) return 4;
    cudaFree(b);
    printf("reset_check: after reset value=%d %s\n", host[3], host[3] == 7 ? "OK" : "BAD");
    return host[3] == 7 ? 0 : 5;
}
