/* api_arrays: CUDA arrays (cuArrayCreate, cuArray3DCreate, cuMipmappedArrayCreate: what
 * cudaMallocArray, cudaMalloc3DArray and cudaMallocMipmappedArray reach) are device memory the
 * pool does not serve, counted in the limit, the statistics and the leak report at their texel
 * bytes, every mip level included (the driver answers nothing more exact for a plain array; the
 * fake, like the real one, takes more than the texels). An array that cannot fit is refused before
 * the driver is asked; a deferred-mapping array, which has no memory of its own, is not counted; a
 * descriptor the driver refuses gets the driver's own error and nothing is tracked. */
#include <dlfcn.h>

#include "api_test.h"
#include "fakecuda.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

static CUDA_ARRAY3D_DESCRIPTOR desc3d(size_t w, size_t h, size_t d, CUarray_format f, unsigned ch)
{
    return (CUDA_ARRAY3D_DESCRIPTOR){.Width = w, .Height = h, .Depth = d, .Format = f, .NumChannels = ch};
}

static uint64_t fake_bytes_in_use(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c.bytes_in_use;
}

Test(arrays, a_2d_array_counts_at_its_texel_bytes)
{
    api_start();
    CUDA_ARRAY_DESCRIPTOR d = {.Width = 1000, .Height = 100, .Format = CU_AD_FORMAT_FLOAT, .NumChannels = 1};
    CUarray a;
    OK(cuArrayCreate(&a, &d));
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 400000);
    cr_assert_eq(st.bytes_reserved, 400000);
    cr_assert_eq(st.allocations, 1);
    cr_assert_geq(fake_bytes_in_use(), 400000, "the driver takes the texels at least");
    OK(cuArrayDestroy(a));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.bytes_reserved, 0);
    cr_assert_eq(st.frees, 1);
}

Test(arrays, 3d_layered_and_mipmapped_arrays_are_counted)
{
    api_start();
    CUDA_ARRAY3D_DESCRIPTOR d = desc3d(64, 64, 64, CU_AD_FORMAT_UNSIGNED_INT8, 4);
    CUarray a;
    OK(cuArray3DCreate(&a, &d));
    CUDA_ARRAY3D_DESCRIPTOR layered = desc3d(128, 128, 3, CU_AD_FORMAT_HALF, 2);
    layered.Flags = CUDA_ARRAY3D_LAYERED;
    CUarray l;
    OK(cuArray3DCreate(&l, &layered));
    CUDA_ARRAY3D_DESCRIPTOR m = desc3d(256, 256, 0, CU_AD_FORMAT_FLOAT, 1);
    CUmipmappedArray mm;
    OK(cuMipmappedArrayCreate(&mm, &m, 4));
    size_t mip = 4 * (256 * 256 + 128 * 128 + 64 * 64 + 32 * 32);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, MiB + 128 * 128 * 3 * 4 + mip, "layers do not shrink, levels do");
    cr_assert_eq(st.allocations, 3);
    ERR(cuArrayDestroy((CUarray)mm), CUDA_ERROR_INVALID_HANDLE); /* the driver's answer, counted nothing */
    OK(cuMipmappedArrayDestroy(mm));
    OK(cuArrayDestroy(l));
    OK(cuArrayDestroy(a));
    st = api_stats_or_fail();
    cr_assert_eq(st.bytes_requested, 0);
    cr_assert_eq(st.frees, 3);
}

Test(arrays, an_array_over_the_limit_is_refused_before_the_driver)
{
    setenv("GPUMEM_LIMIT", "4MiB", 1);
    api_start();
    CUDA_ARRAY3D_DESCRIPTOR d = desc3d(128, 128, 128, CU_AD_FORMAT_FLOAT, 1); /* 8 MiB */
    CUarray a;
    fakecuda_reset_counters();
    ERR(cuArray3DCreate(&a, &d), CUDA_ERROR_OUT_OF_MEMORY);
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    cr_assert_eq(c.alloc_calls, 0, "refused by the limit, the driver never asked");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.limit_rejections, 1);
    cr_assert_eq(st.bytes_reserved, 0);
    d = desc3d(64, 64, 64, CU_AD_FORMAT_FLOAT, 1); /* 1 MiB fits */
    OK(cuArray3DCreate(&a, &d));
    OK(cuArrayDestroy(a));
}

