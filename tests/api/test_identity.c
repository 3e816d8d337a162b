/* api_identity: the queries that reveal allocation identity (issue 10, part 3), through the real
 * preload path on the fake driver. A pooled block must answer as the driver answers for a separate
 * allocation (measured on the H200: docs/gpu-runs/identity_probe_driver.txt):
 *  - cuMemGetAddressRange: the block within its requested size; its rounding slack and freed pool
 *    memory are CUDA_ERROR_NOT_FOUND;
 *  - cuPointerGetAttribute: CUDA_ERROR_INVALID_VALUE for every attribute outside a live block's
 *    requested size; RANGE_START_ADDR/RANGE_SIZE the block; BUFFER_ID distinct per allocation and new
 *    after free + realloc at the same address; SYNC_MEMOPS the block's own flag;
 *  - cuPointerGetAttributes: a pointer the driver would not know gets CUDA_SUCCESS and defaults;
 *  - cuPointerSetAttribute on freed or slack memory: CUDA_ERROR_INVALID_VALUE;
 *  - cuMemRetainAllocationHandle: CUDA_ERROR_INVALID_VALUE. */
#include "api_test.h"

static const CUpointer_attribute every_attribute[] = {
    CU_POINTER_ATTRIBUTE_CONTEXT, CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
    CU_POINTER_ATTRIBUTE_DEVICE_POINTER, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
    CU_POINTER_ATTRIBUTE_BUFFER_ID, CU_POINTER_ATTRIBUTE_IS_MANAGED,
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
    CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
    CU_POINTER_ATTRIBUTE_MAPPED, CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES,
    CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE, CU_POINTER_ATTRIBUTE_ACCESS_FLAGS,
    CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE,
};
#define NATTR (sizeof every_attribute / sizeof *every_attribute)

static unsigned long long attr_u64(CUpointer_attribute a, CUdeviceptr p)
{
    unsigned long long v = 0;
    OK(cuPointerGetAttribute(&v, a, p));
    return v;
}

static void expect_range(CUdeviceptr p, CUdeviceptr base, size_t size)
{
    CUdeviceptr b = 0;
    size_t s = 0;
    OK(cuMemGetAddressRange(&b, &s, p));
    cr_assert_eq(b, base, "range base of %#llx", (unsigned long long)p);
    cr_assert_eq(s, size, "range size of %#llx: %zu", (unsigned long long)p, s);
}

Test(identity, address_range_ends_at_the_requested_size)
{
    api_start();
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, 5000));
    OK(cuMemAlloc(&b, 1 << 20));
    CUdeviceptr base;
    size_t size;
    expect_range(a, a, 5000);
    expect_range(a + 4999, a, 5000);
    ERR(cuMemGetAddressRange(&base, &size, a + 5000), CUDA_ERROR_NOT_FOUND);
    ERR(cuMemGetAddressRange(&base, &size, a + 5119), CUDA_ERROR_NOT_FOUND);
    expect_range(b + (1 << 20) - 1, b, 1 << 20);
    OK(cuMemFree(b));
    ERR(cuMemGetAddressRange(&base, &size, b), CUDA_ERROR_NOT_FOUND);
}

Test(identity, attributes_of_live_slack_and_freed_memory)
{
    api_start();
    CUdeviceptr a, f;
    OK(cuMemAlloc(&a, 5000));
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, a + 100), a);
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_RANGE_SIZE, a + 4999), 5000);
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_DEVICE_POINTER, a + 100), a + 100, "the driver's answer");
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_MEMORY_TYPE, a) & 0xffffffffu, CU_MEMORYTYPE_DEVICE);
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, a) & 0xffffffffu, 1);
    OK(cuMemAlloc(&f, 4096));
    OK(cuMemFree(f));
    const CUdeviceptr where[] = {a + 5000, a + 5119, f, f + 100};
    for (size_t w = 0; w < sizeof where / sizeof *where; w++)
        for (size_t i = 0; i < NATTR; i++) {
            unsigned long long v = 0;
            cr_assert_eq(cuPointerGetAttribute(&v, every_attribute[i], where[w]), CUDA_ERROR_INVALID_VALUE,
                         "attribute %d at pointer %zu", (int)every_attribute[i], w);
        }
}

