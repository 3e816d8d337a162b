/* The fake NVML (tests/fakecuda/fake_nvml.c, built as libnvidia-ml.so.1 next to the fake
 * libcuda.so.1): what it answers, so that tests can tell its figures from gpumem's.
 *
 * Devices are the FAKECUDA_DEVICES physical fake devices in physical order (NVML ignores
 * CUDA_VISIBLE_DEVICES, so this ignores FAKECUDA_VISIBLE), each of FAKECUDA_MEM bytes, both read
 * at nvmlInit. UUIDs are fakecuda_uuid_of_physical() as text; FAKENVML_MIG=1 makes every handle
 * answer a "MIG-" UUID instead, as a MIG device handle would. The layouts are shim/nvml_abi.h's. */
#ifndef FAKENVML_H
#define FAKENVML_H

#include <stdio.h>

#include "fakecuda.h"

#define FAKENVML_MiB (1ull << 20)
/* The driver's reserve, and its "used" in nvmlMemory_v2_t (v1's used is the sum of both). */
#define FAKENVML_RESERVED (5 * FAKENVML_MiB)
#define FAKENVML_USED_V2(physical) ((32ull + (unsigned long long)(physical)) * FAKENVML_MiB)
#define FAKENVML_USED_V1(physical) (FAKENVML_RESERVED + FAKENVML_USED_V2(physical))
/* The driver's compute process list of every device: FAKENVML_PROCS processes, pid
 * FAKENVML_PID(physical, i) using FAKENVML_PROC_BYTES(i) (pids above any real pid_max). */
#define FAKENVML_PROCS 2u
#define FAKENVML_PID(physical, i) (7000000u + 100u * (unsigned)(physical) + (unsigned)(i))
#define FAKENVML_PROC_BYTES(i) ((3ull + (unsigned long long)(i)) * FAKENVML_MiB)

/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (or "MIG-..."): NVML's text of the 16 bytes. */
static inline void fakenvml_uuid_text(int physical, const char *prefix, char out[48])
{
    unsigned char u[16];
    fakecuda_uuid_of_physical(physical, u);
    snprintf(out, 48, "%s-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", prefix,
             u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14],
             u[15]);
}

#endif
