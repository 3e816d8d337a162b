/* What the driver probes (identity_probe.c, semantics_probe.c) share: error names, a check that
 * stops the probe, the primary context of device 0, and handles as hex for argv. */
#ifndef PROBE_COMMON_H
#define PROBE_COMMON_H

#include <cuda.h>
#include <stdio.h>
#include <stdlib.h>

static inline const char *err(CUresult r)
{
    const char *s = NULL;
    cuGetErrorName(r, &s);
    return s ? s : "?";
}

#define CK(x) \
    do { \
        CUresult r_ = (x); \
        if (r_ != CUDA_SUCCESS) { \
            printf("FATAL %s: %s\n", #x, err(r_)); \
            exit(1); \
        } \
    } while (0)

static inline void ctx_init(void)
{
    CUcontext ctx;
    CUdevice dev;
    CK(cuInit(0));
    CK(cuDeviceGet(&dev, 0));
    CK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CK(cuCtxSetCurrent(ctx));
}

static inline void hex(const void *p, size_t n, char *out)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", b[i]);
}

static inline void unhex(const char *s, void *p, size_t n)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++) sscanf(s + 2 * i, "%2hhx", &b[i]);
}

#endif
