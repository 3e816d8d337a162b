/* api_limit_views: the limit wherever a program looks for the device's size. Under GPUMEM_LIMIT
 * cuDeviceTotalMem (what cudaGetDeviceProperties().totalGlobalMem and PyTorch's total_memory
 * come from) and cuMemGetInfo's total are the limit; without one, or with a limit above the
 * device, they are the driver's own answers. Per-device limits answer per device. */
#include "api_test.h"
#include "fakecuda.h"

#define MiB ((size_t)1 << 20)

static size_t total_mem(int ordinal)
{
    CUdevice dev;
    size_t bytes = 0;
    OK(cuDeviceGet(&dev, ordinal));
    OK(cuDeviceTotalMem(&bytes, dev));
    return bytes;
}

static size_t info_total(void)
{
    size_t free_b = 0, total = 0;
    OK(cuMemGetInfo(&free_b, &total));
    return total;
}

Test(limit_views, the_limit_is_the_devices_total)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("GPUMEM_LIMIT", "64MiB", 1);
    api_start();
    cr_assert_eq(total_mem(0), 64 * MiB, "cuDeviceTotalMem");
    cr_assert_eq(info_total(), 64 * MiB, "cuMemGetInfo");
}

Test(limit_views, no_limit_leaves_the_drivers_answer)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    api_start();
    cr_assert_eq(total_mem(0), 1024 * MiB);
    cr_assert_eq(info_total(), 1024 * MiB);
}

Test(limit_views, a_limit_above_the_device_and_a_percentage)
{
    setenv("FAKECUDA_MEM", "1G", 1);
    setenv("FAKECUDA_DEVICES", "2", 1);
    setenv("GPUMEM_LIMIT", "0:8GiB,1:25%", 1);
    api_start();
    cr_assert_eq(total_mem(0), 1024 * MiB, "a limit above the device: the device");
    cr_assert_eq(total_mem(1), 256 * MiB, "25 %% of device 1");
    cr_assert_eq(total_mem(0), 1024 * MiB, "asked again: the same");
}

Test(limit_views, bad_arguments_get_the_drivers_errors)
{
    setenv("GPUMEM_LIMIT", "64MiB", 1);
    api_start();
    CUdevice dev;
    OK(cuDeviceGet(&dev, 0));
    ERR(cuDeviceTotalMem(NULL, dev), CUDA_ERROR_INVALID_VALUE);
    size_t bytes = 7;
    ERR(cuDeviceTotalMem(&bytes, 99), CUDA_ERROR_INVALID_DEVICE);
    cr_assert_eq(bytes, 7, "nothing written on an error");
}
