/* Named, resizable device buffers (the "buffers" section of gpumem.h): the seed's dynamically
 * resizing buffer and its manager as a C API over the pool.
 *
 * A buffer is one pool allocation plus what it knows about itself: its name (unique in the
 * process, and the tag every allocation it makes carries, so the leak report and the tag
 * statistics name it), its configuration, the stream its copies run on, how much of it is used.
 *
 * Growth keeps the data. First in place: when the block after the buffer's pool block is free
 * (or, under GPUMEM_EXPANDABLE=1, when the block ends its expandable segment: chunks are mapped
 * behind it),
 * the block is extended into it (gm_resize_grow_in_place), no copy, same pointer. Otherwise a new block is
 * allocated, the used bytes are copied device to device on the buffer's stream and the old block
 * is freed like cudaFree frees (strict mode: after a context barrier; fast mode: behind a fence),
 * so nothing reuses it before the copy has read it. A grow that fails changes nothing.
 *
 * Locking: the registry's lock (a rwlock) orders buffers against create and destroy: every call
 * on a buffer holds it for reading the whole time, destroy takes it for writing, so a buffer is
 * never freed under a call that uses it. Each buffer has its own mutex; the heap's lock comes
 * last. Order: registry, buffer, heap. */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "gm_api.h"

struct gpumem_buffer {
    char name[GM_TAG_NAME_MAX + 1];
    gpumem_buffer_config cfg;
    uintptr_t stream;
    gm_heap *heap;
    uintptr_t ctx;          /* the context current at create: the buffer's memory lives there */
    uint16_t tag;           /* tags.c id of the name */
    pthread_mutex_t lock;
    uintptr_t ptr;          /* 0 while the capacity is 0 */
    size_t used, capacity;
    uint64_t last_access_ns;
    uint64_t grows, grows_in_place, copies, bytes_copied, shrinks;
    uintptr_t self;         /* key of by_handle */
    UT_hash_handle hh_name, hh_handle;
};

static pthread_rwlock_t registry_lock = PTHREAD_RWLOCK_INITIALIZER;
static gpumem_buffer *by_name, *by_handle;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static __thread char last_error[320];

/* ------------------------------------------------------------------ errors */

/* Records the reason on this thread (gpumem_buffer_last_error) and logs it: misuse as an error
 * line, out-of-memory and not-found only at GPUMEM_VERBOSE=1 (a program may expect them). */
__attribute__((format(printf, 2, 3))) static int fail(int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    bool misuse = rc == GPUMEM_ERROR_INVALID_VALUE || rc == GPUMEM_ERROR_INVALID_CONTEXT;
    gm_log(misuse ? GM_ERROR : GM_INFO, "%s", last_error);
    return rc;
}

/* ------------------------------------------------------------------ sizes */

static size_t round_512(size_t n)
{
    size_t r = gm_pool_round_size(n);
    return r ? r : n; /* beyond the pool's range: left for gm_alloc to refuse */
}

/* The capacity a grow to at least `need` bytes aims for: the current capacity times the growth
 * factor, at least `need` and the initial capacity, a multiple of 512 (the pool's granule), at
 * most max_size. */
static size_t growth_target(const gpumem_buffer *b, size_t need)
{
    size_t target = need;
    double grown = ceil((double)b->capacity * b->cfg.growth_factor);
    if (grown > (double)target) target = grown >= (double)(SIZE_MAX / 2) ? SIZE_MAX / 2 : (size_t)grown;
    if (target < b->cfg.initial_capacity) target = b->cfg.initial_capacity;
    target = round_512(target);
    if (b->cfg.max_size && target > b->cfg.max_size) target = b->cfg.max_size;
    return target;
}

static bool over_max(const gpumem_buffer *b, size_t n) { return b->cfg.max_size && n > b->cfg.max_size; }

/* ------------------------------------------------------------------ the manager, the heap */

/* An allocation of the buffer's, tagged with its name. */
static int buffer_alloc(gpumem_buffer *b, size_t size, const gm_callsite *site, uintptr_t *out)
{
    int rc = gm_tag_push_id(b->tag);
    if (rc != GPUMEM_OK) return rc;
    rc = gm_alloc(b->heap, size, b->stream, site, out);
    gm_tag_pop();
    return rc;
}

