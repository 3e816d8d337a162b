/* Pageable host <-> device copies through pinned staging buffers. (Not written yet: nothing is
 * staged.) */
#include "gm_staging.h"

int gm_staged_copy(uintptr_t ctx, gm_copy_dir dir, uintptr_t dst, uintptr_t src, size_t n,
                   uintptr_t stream, bool sync)
{
    (void)ctx, (void)dir, (void)dst, (void)src, (void)n, (void)stream, (void)sync;
    return GM_NOT_OURS;
}
