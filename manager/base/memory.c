/* Memory for structures threads write at once: whole cache lines of their own. */
#include <stdlib.h>
#include <string.h>

#include "gm_base.h"

void *gm_cache_line_alloc(size_t size)
{
    size_t whole = (size + GM_CACHE_LINE - 1) / GM_CACHE_LINE * GM_CACHE_LINE;
    void *p = aligned_alloc(GM_CACHE_LINE, whole);
    if (p) memset(p, 0, whole);
    return p;
}
