/* CUDA IPC of pooled blocks (design in gm_ipc.h and docs/architecture.md, "IPC").
 *
 * Exporter: a registry file per process, <GPUMEM_IPC_DIR>/gpumem-ipc.<pid>.<nonce>, created 0600
 * with O_EXCL and mapped shared; one slot per exported block (nonce, the driver's handle of its
 * segment, offset, requested size, importer count). Importers read it with pread and map only the
 * page of their slot, to count themselves in and out.
 *
 * Receiver: an import table. Each (context, driver handle of a segment) is opened once through the
 * driver and refcounted; each gpumem handle opened is an entry with its own refcount.
 *
 * Locks: a heap's lock may be held when the registry lock is taken, never the other way round.
 * The import lock is taken with no heap lock held. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "gm_ipc.h"

/* ------------------------------------------------------------------ formats */

/* A gpumem handle. The driver checks the size at bytes 16..23 and fields at 24, 32 and 48 (measured
 * on the H200, docs/gpu-runs/identity_probe_driver.txt): with 16..23, 32..39 and 48..55 zero it is
 * refused (CUDA_ERROR_INVALID_VALUE) by a process that does not run under gpumem, never opened as
 * some other allocation. */
#define IPC_MAGIC "gpumem-ipc-v1"
typedef struct ipc_wire {
    char magic[16];
    uint64_t zero16;
    uint64_t proc_nonce; /* the exporter's process start: a reused pid never matches */
    uint64_t zero32;
    uint64_t slot_nonce; /* the slot's use: a reused slot never matches */
    uint64_t zero48;
    uint32_t pid;
    uint32_t slot;
} ipc_wire;
_Static_assert(sizeof(ipc_wire) == GM_IPC_HANDLE_SIZE, "a gpumem handle is a CUipcMemHandle");

#define IPC_FILE_MAGIC "gpumem-ipc-reg1"
typedef struct ipc_file_header {
    char magic[16];
    uint32_t pid, slot_size;
    uint64_t proc_nonce;
    uint64_t reserved[4];
} ipc_file_header;

typedef struct ipc_slot {
    _Atomic uint64_t nonce; /* 0: free, or retired (its block was freed) */
    unsigned char handle[GM_IPC_HANDLE_SIZE]; /* the driver's handle of the segment */
    uint64_t offset, size;  /* the block in the segment; its requested size */
    _Atomic uint32_t importers; /* processes that have it open */
    uint32_t reserved;
} ipc_slot;

/* A slot of a block in an expandable segment holds this in place of the driver's handle (which
 * VMM memory has none of): the chunks the block lies in, in the exporter's address space. The
 * importer maps the same chunks, fetched as file descriptors from the exporter (see "expandable
 * segments" below), and the block lies `offset` bytes into them. */
#define IPC_VMM_MAGIC "gm-vmm1"
typedef struct ipc_vmm_desc {
    char magic[8];
    uint64_t first;   /* the exporter's address of the first chunk */
    uint64_t chunk;   /* bytes per chunk */
    uint64_t nchunks;
    uint64_t ctx;     /* the exporter's context (read by the exporter only) */
    uint64_t reserved[3];
} ipc_vmm_desc;
_Static_assert(sizeof(ipc_vmm_desc) == GM_IPC_HANDLE_SIZE, "a chunk descriptor fills a slot's handle");

static bool desc_of_slot(const unsigned char handle[GM_IPC_HANDLE_SIZE], ipc_vmm_desc *d)
{
    memcpy(d, handle, sizeof *d);
    return !memcmp(d->magic, IPC_VMM_MAGIC, sizeof d->magic) && d->chunk && d->nchunks;
}

/* The file is mapped once over this much address space and grown under it, so slot pointers stay
 * valid without a lock (about 700000 slots). */
#define IPC_MAP_RESERVE ((size_t)64 << 20)
#define IPC_FIRST_SLOTS 1024u

static off_t slot_offset(uint32_t i)
{
    return (off_t)(sizeof(ipc_file_header) + (size_t)i * sizeof(ipc_slot));
}

static void registry_path(char *out, size_t cap, uint32_t pid, uint64_t nonce)
{
    snprintf(out, cap, "%s/gpumem-ipc.%u.%016llx", gm_mgr.cfg->ipc_dir, (unsigned)pid,
             (unsigned long long)nonce);
}

/* ------------------------------------------------------------------ process life */

static struct {
    pthread_mutex_t lock;
    pid_t owner; /* the process that made the file; a fork child makes its own */
    int fd;
    uint64_t nonce;
    char path[4200];
    unsigned char *map;
    uint32_t cap, next;   /* slots the file holds; slots ever handed out */
    uint32_t *free_slots; /* retired slots no importer holds */
    uint32_t nfree, free_cap;
    uint64_t slot_seq;
    bool warned, warned_vmm;
    int server_fd; /* the chunk server's socket (expandable segments); -1 none */
} ex = {.lock = PTHREAD_MUTEX_INITIALIZER, .fd = -1, .server_fd = -1};