Test(arrays, a_deferred_mapping_array_has_no_memory_to_count)
{
    setenv("GPUMEM_LIMIT", "1MiB", 1);
    api_start();
    CUDA_ARRAY3D_DESCRIPTOR d = desc3d(1024, 1024, 0, CU_AD_FORMAT_FLOAT, 1); /* 4 MiB of texels */
    d.Flags = CUDA_ARRAY3D_DEFERRED_MAPPING;
    CUarray a;
    OK(cuArray3DCreate(&a, &d));
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    CUDA_ARRAY_MEMORY_REQUIREMENTS req;
    OK(cuArrayGetMemoryRequirements(&req, a, dev));
    cr_assert_geq(req.size, 4 * MiB, "the memory the program must map into it");
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 0, "its memory is the cuMemCreate handles mapped into it, counted there");
    cr_assert_eq(st.bytes_reserved, 0);
    OK(cuArrayDestroy(a));
    d.Flags = 0; /* the same array with memory of its own does not fit the 1 MiB */
    ERR(cuArray3DCreate(&a, &d), CUDA_ERROR_OUT_OF_MEMORY);
    ERR(cuArrayGetMemoryRequirements(&req, (CUarray)(uintptr_t)1, dev), CUDA_ERROR_INVALID_HANDLE);
    d = desc3d(64, 64, 0, CU_AD_FORMAT_FLOAT, 1);
    OK(cuArray3DCreate(&a, &d));
    ERR(cuArrayGetMemoryRequirements(&req, a, dev), CUDA_ERROR_INVALID_VALUE); /* as the H200's driver */
    OK(cuArrayDestroy(a));
}

Test(arrays, a_descriptor_the_driver_refuses_gets_its_error_and_is_not_tracked)
{
    api_start();
    CUDA_ARRAY3D_DESCRIPTOR d = desc3d(0, 16, 0, CU_AD_FORMAT_FLOAT, 1);
    CUarray a;
    ERR(cuArray3DCreate(&a, &d), CUDA_ERROR_INVALID_VALUE);
    d = desc3d(16, 16, 0, CU_AD_FORMAT_FLOAT, 3); /* three channels do not exist */
    ERR(cuArray3DCreate(&a, &d), CUDA_ERROR_INVALID_VALUE);
    ERR(cuArray3DCreate(&a, NULL), CUDA_ERROR_INVALID_VALUE);
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.allocations, 0);
    cr_assert_eq(st.bytes_reserved, 0);
}

Test(arrays, a_leaked_array_is_in_the_report_and_goes_with_its_context)
{
    CUcontext ctx = api_start();
    (void)ctx;
    CUDA_ARRAY3D_DESCRIPTOR d = desc3d(64, 64, 64, CU_AD_FORMAT_UNSIGNED_INT8, 4);
    CUarray a;
    OK(cuArray3DCreate(&a, &d));
    api_report_fn report = (api_report_fn)(uintptr_t)api_shim_sym("gpumem_report");
    cr_assert_not_null(report);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    report(f);
    fclose(f);
    cr_assert(strstr(buf, "Leak of 1048576 byte(s) in 1 allocation(s) on device 0"), "%s", buf);
    free(buf);
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    OK(cuDevicePrimaryCtxReset(dev)); /* the driver frees the array with its context */
    gpumem_stats st = api_stats_or_fail();
    cr_assert_eq(st.bytes_reserved, 0, "a dead context's array holds no budget");
    cr_assert_eq(fake_bytes_in_use(), 0);
}

Test(arrays, cudart_reaches_the_hooks_through_cuGetProcAddress)
{
    api_start();
    void *fn = NULL;
    CUdriverProcAddressQueryResult q;
    OK(cuGetProcAddress("cuArray3DCreate", &fn, 13000, CU_GET_PROC_ADDRESS_DEFAULT, &q));
    cr_assert_eq(fn, dlsym(RTLD_DEFAULT, "cuArray3DCreate_v2"), "the shim's hook, not the driver's");
    OK(cuGetProcAddress("cuMipmappedArrayCreate", &fn, 13000, CU_GET_PROC_ADDRESS_DEFAULT, &q));
    cr_assert_eq(fn, dlsym(RTLD_DEFAULT, "cuMipmappedArrayCreate"));
}
