/* gpumem-bench transfer: pageable copies through pinned staging against the driver's own (256 MiB both ways, and small copies). (Not written yet.) */
#include <stdio.h>

#include "bench.h"

int bench_transfer(int argc, char **argv)
{
    (void)argc, (void)argv;
    fprintf(stderr, "gpumem-bench transfer: not written yet\n");
    return 2;
}