typedef struct ipc_map {
    struct ipc_map *next;
    uintptr_t ctx;
    unsigned char handle[GM_IPC_HANDLE_SIZE]; /* the driver's */
    uintptr_t base;
    size_t size;
    unsigned refs, plain_refs; /* all opens through it; opens of the driver's handle itself */
} ipc_map;

typedef struct ipc_import {
    struct ipc_import *next;
    ipc_map *map;     /* the segment opened through the driver; NULL for chunks (vmm below) */
    uintptr_t ctx;
    uintptr_t vbase;  /* chunks of an expandable segment: the range they are mapped in here */
    size_t vsize, chunk;
    unsigned char handle[GM_IPC_HANDLE_SIZE]; /* the gpumem handle */
    uintptr_t ptr;
    size_t size;
    uint64_t buffer_id;
    unsigned refs;
    void *page; /* the exporter's registry page holding the slot */
    size_t page_len;
    ipc_slot *slot;
} ipc_import;

static struct {
    pthread_mutex_t lock;
    ipc_map *maps;
    ipc_import *imports;
    uint64_t seq;
} im = {.lock = PTHREAD_MUTEX_INITIALIZER};
static _Atomic size_t im_maps; /* lets every range query skip the table while nothing is imported */

static void registry_remove_at_exit(void)
{
    if (ex.map && ex.owner == getpid()) unlink(ex.path);
    /* A receiver that exits with blocks open lets the exporter reuse them, as the driver does. */
    for (ipc_import *e = im.imports; e; e = e->next)
        if (e->slot) atomic_fetch_sub(&e->slot->importers, 1);
}

/* A fork child has no CUDA context: it imports nothing and exports nothing of its parent's. */
static void child_after_fork(void)
{
    pthread_mutex_init(&ex.lock, NULL);
    pthread_mutex_init(&im.lock, NULL);
    if (ex.map) munmap(ex.map, IPC_MAP_RESERVE);
    if (ex.fd >= 0) close(ex.fd);
    if (ex.server_fd >= 0) close(ex.server_fd); /* the parent's; its thread is not in the child */
    ex.server_fd = -1;
    free(ex.free_slots);
    ex.map = NULL;
    ex.fd = -1;
    ex.free_slots = NULL;
    ex.nfree = ex.free_cap = ex.cap = ex.next = 0;
    im.maps = NULL;
    im.imports = NULL;
    atomic_store(&im_maps, 0);
}

static void install_handlers(void)
{
    static const gm_fork_handlers handlers = {NULL, NULL, child_after_fork};
    gm_fork_register(GM_FORK_IPC, &handlers);
    atexit(registry_remove_at_exit);
}

static void ipc_setup(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, install_handlers);
}

/* ------------------------------------------------------------------ exporter: the registry */

static uint64_t fresh_nonce(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) != (ssize_t)sizeof v || v == 0)
        v = (gm_now_ns() ^ ((uint64_t)getpid() << 32)) | 1;
    return v;
}

static ipc_slot *slot_at(uint32_t i)
{
    return (ipc_slot *)(ex.map + slot_offset(i));
}

