// array_check: CUDA arrays under the shim. Makes up to 40 arrays of 16 MiB of texels each,
// alternating cudaMallocArray (2048 x 2048 float) and cudaMalloc3DArray (256 x 256 x 64 float),
// until the runtime refuses one, then a mipmapped array, and frees them all. Prints
//   arrays_made=N          arrays made before the first refusal (40: none refused)
//   first_error=NAME       the refusal's cudaError name, or none
//   texel_bytes=B          their texels together (16 MiB each)
//   driver_bytes=B         what cudaMemGetInfo's free memory dropped by for them (the driver's
//                          padding included; information: under the shim it reads gpumem's answer)
//   requirements_plain=NAME  cudaArrayGetMemoryRequirements of a plain array (the driver answers it
//                          only for arrays made with cudaArrayDeferredMapping)
//   within_limit=0|1       with --limit BYTES: texel_bytes <= BYTES
//   mipmapped=OK           a 4-level mipmapped array made and freed (only when nothing was refused)
// and "array_check: OK" when every call that should succeed did. Build: nvcc -O2 -o array_check array_check.cu
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#define MAX_ARRAYS 40

static int failed;

static void check(cudaError_t e, const char *what)
{
    if (e != cudaSuccess) {
        printf("%s: %s\n", what, cudaGetErrorName(e));
        failed = 1;
    }
}

int main(int argc, char **argv)
{
    unsigned long long limit = 0;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--limit") == 0) limit = strtoull(argv[i + 1], NULL, 10);
    check(cudaFree(0), "cudaFree(0)");
    cudaChannelFormatDesc f = cudaCreateChannelDesc<float>();
    cudaArray_t arrays[MAX_ARRAYS];
    int made = 0;
    cudaError_t first = cudaSuccess;
    unsigned long long driver_bytes = 0;
    for (; made < MAX_ARRAYS; made++) {
        size_t free_before = 0, free_after = 0, total = 0;
        check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
        cudaError_t e = made % 2 ? cudaMalloc3DArray(&arrays[made], &f, make_cudaExtent(256, 256, 64))
                                 : cudaMallocArray(&arrays[made], &f, 2048, 2048);
        if (e != cudaSuccess) {
            first = e;
            (void)cudaGetLastError(); /* the refusal is not sticky */
            break;
        }
        check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
        if (free_before > free_after) driver_bytes += free_before - free_after;
    }
    unsigned long long texel_bytes = (unsigned long long)made << 24;
    cudaArrayMemoryRequirements req;
    cudaError_t plain = made ? cudaArrayGetMemoryRequirements(&req, arrays[0], 0) : cudaSuccess;
    (void)cudaGetLastError();
    printf("arrays_made=%d\nfirst_error=%s\ntexel_bytes=%llu\ndriver_bytes=%llu\nrequirements_plain=%s\n",
           made, first == cudaSuccess ? "none" : cudaGetErrorName(first), texel_bytes, driver_bytes,
           cudaGetErrorName(plain));
    if (limit) printf("within_limit=%d\n", texel_bytes <= limit);
    for (int i = 0; i < made; i++) check(cudaFreeArray(arrays[i]), "cudaFreeArray");
    if (first == cudaSuccess) {
        cudaMipmappedArray_t m;
        check(cudaMallocMipmappedArray(&m, &f, make_cudaExtent(1024, 1024, 0), 4), "cudaMallocMipmappedArray");
        check(cudaFreeMipmappedArray(m), "cudaFreeMipmappedArray");
        printf("mipmapped=OK\n");
    }
    printf("array_check: %s\n", failed ? "FAIL" : "OK");
    return failed;
}