/* Frees with cudaFree's ordering: nothing reuses the block before work enqueued on it is done. */
static void buffer_free(gpumem_buffer *b, uintptr_t p)
{
    gm_answer a = gm_free(b->heap, p, GM_FREE_BARRIER, NULL);
    int rc = a.owner == GM_OURS ? a.status : GPUMEM_ERROR_INVALID_VALUE; /* no longer tracked */
    if (rc != GPUMEM_OK)
        gm_log(GM_WARN, "buffer \"%s\": freeing its old block %#lx failed (%s)", b->name,
               (unsigned long)p, gpumem_strerror(rc));
}

/* The buffer's memory is still the allocation it made: its context is alive and the heap still
 * tracks the pointer with the buffer's size and tag. When not (its context was destroyed, or the
 * program freed the pointer itself), the buffer forgets it: there is nothing left to keep. */
static int check_memory(gpumem_buffer *b, const char *fn)
{
    int rc = gm_check_owned(b->heap, b->ctx, b->ptr, b->capacity, b->tag);
    if (rc == GPUMEM_OK) return GPUMEM_OK;
    bool bound = rc != GPUMEM_ERROR_INVALID_CONTEXT;
    uintptr_t lost = b->ptr;
    b->ptr = 0;
    b->used = b->capacity = 0;
    if (!bound)
        return fail(GPUMEM_ERROR_INVALID_CONTEXT,
                    "%s(\"%s\"): the context the buffer was created in was destroyed; its memory "
                    "went with it", fn, b->name);
    return fail(GPUMEM_ERROR_INVALID_VALUE,
                "%s(\"%s\"): the buffer's memory %#lx was freed behind its back (cudaFree or "
                "gpumem_free on the buffer's pointer?); its contents are lost", fn, b->name,
                (unsigned long)lost);
}

/* ------------------------------------------------------------------ growing */

/* Extends the pool block in place toward `target`, or as far as the free neighbour reaches,
 * provided that covers `need`. True when it did. */
static bool grow_in_place(gpumem_buffer *b, size_t need, size_t target)
{
    size_t cap = target;
    if (gm_resize_grow_in_place(b->heap, b->ptr, need, &cap) != GPUMEM_OK) return false;
    b->capacity = cap;
    b->grows++;
    b->grows_in_place++;
    return true;
}

/* Copies the used bytes to `fresh` on the buffer's stream and frees the old block. */
static int move_to(gpumem_buffer *b, uintptr_t fresh)
{
    const gm_backend *be = gm_mgr.backend;
    if (b->used) {
        int rc = be->copy_async(b->heap->ctx, GM_COPY_D2D, fresh, b->ptr, b->used, b->stream);
        /* Fast mode fences cover the legacy stream and the streams the shim saw created; a stream
         * made behind its back (library mode) is not among them, so wait for the copy here. */
        if (rc == GPUMEM_OK && !gm_mgr.cfg->free_sync && b->stream)
            rc = be->stream_synchronize(b->heap->ctx, b->stream);
        if (rc != GPUMEM_OK) return rc;
        b->copies++;
        b->bytes_copied += b->used;
    }
    if (b->ptr) buffer_free(b, b->ptr);
    b->ptr = fresh;
    return GPUMEM_OK;
}

/* A new block of `cap` bytes (or exactly `need` when the larger one does not fit) with the used
 * bytes copied over. On failure the buffer is as it was. */
static int grow_by_copy(gpumem_buffer *b, size_t need, size_t cap, const gm_callsite *site)
{
    uintptr_t fresh = 0;
    int rc = buffer_alloc(b, cap, site, &fresh);
    if (rc == GPUMEM_ERROR_OUT_OF_MEMORY && cap > need) {
        cap = need;
        rc = buffer_alloc(b, cap, site, &fresh);
    }
    if (rc != GPUMEM_OK) return rc;
    rc = move_to(b, fresh);
    if (rc != GPUMEM_OK) {
        buffer_free(b, fresh);
        return rc;
    }
    b->capacity = cap;
    b->grows++;
    return GPUMEM_OK;
}