static bool registry_create_locked(void)
{
    uint64_t nonce = fresh_nonce();
    registry_path(ex.path, sizeof ex.path, (uint32_t)getpid(), nonce);
    int fd = open(ex.path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return false;
    void *m = MAP_FAILED;
    if (ftruncate(fd, slot_offset(IPC_FIRST_SLOTS)) == 0)
        m = mmap(NULL, IPC_MAP_RESERVE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        close(fd);
        unlink(ex.path);
        return false;
    }
    ipc_file_header *h = m;
    memcpy(h->magic, IPC_FILE_MAGIC, sizeof IPC_FILE_MAGIC);
    h->pid = (uint32_t)getpid();
    h->slot_size = sizeof(ipc_slot);
    h->proc_nonce = nonce;
    ex.owner = getpid();
    ex.fd = fd;
    ex.nonce = nonce;
    ex.map = m;
    ex.cap = IPC_FIRST_SLOTS;
    ex.next = ex.nfree = 0;
    return true;
}

static bool registry_ready_locked(void)
{
    if (ex.map && ex.owner == getpid()) return true;
    if (!registry_create_locked()) {
        gm_log(GM_ERROR, "cannot create the IPC registry in %s (GPUMEM_IPC_DIR): %m",
               gm_mgr.cfg->ipc_dir);
        return false;
    }
    return true;
}

static bool registry_grow_locked(void)
{
    uint32_t cap = ex.cap * 2;
    if ((size_t)slot_offset(cap) > IPC_MAP_RESERVE) return false;
    if (ftruncate(ex.fd, slot_offset(cap)) != 0) return false;
    ex.cap = cap;
    return true;
}

static int slot_new_locked(const unsigned char seg_handle[GM_IPC_HANDLE_SIZE], uint64_t offset,
                           uint64_t size, uint32_t *out)
{
    uint32_t i;
    if (ex.nfree) {
        i = ex.free_slots[--ex.nfree];
    } else {
        if (ex.next == ex.cap && !registry_grow_locked()) return GPUMEM_ERROR_OUT_OF_MEMORY;
        i = ex.next++;
    }
    ipc_slot *s = slot_at(i);
    memcpy(s->handle, seg_handle, GM_IPC_HANDLE_SIZE);
    s->offset = offset;
    s->size = size;
    /* The importer count is left as it is: a late importer that counted itself in on the slot's
     * previous use counts itself out again. Publishing the nonce makes the fields visible. */
    atomic_store(&s->nonce, ++ex.slot_seq);
    *out = i;
    return GPUMEM_OK;
}

static void slot_release_locked(uint32_t i)
{
    if (ex.nfree == ex.free_cap) {
        uint32_t cap = ex.free_cap ? ex.free_cap * 2 : 64;
        uint32_t *grown = realloc(ex.free_slots, cap * sizeof *grown);
        if (!grown) return; /* the slot is lost, nothing else */
        ex.free_slots = grown;
        ex.free_cap = cap;
    }
    ex.free_slots[ex.nfree++] = i;
}

static void wire_make(uint32_t slot, uint64_t slot_nonce, unsigned char out[GM_IPC_HANDLE_SIZE])
{
    ipc_wire w;
    memset(&w, 0, sizeof w);
    memcpy(w.magic, IPC_MAGIC, sizeof IPC_MAGIC);
    w.proc_nonce = ex.nonce;
    w.slot_nonce = slot_nonce;
    w.pid = (uint32_t)getpid();
    w.slot = slot;
    memcpy(out, &w, sizeof w);
}

/* ------------------------------------------------------------------ exporter: blocks */

static void warn_once(uintptr_t base)
{
    if (ex.warned) return;
    ex.warned = true;
    gm_log(GM_WARN,
           "cuIpcGetMemHandle(%#llx): the block does not start its pool segment, so its handle "
           "can be opened only by a process that also runs under gpumem; a process without "
           "gpumem gets CUDA_ERROR_INVALID_VALUE from the driver (never another block)",
           (unsigned long long)base);
}

typedef struct export_job {
    const gm_block_identity *id;
    const unsigned char *seg; /* the driver's handle of the block's segment, or its chunks */
    uintptr_t origin;         /* where the importer's mapping starts, in this process */
    bool chunks;              /* an expandable segment's block: importers ask the chunk server */
    unsigned char *out;
    int rc;
} export_job;

static int server_ready_locked(void);

/* Under the block's heap lock: give it a slot (once) and write its gpumem handle. */
static void export_locked(gm_heap *h, gm_block *b, void *arg)
{
    (void)h;
    export_job *job = arg;
    if (b->buffer_id != job->id->buffer_id) { /* freed and handed out again meanwhile */
        job->rc = GPUMEM_ERROR_INVALID_VALUE;
        return;
    }
    pthread_mutex_lock(&ex.lock);
    if (!registry_ready_locked()) job->rc = GPUMEM_ERROR_OUT_OF_MEMORY;
    uint32_t slot = b->ipc_slot ? b->ipc_slot - 1 : 0;
    if (job->rc == GPUMEM_OK && !b->ipc_slot) {
        job->rc = slot_new_locked(job->seg, job->id->base - job->origin, job->id->size, &slot);
        if (job->rc == GPUMEM_OK) b->ipc_slot = slot + 1;
    }
    if (job->rc == GPUMEM_OK && job->chunks) job->rc = server_ready_locked();
    if (job->rc == GPUMEM_OK) {
        wire_make(slot, atomic_load(&slot_at(slot)->nonce), job->out);
        warn_once(job->id->base);
    }
    pthread_mutex_unlock(&ex.lock);
}

/* The gpumem handle of block `id`: the same bytes for as long as the block lives. A block freed
 * since `id` was taken gets the driver's answer for freed memory. */
static int export_slot(const gm_block_identity *id, const unsigned char seg[GM_IPC_HANDLE_SIZE],
                       uintptr_t origin, bool chunks, unsigned char out[GM_IPC_HANDLE_SIZE])
{
    export_job job = {id, seg, origin, chunks, out, GPUMEM_OK};
    gm_answer a = gm_with_live_block(id->base, export_locked, &job);
    return a.owner == GM_OURS && a.status == GPUMEM_OK ? job.rc : GPUMEM_ERROR_INVALID_VALUE;
}

/* A block of an expandable segment: the driver has no legacy handle of VMM memory, so it always
 * gets a gpumem handle whose slot names the chunks it lies in. The first chunk is exported once
 * here, so that chunks the driver would not make exportable get the driver's answer for VMM
 * memory (INVALID_VALUE) now, not at the importer. */
static int export_chunks(const gm_block_identity *id, unsigned char out[GM_IPC_HANDLE_SIZE])
{
    const gm_backend *be = gm_mgr.backend;
    size_t chunk = id->vmm_chunk;
    uintptr_t first = id->seg_base + (id->base - id->seg_base) / chunk * chunk;
    uintptr_t end = id->seg_base + (id->base + id->size - id->seg_base + chunk - 1) / chunk * chunk;
    int fd = -1;
    int rc = be->vmm_export ? be->vmm_export(id->ctx, first, &fd) : GPUMEM_ERROR_NOT_SUPPORTED;
    if (rc != GPUMEM_OK) {
        pthread_mutex_lock(&ex.lock);
        bool first_time = !ex.warned_vmm;
        ex.warned_vmm = true;
        pthread_mutex_unlock(&ex.lock);
        if (first_time)
            gm_log(GM_WARN, "cuIpcGetMemHandle(%#llx): the block lies in an expandable segment "
                   "whose memory cannot be exported (%d); CUDA_ERROR_INVALID_VALUE, as the "
                   "driver answers for VMM memory", (unsigned long long)id->base, rc);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    close(fd);
    ipc_vmm_desc d = {.first = first, .chunk = chunk, .nchunks = (end - first) / chunk, .ctx = id->ctx};
    memcpy(d.magic, IPC_VMM_MAGIC, sizeof d.magic);
    return export_slot(id, (const unsigned char *)&d, first, true, out);
}

gm_answer gm_ipc_export(uintptr_t ptr, const gm_ipc_driver *drv, unsigned char out[GM_IPC_HANDLE_SIZE])
{
    gm_block_identity id;
    gm_answer a = gm_block_identity_get(ptr, &id);
    if (a.owner != GM_OURS || a.status != GPUMEM_OK) return a;
    ipc_setup();
    if (id.vmm_chunk) return gm_ours(export_chunks(&id, out));
    unsigned char seg[GM_IPC_HANDLE_SIZE];
    int rc = drv->get_handle(seg, id.seg_base);
    if (rc != GPUMEM_OK) return gm_ours(rc);
    if (id.base == id.seg_base) { /* the segment starts where the block does: exact anywhere */
        memcpy(out, seg, sizeof seg);
        return gm_ours(GPUMEM_OK);
    }
    return gm_ours(export_slot(&id, seg, id.seg_base, false, out));
}

bool gm_ipc_quarantine_locked(gm_heap *heap, gm_block *b)
{
    uint32_t i = b->ipc_slot - 1;
    bool held = false;
    pthread_mutex_lock(&ex.lock);
    if (ex.map && ex.owner == getpid() && i < ex.next) {
        ipc_slot *s = slot_at(i);
        /* No new open from here on; an importer counts itself in before it checks the nonce, so
         * one that got in is seen here (both sides sequentially consistent). */
        atomic_store(&s->nonce, 0);
        held = atomic_load(&s->importers) != 0;
        if (!held) slot_release_locked(i);
    }
    pthread_mutex_unlock(&ex.lock);
    if (!held) {
        b->ipc_slot = 0;
        return false;
    }
    gm_heap_live_changed_locked(heap);
    b->state = GM_BLOCK_QUARANTINE; /* still counted in its segment's use: never released */
    b->fprev = NULL;
    b->fnext = heap->quarantine;
    heap->quarantine = b;
    gm_log(GM_INFO, "block %#llx freed while another process has it open: kept from reuse until "
                    "it is closed", (unsigned long long)b->addr);
    return true;
}

bool gm_ipc_reclaim_locked(gm_heap *heap)
{
    bool any = false;
    for (gm_block **pp = &heap->quarantine; *pp;) {
        gm_block *b = *pp;
        if (atomic_load(&slot_at(b->ipc_slot - 1)->importers) != 0) {
            pp = &b->fnext;
            continue;
        }
        *pp = b->fnext;
        pthread_mutex_lock(&ex.lock);
        slot_release_locked(b->ipc_slot - 1);
        pthread_mutex_unlock(&ex.lock);
        b->ipc_slot = 0;
        b->state = GM_BLOCK_LIVE; /* leaves the pool's use the way a freed block does */
        if (gm_mgr.cfg->free_sync || atomic_load(&gm_mgr.exiting)) gm_pool_free_block_locked(&heap->pool, b);
        else gm_pool_pend_block_locked(&heap->pool, b); /* fast mode: work queued before the free */
        any = true;
    }
    return any;
}

/* ------------------------------------------------------------------ expandable segments: chunks
 *
 * VMM memory has no legacy IPC handle. Its chunks are created exportable (the backend's vmm_map
 * asks for POSIX file descriptors), and an importer under gpumem receives them as descriptors
 * (SCM_RIGHTS) from a thread of the exporter that serves a unix socket in the abstract namespace,
 * named after the registry (gpumem-ipc.<pid>.<nonce>); the thread starts with the first such
 * export. A socket rather than pidfd_getfd: pidfd_getfd needs ptrace rights over the exporter,
 * which Yama (ptrace_scope 1, the default of Ubuntu and many containers) grants only to its
 * ancestors, so a worker importing from its parent or a sibling would fail. An abstract socket
 * has no file permissions: the thread serves only peers of the exporter's user or root
 * (SO_PEERCRED), and only slots the peer counted itself in to (the registry file, 0600, is the
 * first gate). The importer imports each descriptor (cuMemImportFromShareableHandle), maps it in
 * a range of its own and closes it; the mapping holds the physical memory, and the driver keeps
 * it until the last process unmaps it, so an exporter that unmaps or exits takes nothing from an
 * importer. While an importer has the block open the exporter keeps it from reuse (quarantine),
 * so its chunks are never unmapped and mapped again under the importer. */

typedef struct ipc_request {
    uint32_t slot, zero;
    uint64_t slot_nonce;
} ipc_request;
typedef struct ipc_reply {
    int32_t status;
    uint32_t count; /* descriptors in this message */
} ipc_reply;
#define IPC_FDS_PER_MSG 32
#define IPC_SOCKET_TIMEOUT_S 10

static socklen_t socket_name(struct sockaddr_un *a, uint32_t pid, uint64_t nonce)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX; /* sun_path[0] = 0: the abstract namespace, gone with the process */
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "gpumem-ipc.%u.%016llx", (unsigned)pid,
                     (unsigned long long)nonce);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

static void socket_timeouts(int fd)
{
    struct timeval tv = {IPC_SOCKET_TIMEOUT_S, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static bool send_reply(int c, int status, const int *fds, uint32_t n)
{
    ipc_reply r = {status, n};
    struct iovec iov = {&r, sizeof r};
    union {
        char buf[CMSG_SPACE(sizeof(int) * IPC_FDS_PER_MSG)];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (n) {
        memset(&u, 0, sizeof u);
        m.msg_control = u.buf;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * n);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * n);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * n);
    }
    return sendmsg(c, &m, MSG_NOSIGNAL) == (ssize_t)sizeof r;
}

/* The chunks of the slot a request names, if that use of the slot is live and some importer
 * counted itself in (the asker did, before asking). */
static bool request_desc(const ipc_request *q, ipc_vmm_desc *d)
{
    pthread_mutex_lock(&ex.lock);
    bool ok = ex.map && ex.owner == getpid() && q->slot < ex.next && q->slot_nonce &&
              atomic_load(&slot_at(q->slot)->nonce) == q->slot_nonce &&
              atomic_load(&slot_at(q->slot)->importers) != 0 &&
              desc_of_slot(slot_at(q->slot)->handle, d);
    pthread_mutex_unlock(&ex.lock);
    return ok;
}

static void serve_chunks(int c, const ipc_vmm_desc *d)
{
    int fds[IPC_FDS_PER_MSG];
    for (uint64_t i = 0; i < d->nchunks;) {
        uint32_t n = 0;
        int rc = GPUMEM_OK;
        for (; n < IPC_FDS_PER_MSG && i < d->nchunks; i++, n++) {
            rc = gm_mgr.backend->vmm_export(d->ctx, d->first + i * d->chunk, &fds[n]);
            if (rc != GPUMEM_OK) break;
        }
        bool sent = send_reply(c, rc, fds, n);
        for (uint32_t k = 0; k < n; k++) close(fds[k]);
        if (!sent || rc != GPUMEM_OK) return;
    }
}

static bool peer_allowed(int c)
{
    struct ucred cr;
    socklen_t len = sizeof cr;
    return getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cr, &len) == 0 && len == sizeof cr &&
           (cr.uid == geteuid() || cr.uid == 0);
}

