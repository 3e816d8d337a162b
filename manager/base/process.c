/* The process's own identity, for file names and reports. */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#include "gm_base.h"

void gm_expand_pid(const char *pattern, char *out, size_t cap)
{
    size_t o = 0;
    for (const char *p = pattern; *p && o + 24 < cap; p++) {
        if (p[0] == '%' && p[1] == 'p') {
            o += (size_t)snprintf(out + o, cap - o, "%ld", (long)getpid());
            p++;
        } else {
            out[o++] = *p;
        }
    }
    out[o] = 0;
}

static char program_path[4096];

static void resolve_program_path(void)
{
    ssize_t n = readlink("/proc/self/exe", program_path, sizeof program_path - 1);
    program_path[n > 0 ? n : 0] = 0;
}

const char *gm_program_path(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, resolve_program_path);
    return program_path;
}