static int grow(gpumem_buffer *b, size_t need, const gm_callsite *site, const char *fn)
{
    size_t target = growth_target(b, need);
    if (b->ptr && grow_in_place(b, need, target)) return GPUMEM_OK;
    int rc = grow_by_copy(b, need, target, site);
    if (rc == GPUMEM_OK) return GPUMEM_OK;
    return fail(rc, "%s(\"%s\"): growing from %zu to %zu bytes (at least %zu) failed: %s; the "
                    "buffer is unchanged", fn, b->name, b->capacity, target, need, gpumem_strerror(rc));
}

/* ------------------------------------------------------------------ shrinking */

/* Gives capacity beyond `target` (>= used) back; 0 releases the whole block. Pool blocks shrink
 * in place; a block of its own (GPUMEM_POOL=0) moves to a smaller one. */
static int shrink_to(gpumem_buffer *b, size_t target, const gm_callsite *site)
{
    if (target >= b->capacity) return GPUMEM_OK;
    if (target == 0) {
        buffer_free(b, b->ptr);
        b->ptr = 0;
        b->capacity = 0;
        b->shrinks++;
        return GPUMEM_OK;
    }
    int rc = gm_resize_shrink_in_place(b->heap, b->ptr, target);
    if (rc == GPUMEM_ERROR_NOT_SUPPORTED) { /* not a pool block: move it */
        uintptr_t fresh = 0;
        rc = buffer_alloc(b, target, site, &fresh);
        if (rc == GPUMEM_OK) rc = move_to(b, fresh);
        if (rc != GPUMEM_OK && fresh) buffer_free(b, fresh);
    }
    if (rc != GPUMEM_OK) return rc;
    b->capacity = target;
    b->shrinks++;
    return GPUMEM_OK;
}

/* What automatic shrinking leaves: the used bytes, but not below the initial capacity. */
static size_t underuse_target(const gpumem_buffer *b)
{
    size_t t = round_512(b->used);
    if (t < b->cfg.initial_capacity) t = b->cfg.initial_capacity;
    return t;
}

static bool underused(const gpumem_buffer *b)
{
    return b->capacity && b->cfg.shrink_below > 0 &&
           (double)b->used < b->cfg.shrink_below * (double)b->capacity;
}

/* ------------------------------------------------------------------ the registry */

static void lock_for_fork(void) { pthread_rwlock_wrlock(&registry_lock); }
static void unlock_after_fork(void) { pthread_rwlock_unlock(&registry_lock); }

/* While the registry is held for writing no call is inside a buffer, so no buffer lock is held
 * across fork. (The child inherits no context: its buffers answer INVALID_CONTEXT.) */
static void install_atfork(void)
{
    static const gm_fork_handlers handlers = {lock_for_fork, unlock_after_fork, unlock_after_fork};
    gm_fork_register(GM_FORK_BUFFERS, &handlers);
}

static gpumem_buffer *find_handle_locked(const gpumem_buffer *b)
{
    uintptr_t key = (uintptr_t)b;
    gpumem_buffer *found = NULL;
    HASH_FIND(hh_handle, by_handle, &key, sizeof key, found);
    return found;
}

static gpumem_buffer *find_name_locked(const char *name)
{
    gpumem_buffer *found = NULL;
    HASH_FIND(hh_name, by_name, name, strlen(name), found);
    return found;
}

/* Every call on a buffer: the registry for reading, then the buffer. */
static int enter(gpumem_buffer *b, const char *fn)
{
    if (!b) return fail(GPUMEM_ERROR_INVALID_VALUE, "%s: the buffer is NULL", fn);
    pthread_rwlock_rdlock(&registry_lock);
    if (!find_handle_locked(b)) {
        pthread_rwlock_unlock(&registry_lock);
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "%s(%p): not a live buffer (destroyed, or not made by gpumem_buffer_create)", fn,
                    (void *)b);
    }
    pthread_mutex_lock(&b->lock);
    return GPUMEM_OK;
}

static void leave(gpumem_buffer *b)
{
    pthread_mutex_unlock(&b->lock);
    pthread_rwlock_unlock(&registry_lock);
}

static void touch(gpumem_buffer *b) { b->last_access_ns = gm_coarse_now_ns(); }

/* ------------------------------------------------------------------ configuration */