Test(identity, buffer_ids_are_per_allocation_and_new_after_reuse)
{
    api_start();
    CUdeviceptr a, b, direct;
    OK(cuMemAlloc(&a, 5000));
    OK(cuMemAlloc(&b, 5000));
    OK(cuMemAllocManaged(&direct, 4096, CU_MEM_ATTACH_GLOBAL)); /* the driver's own allocation */
    unsigned long long ia = attr_u64(CU_POINTER_ATTRIBUTE_BUFFER_ID, a);
    unsigned long long ib = attr_u64(CU_POINTER_ATTRIBUTE_BUFFER_ID, b);
    unsigned long long idrv = attr_u64(CU_POINTER_ATTRIBUTE_BUFFER_ID, direct);
    cr_assert_neq(ia, ib, "two blocks of one segment are two allocations");
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_BUFFER_ID, a + 4000), ia, "interior pointers: the same");
    cr_assert_neq(ia, idrv);
    cr_assert_neq(ib, idrv);
    OK(cuMemFree(a));
    CUdeviceptr a2;
    OK(cuMemAlloc(&a2, 5000));
    cr_assert_eq(a2, a, "the pool reuses the block");
    unsigned long long ia2 = attr_u64(CU_POINTER_ATTRIBUTE_BUFFER_ID, a2);
    cr_assert_neq(ia2, ia, "a new allocation at the same address has a new id");
    cr_assert_neq(ia2, ib);
}

/* Also: pool memory has no allocation handle (cuMemRetainAllocationHandle). */
Test(identity, sync_memops_is_the_block_s_own)
{
    api_start();
    CUdeviceptr a, b;
    OK(cuMemAlloc(&a, 5000));
    OK(cuMemAlloc(&b, 5000));
    unsigned one = 1;
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, a) & 0xffffffffu, 0);
    OK(cuPointerSetAttribute(&one, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, a + 100));
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, a) & 0xffffffffu, 1);
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, b) & 0xffffffffu, 0,
                 "a neighbour of the same segment did not ask for it");
    ERR(cuPointerSetAttribute(&one, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, a + 5000), CUDA_ERROR_INVALID_VALUE);
    OK(cuMemFree(a));
    ERR(cuPointerSetAttribute(&one, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, a), CUDA_ERROR_INVALID_VALUE);
    CUdeviceptr a2;
    OK(cuMemAlloc(&a2, 5000));
    cr_assert_eq(attr_u64(CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, a2) & 0xffffffffu, 0, "a new allocation");
    CUmemGenericAllocationHandle h;
    ERR(cuMemRetainAllocationHandle(&h, (void *)(uintptr_t)a2), CUDA_ERROR_INVALID_VALUE);
    ERR(cuMemRetainAllocationHandle(&h, (void *)(uintptr_t)(a2 + 5000)), CUDA_ERROR_INVALID_VALUE);
}

Test(identity, attributes_call_writes_defaults_outside_live_blocks)
{
    api_start();
    CUdeviceptr a;
    OK(cuMemAlloc(&a, 5000));
    CUpointer_attribute at[] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                CU_POINTER_ATTRIBUTE_BUFFER_ID, CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                CU_POINTER_ATTRIBUTE_CONTEXT, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL};
    CUdeviceptr start = 1;
    size_t size = 1;
    unsigned long long id = 1;
    unsigned type = 1;
    CUcontext ctx = (CUcontext)1;
    int ordinal = 1;
    void *data[] = {&start, &size, &id, &type, &ctx, &ordinal};
    OK(cuPointerGetAttributes(6, at, data, a + 5000));
    /* what the H200's driver (580) wrote for its own slack and freed pointers
     * (docs/gpu-runs/semantics_probe_driver.txt): the range attributes are left untouched */
    cr_assert(start == 1 && size == 1 && id == 0 && type == 0 && ctx == NULL && ordinal == -2,
              "defaults: %llu %zu %llu %u %p %d", (unsigned long long)start, size, id, type,
              (void *)ctx, ordinal);
    OK(cuPointerGetAttributes(6, at, data, a + 10));
    cr_assert(start == a && size == 5000 && id == attr_u64(CU_POINTER_ATTRIBUTE_BUFFER_ID, a) &&
              type == CU_MEMORYTYPE_DEVICE && ctx != NULL && ordinal == 0);
}
