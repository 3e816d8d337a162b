/* Per-device limits and byte accounting. The limit counts bytes *reserved* from the device
 * (pool segments and pass-through allocations), not bytes handed out, because reserved memory
 * is what other processes on the GPU can no longer have. */
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

void gm_limit_init_device(int device, uint64_t device_total)
{
    gm_device *d = gm_device_get(device);
    if (!d || atomic_load(&d->limit_resolved)) return;
    uint64_t limit = gm_limit_resolve(&gm_config_get()->limit[device], device_total);
    atomic_store(&d->limit, limit);
    atomic_store(&d->limit_resolved, true);
    if (limit) gm_log(GM_INFO, "device %d: limit %llu bytes", device, (unsigned long long)limit);
}

bool gm_limit_reserve(int device, uint64_t bytes)
{
    gm_device *d = gm_device_get(device);
    if (!d) return false;
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
    if (d) atomic_fetch_sub_explicit(&d->reserved, bytes, memory_order_relaxed);
}

uint64_t gm_limit_visible_total(int device, uint64_t driver_total)
{
    gm_device *d = gm_device_get(device);
    if (!d) return driver_total;
    gm_limit_init_device(device, driver_total); /* once: a percentage needs the total */
    uint64_t limit = atomic_load_explicit(&d->limit, memory_order_relaxed);
    return limit && limit < driver_total ? limit : driver_total;
}

uint64_t gm_limit_headroom(int device)
{
    gm_device *d = gm_device_get(device);
    if (!d) return 0;
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