void gpumem_buffer_config_init(gpumem_buffer_config *cfg)
{
    if (!cfg) return;
    memset(cfg, 0, sizeof *cfg);
    cfg->growth_factor = 2.0;
    cfg->shrink = GPUMEM_SHRINK_ON_CLEANUP;
    cfg->shrink_below = 0.25;
}

static int check_config(const char *name, gpumem_buffer_config *cfg)
{
    const char *fn = "gpumem_buffer_create";
    if (cfg->growth_factor == 0) cfg->growth_factor = 2.0;
    if (!isfinite(cfg->growth_factor) || cfg->growth_factor < 1.0)
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "%s(\"%s\"): growth_factor %g is not accepted: a number >= 1 (0 = 2.0)", fn,
                    name, cfg->growth_factor);
    if (cfg->max_size && cfg->initial_capacity > cfg->max_size)
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "%s(\"%s\"): initial_capacity %zu bytes is over max_size %zu bytes", fn, name,
                    cfg->initial_capacity, cfg->max_size);
    if ((unsigned)cfg->shrink > GPUMEM_SHRINK_ON_RESIZE)
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "%s(\"%s\"): shrink policy %d is not one of GPUMEM_SHRINK_NEVER, _ON_CLEANUP, "
                    "_ON_RESIZE", fn, name, (int)cfg->shrink);
    if (!(cfg->shrink_below >= 0 && cfg->shrink_below <= 1))
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "%s(\"%s\"): shrink_below %g is not accepted: a used/capacity ratio in [0, 1]",
                    fn, name, cfg->shrink_below);
    if (!(cfg->idle_seconds >= 0 && isfinite(cfg->idle_seconds)))
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "%s(\"%s\"): idle_seconds %g is not accepted: seconds >= 0 (0 = never)", fn,
                    name, cfg->idle_seconds);
    return GPUMEM_OK;
}

static int check_name(const char *name)
{
    if (!name || !*name || strlen(name) > GM_TAG_NAME_MAX)
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "gpumem_buffer_create: the name must be a non-empty string of at most %d bytes "
                    "(got %s)", GM_TAG_NAME_MAX, !name ? "NULL" : *name ? "a longer one" : "\"\"");
    return GPUMEM_OK;
}

/* Interns the name as a tag now, so a full tag table fails the create, not a later grow. */
static int intern_tag(gpumem_buffer *b)
{
    int rc = gm_tag_intern(b->name, &b->tag);
    if (rc != GPUMEM_OK)
        return fail(rc, "gpumem_buffer_create(\"%s\"): the name cannot be used as a tag (%s)",
                    b->name, gpumem_strerror(rc));
    return GPUMEM_OK;
}

/* ------------------------------------------------------------------ public API */

gpumem_status gpumem_buffer_create(gpumem_buffer **out, const char *name,
                                   const gpumem_buffer_config *cfg, void *stream)
{
    if (!out) return fail(GPUMEM_ERROR_INVALID_VALUE, "gpumem_buffer_create: out is NULL");
    *out = NULL;
    int rc = check_name(name);
    if (rc != GPUMEM_OK) return rc;
    gpumem_buffer_config conf;
    if (cfg) conf = *cfg;
    else gpumem_buffer_config_init(&conf);
    if ((rc = check_config(name, &conf)) != GPUMEM_OK) return rc;
    gm_heap *heap = NULL;
    if ((rc = gm_api_current_heap(&heap)) != GPUMEM_OK)
        return fail(rc, "gpumem_buffer_create(\"%s\"): %s", name, gpumem_strerror(rc));
    gpumem_buffer *b = calloc(1, sizeof *b);
    if (!b) return fail(GPUMEM_ERROR_OUT_OF_MEMORY, "gpumem_buffer_create(\"%s\"): out of host memory", name);
    strcpy(b->name, name);
    b->cfg = conf;
    b->stream = (uintptr_t)stream;
    b->heap = heap;
    b->ctx = heap->ctx;
    b->self = (uintptr_t)b;
    pthread_mutex_init(&b->lock, NULL);
    touch(b);
    rc = intern_tag(b);
    if (rc == GPUMEM_OK && conf.initial_capacity) {
        rc = buffer_alloc(b, conf.initial_capacity, GM_CALLSITE(), &b->ptr);
        if (rc == GPUMEM_OK) b->capacity = conf.initial_capacity;
        else fail(rc, "gpumem_buffer_create(\"%s\"): the initial %zu bytes: %s", name,
                  conf.initial_capacity, gpumem_strerror(rc));
    }
    if (rc == GPUMEM_OK) {
        pthread_once(&atfork_once, install_atfork);
        pthread_rwlock_wrlock(&registry_lock);
        if (find_name_locked(b->name)) {
            rc = GPUMEM_ERROR_INVALID_VALUE;
        } else {
            HASH_ADD_KEYPTR(hh_name, by_name, b->name, strlen(b->name), b);
            HASH_ADD(hh_handle, by_handle, self, sizeof b->self, b);
        }
        pthread_rwlock_unlock(&registry_lock);
        if (rc != GPUMEM_OK) {
            fail(rc, "gpumem_buffer_create(\"%s\"): a buffer of that name exists already (names "
                     "are unique in a process)", name);
            if (b->ptr) buffer_free(b, b->ptr);
        }
    }
    if (rc != GPUMEM_OK) {
        pthread_mutex_destroy(&b->lock);
        free(b);
        return rc;
    }
    *out = b;
    return GPUMEM_OK;
}

