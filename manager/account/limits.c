/* Per-device limits and byte accounting. The limit counts bytes *reserved* from the device
 * (pool segments and pass-through allocations), not bytes handed out, because reserved memory
 * is what other processes on the GPU can no longer have. */
#include <string.h>

#include "gm_account.h"

static gm_device devices[GM_MAX_DEVICES];

gm_device *gm_device_get(int device)
{
    if (device < 0 || device >= GM_MAX_DEVICES) return NULL;
    return &devices[device];
}

static void raise_peak(_Atomic uint64_t *peak, uint64_t value)
{
    uint64_t seen = atomic_load_explicit(peak, memory_order_relaxed);
    while (value > seen &&
           !atomic_compare_exchange_weak_explicit(peak, &seen, value, memory_order_relaxed,
                                                  memory_order_relaxed)) {
    }
}

static pthread_mutex_t init_lock = PTHREAD_MUTEX_INITIALIZER;

void gm_limit_init_device(int device, uint64_t device_total, const unsigned char *uuid)
{
    gm_device *d = gm_device_get(device);
    if (!d || atomic_load(&d->limit_resolved)) return;
    pthread_mutex_lock(&init_lock); /* once: the ledger entry is bound before anyone reserves */
    if (!atomic_load(&d->limit_resolved)) {
        /* By UUID where an entry names it: the limit follows the device under CUDA_VISIBLE_DEVICES. */
        uint64_t limit = gm_limit_resolve(gm_config_limit_of(gm_config_get(), device, uuid), device_total);
        if (uuid) {
            memcpy(d->uuid, uuid, 16);
            d->has_uuid = true;
        }
        if (gm_ledger_on() && uuid) d->ledger = gm_ledger_bind(uuid, limit) + 1;
        else if (gm_ledger_on())
            gm_log(GM_WARN, "device %d has no UUID: its memory counts for this process alone, not in %s",
                   device, gm_ledger_path());
        atomic_store(&d->limit, limit);
        atomic_store(&d->limit_resolved, true);
        if (limit) gm_log(GM_INFO, "device %d: limit %llu bytes%s", device, (unsigned long long)limit,
                          d->ledger ? " (the group's)" : "");
    }
    pthread_mutex_unlock(&init_lock);
}

bool gm_device_uuid_text(int device, char out[41])
{
    gm_device *d = gm_device_get(device);
    if (!d || !atomic_load(&d->limit_resolved) || !d->has_uuid) return false;
    gm_ledger_uuid_text(d->uuid, out);
    return true;
}

/* In a group the ledger holds the limit: this process's figure only counts. */
static bool reserve_in_group(gm_device *d, uint64_t bytes)
{
    if (!gm_ledger_reserve(d->ledger - 1, bytes)) return false;
    uint64_t now = atomic_fetch_add_explicit(&d->reserved, bytes, memory_order_relaxed) + bytes;
    raise_peak(&d->reserved_peak, now);
    return true;
}

bool gm_limit_reserve(int device, uint64_t bytes)
{
    gm_device *d = gm_device_get(device);
    if (!d) return false;
    if (d->ledger) return reserve_in_group(d, bytes);
    uint64_t limit = atomic_load_explicit(&d->limit, memory_order_relaxed);
    uint64_t cur = atomic_load_explicit(&d->reserved, memory_order_relaxed);
    for (;;) {
        if (bytes > UINT64_MAX - cur) return false;
        if (limit && cur + bytes > limit) return false;
        if (atomic_compare_exchange_weak_explicit(&d->reserved, &cur, cur + bytes,
                                                  memory_order_relaxed, memory_order_relaxed))
            break;
    }
    raise_peak(&d->reserved_peak, cur + bytes);
    return true;
}

void gm_limit_unreserve(int device, uint64_t bytes)
{
    gm_device *d = gm_device_get(device);
    if (!d) return;
    atomic_fetch_sub_explicit(&d->reserved, bytes, memory_order_relaxed);
    if (d->ledger) gm_ledger_unreserve(d->ledger - 1, bytes);
}

uint64_t gm_limit_visible_total(int device, uint64_t driver_total)
{
    gm_device *d = gm_device_get(device);
    if (!d) return driver_total;
    uint64_t limit = atomic_load_explicit(&d->limit, memory_order_relaxed);
    return limit && limit < driver_total ? limit : driver_total;
}

uint64_t gm_limit_headroom(int device)
{
    gm_device *d = gm_device_get(device);
    if (!d) return 0;
    if (d->ledger) return gm_ledger_headroom(d->ledger - 1);
    uint64_t limit = atomic_load_explicit(&d->limit, memory_order_relaxed);
    if (!limit) return UINT64_MAX;
    uint64_t cur = atomic_load_explicit(&d->reserved, memory_order_relaxed);
    return cur >= limit ? 0 : limit - cur;
}

void gm_device_note_allocated(int device, int64_t delta)
{
    gm_device *d = gm_device_get(device);
    if (!d) return;
    uint64_t now = atomic_fetch_add_explicit(&d->allocated, (uint64_t)delta, memory_order_relaxed) +
                   (uint64_t)delta;
    if (delta > 0) raise_peak(&d->allocated_peak, now);
}

bool gm_limit_group_figures(int device, gm_ledger_figures *out)
{
    gm_device *d = gm_device_get(device);
    return d && d->ledger && gm_ledger_figures_at(d->ledger - 1, out);
}
