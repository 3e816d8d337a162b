/* The shared budget: one limit per device for every process that names the same GPUMEM_SHARED
 * file (the processes of a pod or a Slurm job). Design: docs/architecture.md, "The shared budget".
 *
 * The file is a fixed-size region mapped shared by every member:
 *  - a header: magic, layout version, the boot it was made in, a robust process-shared mutex,
 *    and one entry per device UUID (the group's limit, its usage and peak);
 *  - 1024 member slots: pid, process start, and the bytes the member reserved per device entry.
 *
 * Liveness needs no pid: a member holds an open-file-description lock on its slot's first byte,
 * which the kernel drops when the process dies however it dies, and which a reused pid cannot
 * hold. Every attached process holds a shared lock on byte 0, so a region of another layout is
 * only re-initialised when nobody has it open. The mutex is robust: a member killed while holding
 * it hands it on as EOWNERDEAD, and the next holder recounts the usage from the slots.
 *
 * Only segment reservations come here (account/limits.c), never a pool hit. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "gm_account.h"

/* ------------------------------------------------------------------ the region's layout */

#define LEDGER_MAGIC "gpumem-ledger"
#define LEDGER_LAYOUT 1u
#define LEDGER_DEVICES GM_LEDGER_DEVICES
#define LEDGER_SLOTS 1024
#define LOCK_WAIT_S 2 /* a holder stalled this long is logged, then waited for again */

typedef struct ledger_device {
    unsigned char uuid[16];
    uint64_t limit; /* bytes; 0 = none */
    uint64_t used;  /* the sum of the members' reserved[] (recounted after a holder died) */
    uint64_t peak;
} ledger_device;

enum { SLOT_FREE = 0, SLOT_MEMBER = 1 };

typedef struct ledger_slot {
    uint32_t state;
    uint32_t pid;
    uint64_t start; /* the member's start time (clock ticks after boot), for reports */
    char comm[16];
    uint64_t reserved[LEDGER_DEVICES];
    /* written by the member itself (gm_ledger_publish), word by word; odd `seq` while it writes */
    uint64_t seq;
    struct ledger_published {
        uint64_t published_ns, ntop;
        gm_ledger_published figures[LEDGER_DEVICES];
        gm_ledger_top top[GM_LEDGER_TOP];
    } pub;
} ledger_slot;
#define PUB_WORDS (sizeof(struct ledger_published) / sizeof(uint64_t))
_Static_assert(sizeof(struct ledger_published) % sizeof(uint64_t) == 0, "published words");

typedef struct ledger_header {
    char magic[16]; /* written last: a creator that died half-way leaves zeros */
    uint32_t layout, header_bytes;
    uint64_t region_bytes;
    char boot_id[40];
    uint64_t generation; /* bumped at every (re)initialisation */
    pthread_mutex_t lock;
    uint32_t holder; /* pid holding the lock, for the stall warning */
    uint32_t ndevices;
    ledger_device devices[LEDGER_DEVICES];
} ledger_header;

typedef struct ledger_region {
    ledger_header h;
    ledger_slot slots[LEDGER_SLOTS];
} ledger_region;

/* ------------------------------------------------------------------ this process's view */

static struct {
    ledger_region *r;
    int fd;         /* our own open file description: its locks are our liveness */
    _Atomic int slot;       /* -1 until the first reservation (written under the region's lock,
                             * read without it by the publisher and early checks) */
    _Atomic pid_t slot_pid; /* getpid() when the slot was taken: a fork child sees another pid */
    _Atomic bool on;        /* set last at open: L.r and L.fd are ready when it reads true */
    char path[4096];
} L = {.fd = -1, .slot = -1};

bool gm_ledger_on(void) { return L.on; }
const char *gm_ledger_path(void) { return L.on ? L.path : NULL; }

/* Bad settings stop the program like config.c's (with _exit: this can run inside the first
 * cudaMalloc, where atexit handlers would meet a half-started manager). */
__attribute__((format(printf, 1, 2), noreturn)) static void ledger_fatal(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "gpumem: GPUMEM_SHARED=%s: %s\n", L.path, line);
    fflush(stderr);
    _exit(2);
}

