/* Fast mode's first rule in the unit tests (test_pool.c, test_tcache.c): a block handed out never
 * overlaps one freed since the last wait, when on the host backend's busy device (fences that
 * complete only when waited for) nothing else can have completed its fence. Include after
 * <criterion/criterion.h>. */
#ifndef GPUMEM_TESTS_FREED_LOG_H
#define GPUMEM_TESTS_FREED_LOG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uintptr_t p;
    size_t size;
    uint64_t waits; /* the waits counted when it was freed */
} freed_block;

/* Pair `i` got [p, p + size) while `waits` waits have been counted; log[0..i) were freed before. */
static inline void expect_not_freed_since_the_last_wait(const freed_block *log, int i, uintptr_t p,
                                                        size_t size, uint64_t waits)
{
    for (int k = 0; k < i; k++)
        if (log[k].waits == waits)
            cr_assert(p + size <= log[k].p || log[k].p + log[k].size <= p,
                      "pair %d got %#lx, inside block %d freed at %#lx before any fence completed", i,
                      (unsigned long)p, k, (unsigned long)log[k].p);
}

#endif