static void serve_one(int c)
{
    ipc_request q;
    ipc_vmm_desc d;
    socket_timeouts(c);
    /* The request is read first, so that a refused peer always gets its answer. */
    bool ok = recv(c, &q, sizeof q, 0) == (ssize_t)sizeof q && !atomic_load(&gm_mgr.exiting) &&
              peer_allowed(c) && request_desc(&q, &d);
    if (ok) serve_chunks(c, &d);
    else send_reply(c, GPUMEM_ERROR_INVALID_VALUE, NULL, 0); /* the driver's answer for a handle it cannot open */
    close(c);
}

static void *server_main(void *arg)
{
    int fd = (int)(intptr_t)arg;
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0) serve_one(c);
        else if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) usleep(10000);
        else if (errno != EINTR && errno != ECONNABORTED) return NULL;
    }
}

/* Under ex.lock: the chunk server of this process, started once (every signal blocked in it). */
static int server_ready_locked(void)
{
    if (ex.server_fd >= 0) return GPUMEM_OK;
    struct sockaddr_un a;
    socklen_t len = socket_name(&a, (uint32_t)getpid(), ex.nonce);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    bool ok = fd >= 0 && bind(fd, (struct sockaddr *)&a, len) == 0 && listen(fd, 64) == 0;
    pthread_attr_t attr;
    pthread_t t;
    sigset_t all, old;
    if (ok) {
        sigfillset(&all);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        ok = pthread_create(&t, &attr, server_main, (void *)(intptr_t)fd) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
    }
    if (!ok) {
        gm_log(GM_ERROR, "cannot serve IPC of expandable segments (socket gpumem-ipc.%u): %m",
               (unsigned)getpid());
        if (fd >= 0) close(fd);
        return GPUMEM_ERROR_OUT_OF_MEMORY;
    }
    ex.server_fd = fd;
    return GPUMEM_OK;
}

