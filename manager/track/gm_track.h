/* The track layer: what gpumem remembers of each allocation for the leak report, the same for
 * device and pinned host memory: records and the live table that holds them (records.c), call
 * stacks captured on the hot path (stacks.c) and symbolized when a report is written
 * (symbols.c), the tags a thread pushes (tags.c), and the leaks of destroyed contexts kept for
 * the exit report (orphans.c). Below: base and config only. */
#ifndef GM_TRACK_H
#define GM_TRACK_H

#include <stdio.h>

#include "gm_base.h"
#include "gm_config.h"
#include "gpumem.h"

/* ---------------------------------------------------------------- call sites (stacks.c) */
/* Where a hooked call came from: its return address and its own frame (the unwind starts
 * there). GM_CALLSITE() is used inside the hooked entry point itself. */
typedef struct gm_callsite {
    uintptr_t pc;
    const void *frame;
} gm_callsite;
#define GM_CALLSITE() \
    (&(gm_callsite){(uintptr_t)__builtin_return_address(0), __builtin_frame_address(0)})
uint32_t gm_stack_capture(const gm_callsite *site); /* depot id, 0 when off or full */
size_t gm_stack_get(uint32_t id, uintptr_t *pc, size_t max);
/* Reads the stack settings and loads what the unwinder needs; nothing is captured before. */
void gm_stack_init(const gm_config *cfg);

/* ---------------------------------------------------------------- records (records.c) */
typedef enum {
    GM_KIND_POOL = 0,   /* carved from a pool segment (or the pinned pool's cache) */
    GM_KIND_DIRECT,     /* pooling off or stream capture: a driver allocation of its own */
    GM_KIND_ASYNC,      /* cuMemAllocAsync / FromPoolAsync: stream-ordered, passed through */
    GM_KIND_MANAGED,    /* cuMemAllocManaged */
    GM_KIND_VMM,        /* cuMemCreate handle (the value is the handle, not an address) */
    GM_KIND_ARRAY,      /* CUDA array or mipmapped array (the value is the handle) */
    GM_KIND_GRAPH,      /* graph memory node (cuGraphAddMemAllocNode, or cuMemAllocAsync captured
                         * into a graph): the driver's address, passed through */
    GM_KIND_COUNT
} gm_alloc_kind;

/* Which memory a record describes; the report groups them apart. */
typedef enum { GM_MEMORY_DEVICE = 0, GM_MEMORY_PINNED_HOST } gm_memory;
const char *gm_memory_name(gm_memory memory); /* "device", "pinned_host" */

struct gm_block;

/* One live allocation, as the leak report sees it. Pool blocks and pinned blocks embed theirs;
 * pass-through allocations get one of their own (gm_record_new). */
typedef struct gm_record {
    uintptr_t ptr;
    size_t requested;       /* what the program asked for */
    size_t size;            /* what it occupies (rounded) */
    uintptr_t stream;
    uint64_t time_ns;
    uintptr_t caller;       /* return address of the hooked call */
    uint32_t stack_id;      /* call-stack depot id; 0 = not captured */
    uint8_t kind;           /* gm_alloc_kind */
    uint16_t tag;           /* the thread's tag when it was made (tags.c); 0 = none */
    uint16_t owner;         /* the engine's: whose counters counted it (0: its heap's; i: the
                             * heap's thread cache i, engine/tcache.c) */
    struct gm_block *block; /* pool block (pool/gm_pool.h), NULL for other kinds */
    UT_hash_handle hh;      /* the live table, keyed by ptr */
} gm_record;

/* Fills what every record says of its allocation, the time now included; `tag` is the calling
 * thread's (gm_tag_current). `block` is left alone. Inline: it is on every allocation's path. */
static inline void gm_record_fill(gm_record *rec, uintptr_t ptr, size_t requested, size_t size,
                                  gm_alloc_kind kind, uintptr_t stream, const gm_callsite *site,
                                  uint32_t stack_id, uint16_t tag)
{
    rec->ptr = ptr;
    rec->requested = requested;
    rec->size = size;
    rec->kind = (uint8_t)kind;
    rec->stream = stream;
    rec->caller = site ? site->pc : 0;
    rec->stack_id = stack_id;
    rec->tag = tag;
    rec->time_ns = gm_coarse_now_ns();
}
gm_record *gm_record_new(void);
void gm_record_delete(gm_record *rec);

/* The live table: records keyed by pointer, under their owner's lock. A sentinel (ptr 0) keeps
 * uthash from freeing and reallocating its table on every last delete and first insert. */
