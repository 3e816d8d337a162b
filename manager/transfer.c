/* Transfers: counted per direction. Each thread counts into its own block (a plain load and
 * store, no locked instruction: only that thread writes it); readers sum the blocks, which live
 * until exit so a finished thread's copies still count. */
#include <stdlib.h>

#include "gm_internal.h"

typedef struct copy_block {
    _Atomic uint64_t calls[GM_COPY_DIRS], bytes[GM_COPY_DIRS];
    struct copy_block *next;
} copy_block;

static pthread_mutex_t blocks_lock = PTHREAD_MUTEX_INITIALIZER;
static copy_block *blocks;
static __thread copy_block *mine;
static copy_block overflow; /* if a thread's block cannot be allocated: shared, still counted */
static const char *const dir_names[GM_COPY_DIRS] = {"H2D", "D2H", "D2D", "default"};

static copy_block *register_thread(void)
{
    copy_block *b = calloc(1, sizeof *b);
    if (!b) return &overflow;
    pthread_mutex_lock(&blocks_lock);
    b->next = blocks;
    blocks = b;
    pthread_mutex_unlock(&blocks_lock);
    return b;
}

static void bump(_Atomic uint64_t *v, uint64_t by, bool shared)
{
    if (shared) atomic_fetch_add_explicit(v, by, memory_order_relaxed);
    else atomic_store_explicit(v, atomic_load_explicit(v, memory_order_relaxed) + by, memory_order_relaxed);
}

void gm_copy_note(gm_copy_dir dir, size_t bytes)
{
    copy_block *b = mine;
    if (__builtin_expect(!b, 0)) b = mine = register_thread();
    bool shared = b == &overflow;
    bump(&b->calls[dir], 1, shared);
    bump(&b->bytes[dir], bytes, shared);
}

void gm_copy_totals(gm_copy_dir dir, uint64_t *calls, uint64_t *bytes)
{
    *calls = atomic_load_explicit(&overflow.calls[dir], memory_order_relaxed);
    *bytes = atomic_load_explicit(&overflow.bytes[dir], memory_order_relaxed);
    pthread_mutex_lock(&blocks_lock);
    for (copy_block *b = blocks; b; b = b->next) {
        *calls += atomic_load_explicit(&b->calls[dir], memory_order_relaxed);
        *bytes += atomic_load_explicit(&b->bytes[dir], memory_order_relaxed);
    }
    pthread_mutex_unlock(&blocks_lock);
}

const char *gm_copy_dir_name(gm_copy_dir dir) { return dir < GM_COPY_DIRS ? dir_names[dir] : "?"; }

void gm_copy_report_text(FILE *out)
{
    bool any = false;
    for (int d = 0; d < GM_COPY_DIRS; d++) {
        uint64_t calls, bytes;
        gm_copy_totals((gm_copy_dir)d, &calls, &bytes);
        if (!calls) continue;
        fprintf(out, "%s%s %llu B in %llu calls", any ? ", " : "copies: ", gm_copy_dir_name((gm_copy_dir)d),
                (unsigned long long)bytes, (unsigned long long)calls);
        any = true;
    }
    if (any) fputc('\n', out);
}

void gm_copy_report_json(FILE *out)
{
    fputs("\"copies\":{", out);
    for (int d = 0; d < GM_COPY_DIRS; d++) {
        uint64_t calls, bytes;
        gm_copy_totals((gm_copy_dir)d, &calls, &bytes);
        fprintf(out, "%s\"%s\":{\"calls\":%llu,\"bytes\":%llu}", d ? "," : "", gm_copy_dir_name((gm_copy_dir)d),
                (unsigned long long)calls, (unsigned long long)bytes);
    }
    fputc('}', out);
}