/* Importer: receives one message of descriptors and maps them at the next chunks of `base`. */
static int receive_and_map(int c, uintptr_t ctx, uintptr_t base, const ipc_vmm_desc *d, uint64_t *got)
{
    ipc_reply r = {GPUMEM_ERROR_INVALID_VALUE, 0};
    struct iovec iov = {&r, sizeof r};
    union {
        char buf[CMSG_SPACE(sizeof(int) * IPC_FDS_PER_MSG)];
        struct cmsghdr align;
    } u;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    int fds[IPC_FDS_PER_MSG];
    uint32_t n = 0;
    if (recvmsg(c, &m, MSG_CMSG_CLOEXEC) != (ssize_t)sizeof r) r.status = GPUMEM_ERROR_INVALID_VALUE;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
            uint32_t k = (uint32_t)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (k > IPC_FDS_PER_MSG - n) k = IPC_FDS_PER_MSG - n;
            memcpy(fds + n, CMSG_DATA(cm), k * sizeof(int));
            n += k;
        }
    int rc = r.status;
    if (rc == GPUMEM_OK && (n == 0 || n != r.count)) rc = GPUMEM_ERROR_INVALID_VALUE;
    for (uint32_t k = 0; k < n; k++) {
        if (rc == GPUMEM_OK && *got < d->nchunks) {
            rc = gm_mgr.backend->vmm_import(ctx, fds[k], base + *got * d->chunk, d->chunk);
            if (rc == GPUMEM_OK) (*got)++;
        }
        close(fds[k]);
    }
    return rc;
}