static off_t slot_lock_offset(int i) { return (off_t)offsetof(ledger_region, slots) + (off_t)i * (off_t)sizeof(ledger_slot); }

/* An OFD lock (F_OFD_*): owned by our open file description, dropped when the process dies. */
static int ofd_lock(int cmd, short type, off_t start, off_t len, struct flock *out)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    int rc = fcntl(L.fd, cmd, &fl);
    if (out) *out = fl;
    return rc;
}

/* Someone else holds a lock that conflicts with a write lock on [start, start+len). */
static bool locked_by_other(off_t start, off_t len)
{
    struct flock fl;
    if (ofd_lock(F_OFD_GETLK, F_WRLCK, start, len, &fl) != 0) return true; /* unknown: alive */
    return fl.l_type != F_UNLCK;
}

/* ------------------------------------------------------------------ the lock */

/* The member killed while holding the lock may have been half-way through an update: recount. */
static void recount_locked(void)
{
    ledger_header *h = &L.r->h;
    for (uint32_t e = 0; e < h->ndevices && e < LEDGER_DEVICES; e++) {
        uint64_t sum = 0;
        for (int i = 0; i < LEDGER_SLOTS; i++)
            if (L.r->slots[i].state == SLOT_MEMBER) sum += L.r->slots[i].reserved[e];
        __atomic_store_n(&h->devices[e].used, sum, __ATOMIC_RELAXED);
    }
}

static bool ledger_lock(void)
{
    ledger_header *h = &L.r->h;
    for (;;) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += LOCK_WAIT_S;
        int rc = pthread_mutex_timedlock(&h->lock, &deadline);
        if (rc == 0) break;
        if (rc == EOWNERDEAD) {
            gm_log(GM_WARN, "shared budget %s: a member died holding its lock; usage recounted", L.path);
            pthread_mutex_consistent(&h->lock);
            recount_locked();
            break;
        }
        if (rc == ETIMEDOUT) {
            gm_log(GM_WARN, "shared budget %s: pid %u has held its lock for %d s (stopped?); waiting",
                   L.path, __atomic_load_n(&h->holder, __ATOMIC_RELAXED), LOCK_WAIT_S);
            continue;
        }
        gm_log(GM_ERROR, "shared budget %s: its lock cannot be taken (%s); allocations that need the budget fail",
               L.path, strerror(rc));
        return false;
    }
    h->holder = (uint32_t)getpid();
    return true;
}

static void ledger_unlock(void)
{
    L.r->h.holder = 0;
    pthread_mutex_unlock(&L.r->h.lock);
}

/* ------------------------------------------------------------------ members */

static bool slot_alive(int i) { return i == L.slot || locked_by_other(slot_lock_offset(i), 1); }

static void release_slot_locked(int i)
{
    ledger_slot *s = &L.r->slots[i];
    ledger_header *h = &L.r->h;
    for (uint32_t e = 0; e < h->ndevices && e < LEDGER_DEVICES; e++) {
        uint64_t used = h->devices[e].used;
        __atomic_store_n(&h->devices[e].used, used >= s->reserved[e] ? used - s->reserved[e] : 0,
                         __ATOMIC_RELAXED);
    }
    memset(s, 0, sizeof *s);
}

/* Takes back the shares of members that died (SIGKILL, OOM killer) without giving them back. */
static void reclaim_dead_locked(void)
{
    for (int i = 0; i < LEDGER_SLOTS; i++) {
        ledger_slot *s = &L.r->slots[i];
        if (s->state != SLOT_MEMBER || slot_alive(i)) continue;
        gm_log(GM_INFO, "shared budget %s: took back the share of pid %u, which is gone", L.path, s->pid);
        release_slot_locked(i);
    }
}

