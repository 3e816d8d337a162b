/* What a program sees of a device under the limit, asked by device ordinal (cuMemGetInfo,
 * cuDeviceTotalMem) or by UUID (NVML, whose index order is not CUDA's). The figures come from
 * account/limits.c and, with GPUMEM_SHARED, from the group's ledger (account/ledger.c). */
#include <pthread.h>
#include <string.h>

#include "gm_engine.h"

/* The UUID of every ordinal this process sees, learned once: CUDA_VISIBLE_DEVICES is read at
 * cuInit, so the numbering holds for the process's life, and NVML pollers (nvidia-smi -l, DCGM)
 * ask again and again. */
static struct {
    pthread_mutex_t lock;
    bool known;
    int count;
    unsigned char uuid[GM_MAX_DEVICES][16];
    bool has_uuid[GM_MAX_DEVICES];
} ordinals = {.lock = PTHREAD_MUTEX_INITIALIZER};

static bool learn_ordinals_locked(void)
{
    const gm_backend *be = gm_mgr.backend;
    int count = 0;
    if (!be || be->device_count(&count) != GPUMEM_OK) return false; /* asked again next time */
    ordinals.count = count < GM_MAX_DEVICES ? count : GM_MAX_DEVICES;
    for (int i = 0; i < ordinals.count; i++)
        ordinals.has_uuid[i] = be->device_uuid(i, ordinals.uuid[i]) == GPUMEM_OK;
    ordinals.known = true;
    return true;
}

/* The CUDA ordinal this process sees the device with `uuid` as, or -1. */
static int ordinal_of_uuid(const unsigned char uuid[16])
{
    int found = -1;
    pthread_mutex_lock(&ordinals.lock);
    if (ordinals.known || learn_ordinals_locked())
        for (int i = 0; i < ordinals.count && found < 0; i++)
            if (ordinals.has_uuid[i] && memcmp(ordinals.uuid[i], uuid, 16) == 0) found = i;
    pthread_mutex_unlock(&ordinals.lock);
    return found;
}

/* Once, before any device's limit: the per-device limits must name devices this process sees
 * (config.c says what is refused; a bad one stops the process as any bad setting does). A
 * driver that cannot count its devices yet is asked again at the next device's first use. */
static void check_limit_keys(void)
{
    static _Atomic bool checked;
    if (atomic_load(&checked)) return;
    pthread_mutex_lock(&ordinals.lock);
    if (ordinals.known || learn_ordinals_locked()) {
        gm_config_check_devices_or_exit(ordinals.count, (const unsigned char (*)[16])ordinals.uuid,
                                        ordinals.has_uuid);
        atomic_store(&checked, true);
    }
    pthread_mutex_unlock(&ordinals.lock);
}

/* A percentage limit is of cuDeviceTotalMem's figure, whichever call comes first (cuMemGetInfo,
 * NVML's larger total): members of a group must resolve it to the same bytes. */
void gm_device_prepare(int device, uint64_t driver_total)
{
    gm_device *d = gm_device_get(device);
    if (!d || atomic_load(&d->limit_resolved)) return;
    check_limit_keys();
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