static int connect_exporter(const ipc_wire *w)
{
    struct sockaddr_un a;
    socklen_t len = socket_name(&a, w->pid, w->proc_nonce);
    int c = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (c < 0) return -1;
    socket_timeouts(c);
    if (connect(c, (struct sockaddr *)&a, len) != 0) { /* the exporter is gone (or never served) */
        close(c);
        return -1;
    }
    return c;
}

static void chunks_unmap(uintptr_t ctx, uintptr_t base, size_t span, size_t chunk, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) gm_mgr.backend->vmm_unmap(ctx, base + i * chunk, chunk);
    gm_mgr.backend->va_free(ctx, base, span);
}

/* Maps the chunks the slot describes into a range of this process (e->vbase). */
static int import_chunks(uintptr_t ctx, const ipc_wire *w, const ipc_vmm_desc *d, ipc_import *e)
{
    const gm_backend *be = gm_mgr.backend;
    if (!be->vmm_import || !be->va_reserve) return GPUMEM_ERROR_NOT_SUPPORTED;
    if (d->nchunks > ((uint64_t)1 << 40) / d->chunk) return GPUMEM_ERROR_INVALID_VALUE;
    size_t span = d->chunk * d->nchunks;
    int c = connect_exporter(w);
    if (c < 0) return GPUMEM_ERROR_INVALID_VALUE;
    ipc_request q = {w->slot, 0, w->slot_nonce};
    uintptr_t base = 0;
    uint64_t got = 0;
    int rc = send(c, &q, sizeof q, MSG_NOSIGNAL) == (ssize_t)sizeof q ? GPUMEM_OK : GPUMEM_ERROR_INVALID_VALUE;
    if (rc == GPUMEM_OK) rc = be->va_reserve(ctx, span, d->chunk & (~d->chunk + 1), &base);
    while (rc == GPUMEM_OK && got < d->nchunks) rc = receive_and_map(c, ctx, base, d, &got);
    close(c);
    if (rc != GPUMEM_OK) {
        if (base) chunks_unmap(ctx, base, span, d->chunk, got);
        return rc;
    }
    e->vbase = base;
    e->vsize = span;
    e->chunk = d->chunk;
    atomic_fetch_add(&im_maps, 1);
    return GPUMEM_OK;
}

/* The last close of an import of chunks: unmapped, the range freed. */
static void import_chunks_release(ipc_import *e)
{
    chunks_unmap(e->ctx, e->vbase, e->vsize, e->chunk, e->vsize / e->chunk);
    atomic_fetch_sub(&im_maps, 1);
}

/* ------------------------------------------------------------------ receiver: the exporter's slot */

static bool wire_is_ours(const ipc_wire *w)
{
    char magic[16] = IPC_MAGIC;
    return !memcmp(w->magic, magic, sizeof magic) && !w->zero16 && !w->zero32 && !w->zero48;
}

