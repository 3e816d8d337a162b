/* Captures what the calling process writes to file descriptor 2 (the shim logs with write(2)). */
#ifndef MISUSE_CAPTURE_H
#define MISUSE_CAPTURE_H

#include "api_test.h"
#include "fakecuda.h"

typedef struct {
    int saved;
    char path[96];
} stderr_capture;

static inline void capture_begin(stderr_capture *c)
{
    char dir[64];
    cr_assert(api_tmpdir(dir, sizeof dir, "stderr"));
    snprintf(c->path, sizeof c->path, "%s/err", dir);
    int fd = open(c->path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    cr_assert_geq(fd, 0);
    fflush(stderr);
    c->saved = dup(2);
    cr_assert_geq(c->saved, 0);
    dup2(fd, 2);
    close(fd);
}

/* Restores stderr and returns what was written (the caller frees it). */
static inline char *capture_end(stderr_capture *c)
{
    fflush(stderr);
    dup2(c->saved, 2);
    close(c->saved);
    char *text = api_read_file(c->path);
    unlink(c->path);
    char *slash = strrchr(c->path, '/');
    *slash = '\0';
    rmdir(c->path);
    cr_assert_not_null(text);
    return text;
}

static inline fakecuda_counters_t counters(void)
{
    fakecuda_counters_t c;
    fakecuda_counters(&c);
    return c;
}

#endif
