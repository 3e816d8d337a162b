/* What a program sees of a device under the limit, asked by device ordinal (cuMemGetInfo,
 * cuDeviceTotalMem) or by UUID (NVML, whose index order is not CUDA's). The figures come from
 * account/limits.c and, with GPUMEM_SHARED, from the group's ledger (account/ledger.c). */
#include <string.h>

#include "gm_engine.h"

/* A percentage limit is of cuDeviceTotalMem's figure, whichever call comes first (cuMemGetInfo,
 * NVML's larger total): members of a group must resolve it to the same bytes. */
void gm_device_prepare(int device, uint64_t driver_total)
{
    gm_device *d = gm_device_get(device);
    if (!d || atomic_load(&d->limit_resolved)) return;
    const gm_backend *be = gm_mgr.backend;
    unsigned char uuid[16];
    bool known = be && be->device_uuid(device, uuid) == GPUMEM_OK;
    size_t total = 0;
    if (be && be->device_total(device, &total) == GPUMEM_OK && total) driver_total = total;
    gm_limit_init_device(device, driver_total, known ? uuid : NULL);
}

uint64_t gm_device_visible_total(int device, uint64_t driver_total)
{
    gm_device_prepare(device, driver_total);
    return gm_limit_visible_total(device, driver_total);
}

/* The CUDA ordinal this process sees the device with `uuid` as, or -1. */
static int ordinal_of_uuid(const unsigned char uuid[16])
{
    const gm_backend *be = gm_mgr.backend;
    int count = 0;
    if (!be || be->device_count(&count) != GPUMEM_OK) return -1;
    for (int i = 0; i < count && i < GM_MAX_DEVICES; i++) {
        unsigned char id[16];
        if (be->device_uuid(i, id) == GPUMEM_OK && memcmp(id, uuid, 16) == 0) return i;
    }
    return -1;
}

bool gm_device_view_by_uuid(const unsigned char uuid[16], uint64_t driver_total, gm_device_view *out)
{
    int device = ordinal_of_uuid(uuid);
    if (device >= 0) gm_device_prepare(device, driver_total);
    gm_ledger_figures group;
    if (gm_ledger_figures_of(uuid, &group)) { /* the group's budget, even for a device we never used */
        if (!group.limit) return false;
        out->total = group.limit < driver_total ? group.limit : driver_total;
        out->used = group.used;
        return true;
    }
    if (device < 0) return false;
    gm_device *d = gm_device_get(device);
    uint64_t limit = atomic_load(&d->limit);
    if (!limit) return false;
    out->total = limit < driver_total ? limit : driver_total;
    out->used = atomic_load(&d->reserved);
    return true;
}

int gm_group_processes(const unsigned char uuid[16], gm_group_process *out, int max)
{
    return gm_ledger_on() ? gm_ledger_members_of(uuid, out, max) : -1;
}