/* The exporter's registry file, if it is the one the handle names. */
static int registry_open_of(const ipc_wire *w)
{
    char path[4200];
    registry_path(path, sizeof path, w->pid, w->proc_nonce);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    ipc_file_header h;
    struct stat st;
    bool ok = pread(fd, &h, sizeof h, 0) == (ssize_t)sizeof h &&
              !memcmp(h.magic, IPC_FILE_MAGIC, sizeof IPC_FILE_MAGIC) && h.pid == w->pid &&
              h.proc_nonce == w->proc_nonce && h.slot_size == sizeof(ipc_slot) &&
              fstat(fd, &st) == 0 &&
              (uint64_t)st.st_size >= (uint64_t)slot_offset(w->slot) + sizeof(ipc_slot);
    if (!ok) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Counts this process in as an importer of the slot the handle names (its page mapped into e);
 * INVALID_VALUE when the file, the slot or its nonce do not match: the driver's answer for a
 * handle it does not know. */
static int slot_attach(const ipc_wire *w, ipc_import *e)
{
    int fd = registry_open_of(w);
    if (fd < 0) return GPUMEM_ERROR_INVALID_VALUE;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    off_t off = slot_offset(w->slot), start = off & ~(off_t)(page - 1);
    size_t len = ((size_t)(off - start) + sizeof(ipc_slot) + page - 1) & ~(page - 1);
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, start);
    close(fd);
    if (m == MAP_FAILED) return GPUMEM_ERROR_INVALID_VALUE;
    ipc_slot *s = (ipc_slot *)((char *)m + (off - start));
    atomic_fetch_add(&s->importers, 1);
    if (atomic_load(&s->nonce) != w->slot_nonce) { /* freed, or never this slot's use */
        atomic_fetch_sub(&s->importers, 1);
        munmap(m, len);
        return GPUMEM_ERROR_INVALID_VALUE;
    }
    /* Counted in with the nonce still set: the exporter keeps the slot, so its fields hold. */
    e->page = m;
    e->page_len = len;
    e->slot = s;
    return GPUMEM_OK;
}

static void slot_detach(ipc_import *e)
{
    atomic_fetch_sub(&e->slot->importers, 1);
    munmap(e->page, e->page_len);
}

/* ------------------------------------------------------------------ receiver: segment mappings */

static int map_get_locked(uintptr_t ctx, const unsigned char handle[GM_IPC_HANDLE_SIZE],
                          unsigned flags, const gm_ipc_driver *drv, ipc_map **out)
{
    for (ipc_map *m = im.maps; m; m = m->next)
        if (m->ctx == ctx && !memcmp(m->handle, handle, GM_IPC_HANDLE_SIZE)) {
            m->refs++;
            *out = m;
            return GPUMEM_OK;
        }
    ipc_map *m = calloc(1, sizeof *m);
    if (!m) return GPUMEM_ERROR_OUT_OF_MEMORY;
    int rc = drv->open_handle(&m->base, handle, flags);
    uintptr_t base = 0;
    if (rc == GPUMEM_OK && drv->address_range(m->base, &base, &m->size) != GPUMEM_OK) m->size = 0;
    if (rc != GPUMEM_OK) {
        free(m);
        return rc;
    }
    m->ctx = ctx;
    memcpy(m->handle, handle, GM_IPC_HANDLE_SIZE);
    m->refs = 1;
    m->next = im.maps;
    im.maps = m;
    atomic_fetch_add(&im_maps, 1);
    *out = m;
    return GPUMEM_OK;
}

/* One open less; the last one closes the driver's mapping. */
static void map_put_locked(ipc_map *m, const gm_ipc_driver *drv)
{
    if (--m->refs) return;
    for (ipc_map **pp = &im.maps; *pp; pp = &(*pp)->next)
        if (*pp == m) {
            *pp = m->next;
            break;
        }
    atomic_fetch_sub(&im_maps, 1);
    drv->close_handle(m->base);
    free(m);
}

/* ------------------------------------------------------------------ receiver: open, close, query */

static ipc_import *import_find_locked(uintptr_t ctx, const unsigned char handle[GM_IPC_HANDLE_SIZE])
{
    for (ipc_import *e = im.imports; e; e = e->next)
        if (e->ctx == ctx && !memcmp(e->handle, handle, GM_IPC_HANDLE_SIZE)) return e;
    return NULL;
}

static int import_new_locked(uintptr_t ctx, const ipc_wire *w, unsigned flags,
                             const gm_ipc_driver *drv, uintptr_t *out)
{
    ipc_import *e = calloc(1, sizeof *e);
    if (!e) return GPUMEM_ERROR_OUT_OF_MEMORY;
    e->ctx = ctx;
    int rc = slot_attach(w, e);
    ipc_vmm_desc d;
    uintptr_t base = 0;
    size_t span = 0;
    if (rc != GPUMEM_OK) {
        e->slot = NULL;
    } else if (desc_of_slot(e->slot->handle, &d)) { /* a block of an expandable segment */
        rc = import_chunks(ctx, w, &d, e);
        base = e->vbase;
        span = e->vsize;
    } else if ((rc = map_get_locked(ctx, e->slot->handle, flags, drv, &e->map)) == GPUMEM_OK) {
        base = e->map->base;
        span = e->map->size;
    }
    uint64_t off = e->slot ? e->slot->offset : 0, size = e->slot ? e->slot->size : 0;
    if (rc == GPUMEM_OK && (off >= span || size == 0 || size > span - off)) {
        if (e->map) map_put_locked(e->map, drv); /* the registry does not describe this segment */
        else import_chunks_release(e);
        rc = GPUMEM_ERROR_INVALID_VALUE;
    }
    if (rc != GPUMEM_OK) {
        if (e->slot) slot_detach(e);
        free(e);
        return rc;
    }
    memcpy(e->handle, w, sizeof *w);
    e->ptr = base + off;
    e->size = size;
    e->buffer_id = GM_BUFFER_ID_BIT | (0xFFFFull << 47) | ++im.seq;
    e->refs = 1;
    e->next = im.imports;
    im.imports = e;
    *out = e->ptr;
    return GPUMEM_OK;
}