gpumem_status gpumem_buffer_destroy(gpumem_buffer *b)
{
    if (!b) return GPUMEM_OK; /* like free(NULL) */
    pthread_rwlock_wrlock(&registry_lock);
    bool live = find_handle_locked(b) != NULL;
    if (live) {
        HASH_DELETE(hh_name, by_name, b);
        HASH_DELETE(hh_handle, by_handle, b);
    }
    pthread_rwlock_unlock(&registry_lock);
    if (!live)
        return fail(GPUMEM_ERROR_INVALID_VALUE,
                    "gpumem_buffer_destroy(%p): not a live buffer (destroyed twice?)", (void *)b);
    /* Out of the registry: no other call can reach it now. */
    int rc = GPUMEM_OK;
    if (b->ptr && !atomic_load(&gm_mgr.exiting)) {
        rc = check_memory(b, "gpumem_buffer_destroy");
        if (b->ptr) buffer_free(b, b->ptr);
    }
    pthread_mutex_destroy(&b->lock);
    free(b);
    return rc;
}

gpumem_status gpumem_buffer_find(const char *name, gpumem_buffer **out)
{
    if (!name || !out)
        return fail(GPUMEM_ERROR_INVALID_VALUE, "gpumem_buffer_find: %s is NULL", name ? "out" : "name");
    pthread_rwlock_rdlock(&registry_lock);
    *out = find_name_locked(name);
    pthread_rwlock_unlock(&registry_lock);
    if (!*out) return fail(GPUMEM_ERROR_NOT_FOUND, "gpumem_buffer_find(\"%s\"): no buffer of that name", name);
    return GPUMEM_OK;
}

gpumem_status gpumem_buffer_ptr(gpumem_buffer *b, void **dptr)
{
    if (!dptr) return fail(GPUMEM_ERROR_INVALID_VALUE, "gpumem_buffer_ptr: dptr is NULL");
    int rc = enter(b, "gpumem_buffer_ptr");
    if (rc != GPUMEM_OK) return rc;
    *dptr = (void *)b->ptr;
    touch(b);
    leave(b);
    return GPUMEM_OK;
}

gpumem_status gpumem_buffer_get_info(gpumem_buffer *b, gpumem_buffer_info *out)
{
    if (!out) return fail(GPUMEM_ERROR_INVALID_VALUE, "gpumem_buffer_get_info: out is NULL");
    int rc = enter(b, "gpumem_buffer_get_info");
    if (rc != GPUMEM_OK) return rc;
    *out = (gpumem_buffer_info){
        .name = b->name,
        .ptr = (void *)b->ptr,
        .used = b->used,
        .capacity = b->capacity,
        .max_size = b->cfg.max_size,
        .utilization = b->capacity ? (double)b->used / (double)b->capacity : 0.0,
        .last_access_ns = b->last_access_ns,
        .grows = b->grows,
        .grows_in_place = b->grows_in_place,
        .copies = b->copies,
        .bytes_copied = b->bytes_copied,
        .shrinks = b->shrinks,
    };
    leave(b);
    return GPUMEM_OK;
}

