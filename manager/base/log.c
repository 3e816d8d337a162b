/* Diagnostics on stderr, one write(2) per line. */
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

#include "gm_base.h"

static int verbosity; /* set once the configuration is read (GPUMEM_VERBOSE) */

void gm_log_set_verbosity(int level) { __atomic_store_n(&verbosity, level, __ATOMIC_RELAXED); }

int gm_log_verbosity(void) { return __atomic_load_n(&verbosity, __ATOMIC_RELAXED); }

void gm_log(int level, const char *fmt, ...)
{
    if (level > gm_log_verbosity()) return;
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof line - 2) n = (int)sizeof line - 2;
    line[n] = '\n';
    /* One write(2) per line: no stdio lock, no allocation, lines from threads do not interleave. */
    ssize_t ignored = write(STDERR_FILENO, "gpumem: ", 8);
    ignored = write(STDERR_FILENO, line, (size_t)n + 1);
    (void)ignored;
}
