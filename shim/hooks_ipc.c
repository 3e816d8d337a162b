/* IPC: cuIpcGetMemHandle / cuIpcOpenMemHandle(_v2) / cuIpcCloseMemHandle. The driver's handle names
 * a whole driver allocation, which for a pooled block is its segment, so the engine (manager/engine/ipc.c)
 * decides what to export and how to open it; these hooks only hand it the driver's entry points
 * and pass through what is not gpumem's. */
#include <string.h>

#include "gm_ipc.h"
#include "shim.h"

/* ------------------------------------------------------------------ the driver, for the engine */

static int drv_get_handle(unsigned char out[GM_IPC_HANDLE_SIZE], uintptr_t ptr)
{
    CUipcMemHandle h;
    CUresult r = shim_real_cuIpcGetMemHandle(&h, (CUdeviceptr)ptr);
    if (r == CUDA_SUCCESS) memcpy(out, &h, sizeof h);
    return (int)r;
}

static int open_with(CUresult (*real)(CUdeviceptr *, CUipcMemHandle, unsigned int), uintptr_t *out,
                     const unsigned char handle[GM_IPC_HANDLE_SIZE], unsigned flags)
{
    CUipcMemHandle h;
    memcpy(&h, handle, sizeof h);
    CUdeviceptr p = 0;
    CUresult r = real(&p, h, flags);
    *out = (uintptr_t)p;
    return (int)r;
}

static int drv_open_v2(uintptr_t *out, const unsigned char h[GM_IPC_HANDLE_SIZE], unsigned flags)
{
    return open_with(shim_real_cuIpcOpenMemHandle_v2, out, h, flags);
}

static int drv_open_v1(uintptr_t *out, const unsigned char h[GM_IPC_HANDLE_SIZE], unsigned flags)
{
    return open_with(shim_real_cuIpcOpenMemHandle, out, h, flags);
}

static int drv_close(uintptr_t ptr)
{
    return (int)shim_real_cuIpcCloseMemHandle((CUdeviceptr)ptr);
}

static int drv_range(uintptr_t ptr, uintptr_t *base, size_t *size)
{
    CUdeviceptr b = 0;
    if (!shim_real_cuMemGetAddressRange_v2) return CUDA_ERROR_NOT_SUPPORTED;
    CUresult r = shim_real_cuMemGetAddressRange_v2(&b, size, (CUdeviceptr)ptr);
    *base = (uintptr_t)b;
    return (int)r;
}

/* The open of the ABI the program called is the one the engine uses. */
static const gm_ipc_driver drv_v2 = {drv_get_handle, drv_open_v2, drv_close, drv_range};
static const gm_ipc_driver drv_v1 = {drv_get_handle, drv_open_v1, drv_close, drv_range};

/* ------------------------------------------------------------------ hooks */

CUresult cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr dptr)
{
    SHIM_REQUIRE_REAL(cuIpcGetMemHandle);
    if (!shim_active() || !handle) return shim_real_cuIpcGetMemHandle(handle, dptr);
    SHIM_TRACE("cuIpcGetMemHandle ptr=%#llx", (unsigned long long)dptr);
    unsigned char out[GM_IPC_HANDLE_SIZE];
    gm_answer a = gm_ipc_export((uintptr_t)dptr, &drv_v2, out);
    if (a.owner == GM_NOT_OURS) return shim_real_cuIpcGetMemHandle(handle, dptr);
    if (a.status == CUDA_SUCCESS) memcpy(handle, out, sizeof out);
    return (CUresult)a.status;
}

static CUresult ipc_open(const gm_ipc_driver *drv, CUresult (*real)(CUdeviceptr *, CUipcMemHandle, unsigned int),
                         CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int flags)
{
    uintptr_t ctx = 0;
    int device;
    if (!shim_active() || !pdptr || gm_mgr.backend->current(&ctx, &device) != CUDA_SUCCESS)
        return real(pdptr, handle, flags); /* the driver's own answer (no context, no pointer) */
    SHIM_TRACE("cuIpcOpenMemHandle flags=%u", flags);
    uintptr_t p = 0;
    int rc = gm_ipc_open(ctx, (const unsigned char *)handle.reserved, flags, drv, &p);
    if (rc == CUDA_SUCCESS) *pdptr = (CUdeviceptr)p;
    return (CUresult)rc;
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuIpcOpenMemHandle_v2);
    return ipc_open(&drv_v2, shim_real_cuIpcOpenMemHandle_v2, pdptr, handle, flags);
}

CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int flags)
{
    SHIM_REQUIRE_REAL(cuIpcOpenMemHandle);
    return ipc_open(&drv_v1, shim_real_cuIpcOpenMemHandle, pdptr, handle, flags);
}

CUresult cuIpcCloseMemHandle(CUdeviceptr dptr)
{
    SHIM_REQUIRE_REAL(cuIpcCloseMemHandle);
    if (!shim_active()) return shim_real_cuIpcCloseMemHandle(dptr);
    SHIM_TRACE("cuIpcCloseMemHandle ptr=%#llx", (unsigned long long)dptr);
    gm_answer a = gm_ipc_close((uintptr_t)dptr, &drv_v2);
    if (a.owner == GM_NOT_OURS) return shim_real_cuIpcCloseMemHandle(dptr);
    return (CUresult)a.status;
}