gpumem_status gpumem_buffer_reserve(gpumem_buffer *b, size_t capacity)
{
    const char *fn = "gpumem_buffer_reserve";
    int rc = enter(b, fn);
    if (rc != GPUMEM_OK) return rc;
    touch(b);
    if (over_max(b, capacity))
        rc = fail(GPUMEM_ERROR_INVALID_VALUE, "%s(\"%s\", %zu): over the buffer's max_size of %zu bytes",
                  fn, b->name, capacity, b->cfg.max_size);
    else if (capacity > b->capacity && (rc = check_memory(b, fn)) == GPUMEM_OK)
        rc = grow(b, capacity, GM_CALLSITE(), fn);
    leave(b);
    return rc;
}

gpumem_status gpumem_buffer_resize(gpumem_buffer *b, size_t used)
{
    const char *fn = "gpumem_buffer_resize";
    int rc = enter(b, fn);
    if (rc != GPUMEM_OK) return rc;
    touch(b);
    if (over_max(b, used)) {
        rc = fail(GPUMEM_ERROR_INVALID_VALUE, "%s(\"%s\", %zu): over the buffer's max_size of %zu bytes",
                  fn, b->name, used, b->cfg.max_size);
    } else if ((rc = check_memory(b, fn)) == GPUMEM_OK) {
        if (used > b->capacity) rc = grow(b, used, GM_CALLSITE(), fn);
        if (rc == GPUMEM_OK) {
            b->used = used;
            /* Best effort: the resize itself has succeeded whatever the shrink does. */
            if (b->cfg.shrink == GPUMEM_SHRINK_ON_RESIZE && underused(b))
                shrink_to(b, underuse_target(b), GM_CALLSITE());
        }
    }
    leave(b);
    return rc;
}

gpumem_status gpumem_buffer_shrink_to_fit(gpumem_buffer *b)
{
    const char *fn = "gpumem_buffer_shrink_to_fit";
    int rc = enter(b, fn);
    if (rc != GPUMEM_OK) return rc;
    touch(b);
    if ((rc = check_memory(b, fn)) == GPUMEM_OK) {
        rc = shrink_to(b, b->used ? round_512(b->used) : 0, GM_CALLSITE());
        if (rc != GPUMEM_OK)
            fail(rc, "%s(\"%s\"): %s; the buffer is unchanged", fn, b->name, gpumem_strerror(rc));
    }
    leave(b);
    return rc;
}

/* What cleanup leaves of one buffer: idle ones keep only their used bytes (none: released),
 * under-used ones shrink to their used bytes but not below the initial capacity. */
static size_t cleanup_target(const gpumem_buffer *b, uint64_t now)
{
    if (b->cfg.shrink == GPUMEM_SHRINK_NEVER || !b->capacity) return b->capacity;
    bool idle = b->cfg.idle_seconds > 0 && now > b->last_access_ns &&
                (double)(now - b->last_access_ns) >= b->cfg.idle_seconds * 1e9;
    if (idle) return b->used ? round_512(b->used) : 0;
    if (underused(b)) return underuse_target(b);
    return b->capacity;
}

gpumem_status gpumem_buffers_cleanup(size_t *released_bytes)
{
    size_t released = 0;
    int first_error = GPUMEM_OK;
    pthread_rwlock_rdlock(&registry_lock);
    for (gpumem_buffer *b = by_handle; b; b = b->hh_handle.next) {
        pthread_mutex_lock(&b->lock);
        size_t before = b->capacity, target = cleanup_target(b, gm_coarse_now_ns());
        int rc = GPUMEM_OK;
        if (target < before && (rc = check_memory(b, "gpumem_buffers_cleanup")) == GPUMEM_OK)
            rc = shrink_to(b, target, GM_CALLSITE());
        if (rc == GPUMEM_OK) released += before - b->capacity;
        else if (first_error == GPUMEM_OK) first_error = rc;
        pthread_mutex_unlock(&b->lock);
    }
    pthread_rwlock_unlock(&registry_lock);
    if (released_bytes) *released_bytes = released;
    return first_error;
}

const char *gpumem_buffer_last_error(void) { return last_error; }
