/* gpumem-bench pinned: pinned host alloc+free: the driver's own against the pinned pool. (Not written yet.) */
#include <stdio.h>

#include "bench.h"

int bench_pinned(int argc, char **argv)
{
    (void)argc, (void)argv;
    fprintf(stderr, "gpumem-bench pinned: not written yet\n");
    return 2;
}
