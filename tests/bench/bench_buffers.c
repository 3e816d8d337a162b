/* gpumem-bench buffers: buffer growth: resize with data copy, in-place growth, tracking memory overhead. (Not written yet.) */
#include <stdio.h>

#include "bench.h"

int bench_buffers(int argc, char **argv)
{
    (void)argc, (void)argv;
    fprintf(stderr, "gpumem-bench buffers: not written yet\n");
    return 2;
}
