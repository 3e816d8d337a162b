/* api_sanitized_program: an AddressSanitizer-instrumented CUDA program (built with
 * -fsanitize=address, linked with -lcuda) run with the shim preloaded, as a user debugging their
 * own program would. ASan sets up its interceptors while the libraries are initialised, calling
 * dlsym(RTLD_NEXT, ...), which reaches the shim's exported dlsym before anything else ran; the
 * shim must answer that without depending on functions ASan has not set up yet. Not a Criterion
 * program: it exits 0 when everything worked. */
#include <stdio.h>
#include <string.h>

#include <cuda.h>

int main(void)
{
    CUdevice dev;
    CUcontext ctx;
    CUdeviceptr p;
    unsigned char buf[4096], back[4096];
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) ||
        cuCtxSetCurrent(ctx)) {
        fprintf(stderr, "asan_program: no context\n");
        return 1;
    }
    if (cuMemAlloc(&p, sizeof buf) != CUDA_SUCCESS) {
        fprintf(stderr, "asan_program: cuMemAlloc failed\n");
        return 1;
    }
    memset(buf, 0x3A, sizeof buf);
    if (cuMemcpyHtoD(p, buf, sizeof buf) || cuMemcpyDtoH(back, p, sizeof back) ||
        memcmp(buf, back, sizeof buf) != 0 || cuMemFree(p)) {
        fprintf(stderr, "asan_program: data path failed\n");
        return 1;
    }
    puts("asan_program: ok");
    return 0;
}