/* Field 22 of /proc/self/stat: when the process started. */
static uint64_t own_start_time(void)
{
    char buf[1024];
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    for (int field = 2; p && field < 22; field++) p = strchr(p + 1, ' ');
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

static bool take_slot_locked(int i)
{
    if (ofd_lock(F_OFD_SETLK, F_WRLCK, slot_lock_offset(i), 1, NULL) != 0) return false;
    ledger_slot *s = &L.r->slots[i];
    memset(s, 0, sizeof *s);
    s->state = SLOT_MEMBER;
    s->pid = (uint32_t)getpid();
    s->start = own_start_time();
    const char *prog = strrchr(gm_program_path(), '/');
    snprintf(s->comm, sizeof s->comm, "%s", prog ? prog + 1 : gm_program_path());
    L.slot = i;
    L.slot_pid = getpid();
    return true;
}

static void leave_at_exit(void);

/* This process's slot, taken at its first reservation: free slots first (no system call), then
 * those of dead members. */
static bool claim_slot_locked(void)
{
    if (L.slot >= 0 && L.slot_pid == getpid()) return true;
    for (int i = 0; i < LEDGER_SLOTS; i++)
        if (L.r->slots[i].state == SLOT_FREE && take_slot_locked(i)) return true;
    reclaim_dead_locked();
    for (int i = 0; i < LEDGER_SLOTS; i++)
        if (L.r->slots[i].state == SLOT_FREE && take_slot_locked(i)) return true;
    return false;
}

/* At a normal exit the driver frees what the process still holds: so does the group. */
static void leave_at_exit(void)
{
    if (!L.on || L.slot < 0 || L.slot_pid != getpid() || !ledger_lock()) return;
    release_slot_locked(L.slot);
    ofd_lock(F_OFD_SETLK, F_UNLCK, slot_lock_offset(L.slot), 1, NULL);
    L.slot = -1;
    ledger_unlock();
}

/* A fork child is not a member until it reserves itself; the inherited description (and the
 * parent's locks on it) stays the parent's. */
static void child_after_fork(void)
{
    if (!L.on) return;
    L.slot = -1;
    int fd = open(L.path, O_RDWR | O_CLOEXEC);
    close(L.fd);
    L.fd = fd;
    if (fd >= 0) ofd_lock(F_OFD_SETLK, F_RDLCK, 0, 1, NULL);
}

/* ------------------------------------------------------------------ budget */

static bool fits(const ledger_device *d, uint64_t bytes)
{
    return !d->limit || (bytes <= d->limit && d->used <= d->limit - bytes);
}

bool gm_ledger_reserve(int entry, uint64_t bytes)
{
    if (!L.on || entry < 0 || entry >= LEDGER_DEVICES || !ledger_lock()) return false;
    bool ok = claim_slot_locked();
    if (!ok) gm_log(GM_ERROR, "shared budget %s: all %d member slots are taken; the allocation fails",
                    L.path, LEDGER_SLOTS);
    ledger_device *d = &L.r->h.devices[entry];
    if (ok && !fits(d, bytes)) {
        reclaim_dead_locked();
        ok = fits(d, bytes);
    }
    if (ok) {
        L.r->slots[L.slot].reserved[entry] += bytes;
        __atomic_store_n(&d->used, d->used + bytes, __ATOMIC_RELAXED);
        if (d->used > d->peak) d->peak = d->used;
    }
    ledger_unlock();
    return ok;
}

void gm_ledger_unreserve(int entry, uint64_t bytes)
{
    if (!L.on || entry < 0 || entry >= LEDGER_DEVICES || L.slot < 0 || L.slot_pid != getpid()) return;
    if (!ledger_lock()) return;
    uint64_t *mine = &L.r->slots[L.slot].reserved[entry];
    if (bytes > *mine) bytes = *mine; /* never give back another member's share */
    *mine -= bytes;
    ledger_device *d = &L.r->h.devices[entry];
    __atomic_store_n(&d->used, d->used >= bytes ? d->used - bytes : 0, __ATOMIC_RELAXED);
    ledger_unlock();
}

uint64_t gm_ledger_headroom(int entry)
{
    if (!L.on || entry < 0 || entry >= LEDGER_DEVICES) return 0;
    const ledger_device *d = &L.r->h.devices[entry];
    uint64_t limit = d->limit, used = __atomic_load_n(&d->used, __ATOMIC_RELAXED);
    if (!limit) return UINT64_MAX;
    return used >= limit ? 0 : limit - used;
}

static int entry_of_locked(const unsigned char uuid[16])
{
    for (uint32_t e = 0; e < L.r->h.ndevices && e < LEDGER_DEVICES; e++)
        if (memcmp(L.r->h.devices[e].uuid, uuid, 16) == 0) return (int)e;
    return -1;
}

void gm_ledger_uuid_text(const unsigned char u[16], char out[41])
{
    snprintf(out, 41, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", u[0], u[1],
             u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

int gm_ledger_bind(const unsigned char uuid[16], uint64_t limit)
{
    if (!L.on || !ledger_lock()) return -1;
    ledger_header *h = &L.r->h;
    int e = entry_of_locked(uuid);
    char name[41];
    gm_ledger_uuid_text(uuid, name);
    if (e >= 0 && h->devices[e].limit != limit) {
        unsigned long long theirs = h->devices[e].limit;
        ledger_unlock();
        ledger_fatal("the group's limit for %s is %llu bytes (%s) but this process's GPUMEM_LIMIT gives it "
                     "%llu bytes (%s); every process of a group must set the same limit, or name another file",
                     name, theirs, theirs ? "set by its first member" : "none", (unsigned long long)limit,
                     limit ? "GPUMEM_LIMIT" : "none");
    }
    if (e < 0) {
        if (h->ndevices >= LEDGER_DEVICES) {
            ledger_unlock();
            ledger_fatal("the region already holds %d devices, its most; %s does not fit", LEDGER_DEVICES, name);
        }
        e = (int)h->ndevices;
        memcpy(h->devices[e].uuid, uuid, 16);
        h->devices[e].limit = limit;
        h->ndevices++;
        gm_log(GM_INFO, "shared budget %s: %s joined with a limit of %llu bytes", L.path, name,
               (unsigned long long)limit);
    }
    ledger_unlock();
    return e;
}

static void figures_locked(int e, gm_ledger_figures *out)
{
    reclaim_dead_locked();
    const ledger_device *d = &L.r->h.devices[e];
    *out = (gm_ledger_figures){d->limit, d->used, d->peak, 0};
    for (int i = 0; i < LEDGER_SLOTS; i++)
        out->members += L.r->slots[i].state == SLOT_MEMBER && L.r->slots[i].reserved[e] > 0;
}

bool gm_ledger_figures_of(const unsigned char uuid[16], gm_ledger_figures *out)
{
    if (!L.on || !ledger_lock()) return false;
    int e = entry_of_locked(uuid);
    if (e >= 0) figures_locked(e, out);
    ledger_unlock();
    return e >= 0;
}

bool gm_ledger_figures_at(int entry, gm_ledger_figures *out)
{
    if (!L.on || entry < 0 || entry >= LEDGER_DEVICES || !ledger_lock()) return false;
    bool known = (uint32_t)entry < L.r->h.ndevices;
    if (known) figures_locked(entry, out);
    ledger_unlock();
    return known;
}

int gm_ledger_members_of(const unsigned char uuid[16], gm_ledger_member *out, int max)
{
    if (!L.on || !ledger_lock()) return 0;
    int e = entry_of_locked(uuid), n = 0;
    if (e >= 0) reclaim_dead_locked();
    for (int i = 0; e >= 0 && i < LEDGER_SLOTS; i++) {
        const ledger_slot *s = &L.r->slots[i];
        if (s->state != SLOT_MEMBER || s->reserved[e] == 0) continue;
        if (n < max) out[n] = (gm_ledger_member){s->pid, s->reserved[e]};
        n++;
    }
    ledger_unlock();
    return n;
}

/* ------------------------------------------------------------------ opening the region */

static void read_boot_id(char out[40])
{
    memset(out, 0, 40);
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    ssize_t n = read(fd, out, 39);
    close(fd);
    if (n > 0 && out[n - 1] == '\n') out[n - 1] = 0;
}

static void check_path(const char *path)
{
    size_t n = strlen(path);
    if (path[0] != '/')
        ledger_fatal("the path must be absolute (the processes of a group may run in different directories)");
    if (path[n - 1] == '/') ledger_fatal("the path names a directory; give the path of a file in it");
}

/* Writes a fresh region into the open file (we hold its flock). */
static void initialise(int fd, const char *why)
{
    size_t bytes = sizeof(ledger_region);
    /* Allocated, not sparse: a full tmpfs fails here, not with SIGBUS at a later store. */
    int rc = posix_fallocate(fd, 0, (off_t)bytes);
    if (rc != 0)
        ledger_fatal("no space for the region's %zu bytes (%s)%s", bytes, strerror(rc),
                     rc == ENOSPC ? ": the filesystem (is /dev/shm full?) has no room" : "");
    if (ftruncate(fd, (off_t)bytes) != 0) /* a larger file of another layout */
        ledger_fatal("cannot size the region to %zu bytes: %s", bytes, strerror(errno));
    ledger_region *r = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (r == MAP_FAILED) ledger_fatal("cannot map the region: %s", strerror(errno));
    uint64_t generation = memcmp(r->h.magic, LEDGER_MAGIC, sizeof LEDGER_MAGIC) == 0 ? r->h.generation + 1 : 1;
    memset(r, 0, bytes);
    r->h.layout = LEDGER_LAYOUT;
    r->h.header_bytes = (uint32_t)sizeof(ledger_header);
    r->h.region_bytes = bytes;
    r->h.generation = generation;
    read_boot_id(r->h.boot_id);
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&r->h.lock, &a);
    pthread_mutexattr_destroy(&a);
    /* The magic last, its first byte a release store (a fence would do, but -fsanitize=thread
     * refuses atomic_thread_fence, and the TSan build has warnings as errors). */
    memcpy(r->h.magic + 1, LEDGER_MAGIC + 1, sizeof LEDGER_MAGIC - 1);
    __atomic_store_n(&r->h.magic[0], LEDGER_MAGIC[0], __ATOMIC_RELEASE);
    munmap(r, bytes);
    gm_log(GM_INFO, "shared budget %s: initialised (%s)", L.path, why);
}

static bool all_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return false;
    return true;
}

/* Under the file's flock: keeps a good region, initialises an empty, half-made or stale one, and
 * refuses anything else without writing to it. */
static void check_or_initialise(int fd, off_t size)
{
    ledger_header h;
    memset(&h, 0, sizeof h);
    if (size == 0) {
        initialise(fd, "new");
        return;
    }
    ssize_t got = pread(fd, &h, sizeof h, 0);
    if (got < 0) ledger_fatal("cannot read it: %s", strerror(errno));
    if (all_zero(&h, (size_t)got)) {
        initialise(fd, "its maker stopped half-way");
        return;
    }
    if ((size_t)got < sizeof h.magic || memcmp(h.magic, LEDGER_MAGIC, sizeof LEDGER_MAGIC) != 0)
        ledger_fatal("the file holds other data, not a gpumem shared budget; it is left as it is (remove it "
                     "or name another file)");
    bool same_layout = (size_t)got == sizeof h && h.layout == LEDGER_LAYOUT &&
                       h.header_bytes == sizeof(ledger_header) && h.region_bytes == sizeof(ledger_region) &&
                       size == (off_t)sizeof(ledger_region);
    if (!same_layout) {
        if (locked_by_other(0, 0))
            ledger_fatal("the region was made by a gpumem of another layout (%u; this one uses %u) and is in use; "
                         "give this group another file", h.layout, LEDGER_LAYOUT);
        initialise(fd, "it was made by another layout version and nobody uses it");
        return;
    }
    char boot[40];
    read_boot_id(boot);
    if (memcmp(boot, h.boot_id, sizeof boot) != 0) initialise(fd, "it was made before the last boot");
}

/* Mapped through an open file description of its own: a mapping keeps its file open, so a
 * mapping of the locked description, inherited by a fork child, would keep a dead member alive. */
static ledger_region *map_region(void)
{
    int fd = open(L.path, O_RDWR | O_CLOEXEC);
    if (fd < 0) ledger_fatal("cannot open it again to map it: %s", strerror(errno));
    ledger_region *r = mmap(NULL, sizeof(ledger_region), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (r == MAP_FAILED) ledger_fatal("cannot map the region: %s", strerror(errno));
    return r;
}

void gm_ledger_open(const gm_config *cfg)
{
    if (L.on || !cfg->shared[0] || strcmp(cfg->shared, "off") == 0) return;
    snprintf(L.path, sizeof L.path, "%s", cfg->shared);
    check_path(L.path);
    L.fd = open(L.path, O_RDWR | O_CREAT | O_CLOEXEC, 0660);
    if (L.fd < 0)
        ledger_fatal("cannot open or create it: %s%s", strerror(errno),
                     errno == EACCES ? " (the group's members need read and write permission)" : "");
    struct stat st;
    if (fstat(L.fd, &st) != 0 || !S_ISREG(st.st_mode)) ledger_fatal("it is not a regular file");
    if (flock(L.fd, LOCK_EX) != 0) ledger_fatal("cannot lock it: %s", strerror(errno));
    /* Sized again under the flock: the size read before it may be that of the empty file which
     * another member has since initialised and reserved in; initialising again would wipe it. */
    if (fstat(L.fd, &st) != 0) ledger_fatal("cannot read its size: %s", strerror(errno));
    check_or_initialise(L.fd, st.st_size);
    /* Attached: a shared lock on byte 0 tells a later gpumem of another layout that we are here. */
    if (ofd_lock(F_OFD_SETLK, F_RDLCK, 0, 1, NULL) != 0) ledger_fatal("cannot lock it: %s", strerror(errno));
    flock(L.fd, LOCK_UN);
    L.r = map_region();
    static const gm_fork_handlers handlers = {NULL, NULL, child_after_fork};
    gm_fork_register(GM_FORK_LEDGER, &handlers);
    /* Registered before the exit report's hook (the manager starts before the report installs
     * it): exit handlers run last-in first-out, so the report still sees the group's figures. */
    atexit(leave_at_exit);
    L.on = true;
    gm_log(GM_INFO, "shared budget %s: attached (generation %llu)", L.path, (unsigned long long)L.r->h.generation);
}

/* ------------------------------------------------------------------ publishing and reading */

/* Written under the region's lock (once a second), so the slot cannot be given up meanwhile (an
 * exit, a fork child). For readers, who never lock, a sequence count without fences
 * (ThreadSanitizer has none): the odd count is an acquire-release read-modify-write, so no word
 * store moves above it; the even one a release store. */
void gm_ledger_publish(const gm_ledger_published *figures, const gm_ledger_top *top, int ntop)
{
    if (!L.on || L.slot < 0 || L.slot_pid != getpid()) return;
    struct ledger_published pub;
    memset(&pub, 0, sizeof pub);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    pub.published_ns = (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
    pub.ntop = (uint64_t)(ntop < 0 ? 0 : ntop > GM_LEDGER_TOP ? GM_LEDGER_TOP : ntop);
    memcpy(pub.figures, figures, sizeof pub.figures);
    if (pub.ntop) memcpy(pub.top, top, pub.ntop * sizeof *top);
    if (!ledger_lock()) return;
    int slot = L.slot;
    if (slot >= 0 && L.slot_pid == getpid()) {
        ledger_slot *s = &L.r->slots[slot];
        const uint64_t *from = (const uint64_t *)&pub;
        uint64_t *to = (uint64_t *)&s->pub;
        uint64_t seq = __atomic_fetch_add(&s->seq, 1, __ATOMIC_ACQ_REL);
        for (size_t w = 0; w < PUB_WORDS; w++) __atomic_store_n(&to[w], from[w], __ATOMIC_RELAXED);
        __atomic_store_n(&s->seq, seq + 2, __ATOMIC_RELEASE);
    }
    ledger_unlock();
}

/* A consistent copy of what a member published: acquire loads keep the second look at `seq`
 * after every word. False when the member kept writing (a reader then shows no figures). */
static bool copy_published(const ledger_slot *s, struct ledger_published *out)
{
    for (int tries = 0; tries < 1000; tries++) {
        uint64_t before = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        const uint64_t *from = (const uint64_t *)&s->pub;
        uint64_t *to = (uint64_t *)out;
        for (size_t w = 0; w < PUB_WORDS; w++) to[w] = __atomic_load_n(&from[w], __ATOMIC_ACQUIRE);
        if (!(before & 1) && __atomic_load_n(&s->seq, __ATOMIC_RELAXED) == before) return true;
    }
    memset(out, 0, sizeof *out);
    return false;
}

static int view_fail(char *err, size_t cap, int fd, const char *fmt, const char *what)
{
    snprintf(err, cap, fmt, what);
    if (fd >= 0) close(fd);
    return -1;
}

static void view_member(const ledger_region *r, int fd, int i, gm_ledger_view_member *m)
{
    const ledger_slot *s = &r->slots[i];
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = slot_lock_offset(i), .l_len = 1};
    m->alive = fcntl(fd, F_OFD_GETLK, &fl) != 0 || fl.l_type != F_UNLCK;
    m->pid = __atomic_load_n(&s->pid, __ATOMIC_RELAXED);
    m->start = __atomic_load_n(&s->start, __ATOMIC_RELAXED);
    memcpy(m->comm, s->comm, sizeof m->comm);
    m->comm[sizeof m->comm - 1] = 0;
    for (int e = 0; e < LEDGER_DEVICES; e++) m->reserved[e] = __atomic_load_n(&s->reserved[e], __ATOMIC_RELAXED);
    struct ledger_published pub;
    copy_published(s, &pub);
    m->published_ns = pub.published_ns;
    memcpy(m->figures, pub.figures, sizeof m->figures);
    m->ntop = (int)(pub.ntop > GM_LEDGER_TOP ? GM_LEDGER_TOP : pub.ntop);
    memcpy(m->top, pub.top, sizeof m->top);
    for (int t = 0; t < m->ntop; t++) m->top[t].where[sizeof m->top[t].where - 1] = 0;
}

static void view_members(const ledger_region *r, int fd, gm_ledger_view *out)
{
    out->members = calloc(LEDGER_SLOTS, sizeof *out->members);
    for (int i = 0; out->members && i < LEDGER_SLOTS; i++)
        if (__atomic_load_n(&r->slots[i].state, __ATOMIC_ACQUIRE) == SLOT_MEMBER)
            view_member(r, fd, i, &out->members[out->nmembers++]);
}

int gm_ledger_view_read(const char *path, gm_ledger_view *out, char *err, size_t cap)
{
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return view_fail(err, cap, -1, "cannot open it: %s", strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return view_fail(err, cap, fd, "%s", "it is not a regular file");
    if (st.st_size != (off_t)sizeof(ledger_region))
        return view_fail(err, cap, fd, "%s", "it is not a gpumem shared budget of this version (its size differs)");
    ledger_region *r = mmap(NULL, sizeof *r, PROT_READ, MAP_SHARED, fd, 0);
    if (r == MAP_FAILED) return view_fail(err, cap, fd, "cannot map it: %s", strerror(errno));
    if (memcmp(r->h.magic, LEDGER_MAGIC, sizeof LEDGER_MAGIC) != 0 || r->h.layout != LEDGER_LAYOUT) {
        munmap(r, sizeof *r);
        return view_fail(err, cap, fd, "%s", "it is not a gpumem shared budget of this version");
    }
    out->generation = r->h.generation;
    out->ndevices = (int)(r->h.ndevices < LEDGER_DEVICES ? r->h.ndevices : LEDGER_DEVICES);
    for (int e = 0; e < out->ndevices; e++) {
        memcpy(out->devices[e].uuid, r->h.devices[e].uuid, 16);
        out->devices[e].limit = r->h.devices[e].limit;
        out->devices[e].used = __atomic_load_n(&r->h.devices[e].used, __ATOMIC_RELAXED);
        out->devices[e].peak = r->h.devices[e].peak;
    }
    view_members(r, fd, out);
    munmap(r, sizeof *r);
    close(fd);
    return 0;
}

void gm_ledger_view_free(gm_ledger_view *v)
{
    free(v->members);
    v->members = NULL;
    v->nmembers = 0;
}