static int open_gpumem_locked(uintptr_t ctx, const ipc_wire *w, unsigned flags,
                              const gm_ipc_driver *drv, uintptr_t *out)
{
    if (w->pid == (uint32_t)getpid()) { /* the driver's answer for a handle of this process */
        pthread_mutex_lock(&ex.lock);
        bool mine = ex.map && ex.owner == getpid() && w->proc_nonce == ex.nonce;
        pthread_mutex_unlock(&ex.lock);
        return mine ? GPUMEM_ERROR_INVALID_CONTEXT : GPUMEM_ERROR_INVALID_VALUE;
    }
    ipc_import *e = import_find_locked(ctx, (const unsigned char *)w);
    if (!e) return import_new_locked(ctx, w, flags, drv, out);
    e->refs++;
    if (e->map) e->map->refs++;
    *out = e->ptr;
    return GPUMEM_OK;
}

int gm_ipc_open(uintptr_t ctx, const unsigned char handle[GM_IPC_HANDLE_SIZE], unsigned flags,
                const gm_ipc_driver *drv, uintptr_t *out)
{
    ipc_setup();
    ipc_wire w;
    memcpy(&w, handle, sizeof w);
    pthread_mutex_lock(&im.lock);
    int rc;
    if (wire_is_ours(&w)) {
        rc = open_gpumem_locked(ctx, &w, flags, drv, out);
    } else { /* the driver's own handle (a block at its segment's start, or not gpumem's) */
        ipc_map *m = NULL;
        rc = map_get_locked(ctx, handle, flags, drv, &m);
        if (rc == GPUMEM_OK) {
            m->plain_refs++;
            *out = m->base;
        }
    }
    pthread_mutex_unlock(&im.lock);
    return rc;
}

static gm_answer close_locked(uintptr_t ptr, const gm_ipc_driver *drv)
{
    for (ipc_import **pp = &im.imports; *pp; pp = &(*pp)->next) {
        ipc_import *e = *pp;
        if (e->ptr != ptr) continue;
        if (e->map) map_put_locked(e->map, drv); /* e holds a reference of its own: the map outlives this */
        if (--e->refs == 0) {
            *pp = e->next;
            if (!e->map) import_chunks_release(e);
            slot_detach(e);
            free(e);
        }
        return gm_ours(GPUMEM_OK);
    }
    for (ipc_map *m = im.maps; m; m = m->next)
        if (m->base == ptr && m->plain_refs) {
            m->plain_refs--;
            map_put_locked(m, drv);
            return gm_ours(GPUMEM_OK);
        }
    /* Inside a segment still open for other blocks: the driver would close the whole mapping. */
    for (ipc_map *m = im.maps; m; m = m->next)
        if (ptr - m->base < m->size) return gm_ours(GPUMEM_ERROR_INVALID_VALUE);
    for (ipc_import *e = im.imports; e; e = e->next)
        if (!e->map && ptr - e->vbase < e->vsize) return gm_ours(GPUMEM_ERROR_INVALID_VALUE);
    return gm_not_ours();
}

gm_answer gm_ipc_close(uintptr_t ptr, const gm_ipc_driver *drv)
{
    if (!atomic_load(&im_maps)) return gm_not_ours();
    pthread_mutex_lock(&im.lock);
    gm_answer a = close_locked(ptr, drv);
    pthread_mutex_unlock(&im.lock);
    return a;
}

gm_answer gm_ipc_lookup(uintptr_t ptr, gm_block_identity *out)
{
    if (!atomic_load_explicit(&im_maps, memory_order_relaxed)) return gm_not_ours();
    gm_answer a = gm_not_ours();
    pthread_mutex_lock(&im.lock);
    for (ipc_import *e = im.imports; e && a.owner == GM_NOT_OURS; e = e->next)
        if (ptr - e->ptr < e->size) {
            *out = (gm_block_identity){.base = e->ptr, .size = e->size, .buffer_id = e->buffer_id,
                                       .ctx = e->ctx, .seg_base = e->map ? e->map->base : e->vbase,
                                       .seg_size = e->map ? e->map->size : e->vsize};
            a = gm_ours(GPUMEM_OK);
        }
    /* Elsewhere in a segment opened only for some of its blocks: no allocation the program has. */
    for (ipc_map *m = im.maps; m && a.owner == GM_NOT_OURS; m = m->next)
        if (ptr - m->base < m->size && !m->plain_refs) a = gm_ours(GPUMEM_ERROR_INVALID_VALUE);
    for (ipc_import *e = im.imports; e && a.owner == GM_NOT_OURS; e = e->next)
        if (!e->map && ptr - e->vbase < e->vsize) a = gm_ours(GPUMEM_ERROR_INVALID_VALUE);
    pthread_mutex_unlock(&im.lock);
    return a;
}