typedef struct gm_live {
    gm_record *head;
    gm_record sentinel;
} gm_live;
void gm_live_init(gm_live *t);
void gm_live_insert(gm_live *t, gm_record *rec);
gm_record *gm_live_find(const gm_live *t, uintptr_t ptr);
void gm_live_remove(gm_live *t, gm_record *rec);
size_t gm_live_count(const gm_live *t); /* records, the sentinel not counted */
/* Iterate live records (the sentinel is skipped). */
#define GM_FOR_EACH_LIVE(table, rec) \
    for (gm_record *rec = (table)->head; rec; rec = (gm_record *)rec->hh.next) \
        if (rec->ptr != 0)

/* ---------------------------------------------------------------- orphans (orphans.c) */
/* Leaks that share device, memory, tag and call stack: what the report prints as one entry. */
typedef struct gm_leak_group {
    int device;
    uint8_t memory; /* gm_memory */
    uint16_t tag;
    uintptr_t caller;
    uint32_t stack_id;
    uint64_t bytes; /* sum of requested sizes */
    uint64_t count;
} gm_leak_group;
/* The group a record belongs to, holding just that record. */
gm_leak_group gm_leak_group_of(int device, gm_memory memory, const gm_record *rec);
/* A growing set of groups: gm_leak_groups_add merges `g` into the group of the same key, or
 * appends it (linear: groups are few, one per distinct call stack); false when out of memory. */
typedef struct gm_leak_groups {
    gm_leak_group *at;
    size_t n, cap;
} gm_leak_groups;
bool gm_leak_groups_add(gm_leak_groups *set, const gm_leak_group *g);
/* Leaks of a context that went away: the driver freed their memory, the exit report still
 * lists them. Kept as groups, so a context with a million leaks of one stack costs one entry. */
void gm_orphans_keep(int device, gm_memory memory, const gm_record *rec);
/* Calls `fn` for every kept group; false when the list stayed busy (2 s) and nothing was read. */
bool gm_orphans_for_each(void (*fn)(void *cx, const gm_leak_group *g), void *cx);

/* ---------------------------------------------------------------- symbols (symbols.c) */
#define GM_MAX_FRAMES 64
typedef struct gm_frame {
    uintptr_t pc;
    char function[160];
    char module[256]; /* path */
    uintptr_t offset;
    char file[256];
    int line;
} gm_frame;
/* Symbolization is serialized (its caches): begin waits up to 2 s and says whether it got the
 * lock; without it, frames are still described, only not cached. */
bool gm_symbols_begin(void);
void gm_symbols_end(bool locked);
/* The frames of a stack from the program's own call on (leading frames of gpumem and of the
 * CUDA libraries dropped; the last frame stays whatever it is), named by dladdr and by what
 * addr2line already said. */
size_t gm_symbols_program_frames(const uintptr_t *pc, size_t n, gm_frame *out);
/* Runs addr2line, once per module, for the frames that want file:line and lack it. */
void gm_symbols_resolve(const gm_frame *frames, size_t n);
/* "    #i 0x<pc> in <function> <module>+0x<offset> (file:line)": LeakSanitizer's frame line. */
int gm_symbols_frame_line(char *out, size_t cap, size_t i, const gm_frame *f);
const char *gm_symbols_base_name(const char *path);
/* A whole call stack in the frame format, one line per frame, resolved like the leak report's. */
size_t gm_symbols_format_stack(char *out, size_t cap, const uintptr_t *pc, size_t n);

/* ---------------------------------------------------------------- tags (tags.c) */
/* Names the calling thread pushes; every allocation made meanwhile carries the innermost. */
#define GM_TAG_NAME_MAX 127
#define GM_TAG_DEPTH_MAX 64
#define GM_TAGS_MAX 4096
int gm_tag_push(const char *name);      /* gm_tag_intern + gm_tag_push_id */
int gm_tag_intern(const char *name, uint16_t *id); /* validates and interns; no lock once known */
int gm_tag_push_id(uint16_t id);
int gm_tag_pop(void);
uint16_t gm_tag_current(void);
const char *gm_tag_name(uint16_t id); /* NULL for 0 */
uint16_t gm_tag_find(const char *name);
uint32_t gm_tag_count(void);          /* ids 1 .. count-1 are in use */
void gm_tag_on_alloc(uint16_t id, uint64_t bytes);
void gm_tag_on_free(uint16_t id, uint64_t bytes);
void gm_tag_on_resize(uint16_t id);
void gm_tag_usage_get(uint16_t id, gpumem_tag_usage *out);

#endif
