/* Shared by the API tests (Criterion programs run with LD_PRELOAD=libgpumem_shim.so on the fake
 * driver) and by api_child, the helper they spawn for scenarios whose outcome is only visible in
 * the exit report or the exit status.
 *
 * Nothing here uses Criterion: functions report failure through their return value. */
#ifndef API_COMMON_H
#define API_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cuda.h>

#include "gpumem.h"

extern char **environ;

/* ---------------------------------------------------------------- helper programs' checks */
/* A helper program (api_child, live_child) defines API_CHILD_NAME before including this: a
 * failed CHECK or CK ends it with status 90 and one line naming the program and the check. */
#ifdef API_CHILD_NAME
#define CHECK(cond, ...) \
    do { \
        if (!(cond)) { \
            fprintf(stderr, API_CHILD_NAME ": CHECK FAILED at line %d: %s: ", __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__); \
            fputc('\n', stderr); \
            exit(90); \
        } \
    } while (0)
#define CK(call) \
    do { \
        CUresult r_ = (call); \
        CHECK(r_ == CUDA_SUCCESS, "%s returned %d", #call, (int)r_); \
    } while (0)
#endif

/* ---------------------------------------------------------------- the shim's public API */

/* gpumem_get_stats is exported by the preloaded shim; the test programs do not link libgpumem,
 * so it is looked up at run time (the shim's dlsym passes non-driver names straight to libc). */
typedef gpumem_status (*api_get_stats_fn)(int device, gpumem_stats *out);
typedef gpumem_status (*api_report_fn)(FILE *out);
typedef size_t (*api_release_cached_fn)(void);

static inline void *api_shim_sym(const char *name)
{
    return dlsym(RTLD_DEFAULT, name);
}

/* Device 0's statistics; false when the shim is not preloaded. */
static inline bool api_stats(gpumem_stats *out)
{
    api_get_stats_fn fn = (api_get_stats_fn)(uintptr_t)api_shim_sym("gpumem_get_stats");
    memset(out, 0, sizeof *out);
    return fn && fn(0, out) == GPUMEM_OK;
}

/* ---------------------------------------------------------------- small utilities */

static inline double api_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static inline void api_sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000u, (long)(ms % 1000u) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline bool api_all_bytes(const void *p, unsigned char v, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != v)
            return false;
    return true;
}

/* Deterministic per-(seed, index) byte pattern. */
static inline unsigned char api_pattern(uint32_t seed, size_t i)
{
    uint32_t x = seed * 2654435761u + (uint32_t)i * 40503u;
    x ^= x >> 13;
    return (unsigned char)(x ^ (x >> 7));
}

static inline void api_fill_pattern(void *p, size_t n, uint32_t seed)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = api_pattern(seed, i);
}

/* Index of the first byte that differs from the pattern, or n. */
static inline size_t api_check_pattern(const void *p, size_t n, uint32_t seed)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != api_pattern(seed, i))
            return i;
    return n;
}

/* Whole file as a NUL-terminated string (NULL if it cannot be read). */
static inline char *api_read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (size_t got; buf && (got = fread(buf + n, 1, cap - n - 1, f)) > 0;) {
        n += got;
        if (cap - n - 1 == 0) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = grown;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf)
        buf[n] = '\0';
    return buf;
}

/* Number of lines of `text` that contain `needle`. */
static inline int api_count_lines(const char *text, const char *needle)
{
    int count = 0;
    const char *line = text;
    while (line && *line) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        const char *hit = strstr(line, needle);
        if (hit && (size_t)(hit - line) + strlen(needle) <= len)
            count++;
        line = end ? end + 1 : NULL;
    }
    return count;
}

/* Number of lines of `text`. */
static inline int api_line_count(const char *text)
{
    int n = 0;
    for (const char *p = text; *p; p++)
        n += *p == '\n';
    if (*text && text[strlen(text) - 1] != '\n')
        n++;
    return n;
}

/* A fresh private directory under /tmp (the caller removes what it created in it). */
static inline bool api_tmpdir(char *out, size_t cap, const char *tag)
{
    snprintf(out, cap, "/tmp/gpumem-%s-XXXXXX", tag);
    return mkdtemp(out) != NULL;
}

/* ---------------------------------------------------------------- child processes */

typedef struct api_child {
    pid_t pid;
    int status;      /* from waitpid; meaningful unless timed_out */
    bool timed_out;  /* killed after the timeout */
    char *out;       /* its stdout */
    char *err;       /* its stderr */
} api_child;

static inline void api_child_free(api_child *c)
{
    free(c->out);
    free(c->err);
    c->out = c->err = NULL;
}

static inline bool api_exited_ok(const api_child *c)
{
    return !c->timed_out && WIFEXITED(c->status) && WEXITSTATUS(c->status) == 0;
}

/* Waits for `pid` at most `timeout_s` seconds; kills it (SIGKILL) after that. */
static inline bool api_wait_timeout(pid_t pid, int *status, double timeout_s)
{
    double deadline = api_now_ms() + timeout_s * 1000.0;
    for (;;) {
        pid_t r = waitpid(pid, status, WNOHANG);
        if (r == pid)
            return true;
        if (r < 0 && errno != EINTR)
            return false;
        if (api_now_ms() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, status, 0);
            return false;
        }
        api_sleep_ms(5);
    }
}

/* The current environment with `overrides` applied: "NAME=VALUE" sets, "NAME" alone unsets. */
static inline char **api_build_env(const char *const *overrides)
{
    size_t n = 0, k = 0;
    while (environ[n])
        n++;
    for (const char *const *o = overrides; o && *o; o++)
        k++;
    char **env = calloc(n + k + 1, sizeof *env);
    if (!env)
        return NULL;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = strcspn(environ[i], "=");
        bool replaced = false;
        for (const char *const *o = overrides; o && *o; o++)
            if (strcspn(*o, "=") == len && strncmp(*o, environ[i], len) == 0)
                replaced = true;
        if (!replaced)
            env[m++] = environ[i];
    }
    for (const char *const *o = overrides; o && *o; o++)
        if (strchr(*o, '='))
            env[m++] = (char *)*o;
    env[m] = NULL;
    return env;
}

/* Runs `path` with argv[1..] = args (NULL-terminated) and the environment with `overrides`,
 * capturing stdout and stderr. False if it could not be started. */
static inline bool api_run(const char *path, const char *const *args, const char *const *overrides,
                           double timeout_s, api_child *c)
{
    char dir[64], out_path[96], err_path[96];
    memset(c, 0, sizeof *c);
    if (!api_tmpdir(dir, sizeof dir, "child"))
        return false;
    snprintf(out_path, sizeof out_path, "%s/out", dir);
    snprintf(err_path, sizeof err_path, "%s/err", dir);
    const char *argv[32];
    size_t a = 0;
    argv[a++] = path;
    for (const char *const *p = args; p && *p && a < 31; p++)
        argv[a++] = *p;
    argv[a] = NULL;
    char **env = api_build_env(overrides);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, out_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&fa, 2, err_path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    int rc = env ? posix_spawn(&c->pid, path, &fa, NULL, (char *const *)argv, env) : ENOMEM;
    posix_spawn_file_actions_destroy(&fa);
    free(env);
    if (rc == 0) {
        c->timed_out = !api_wait_timeout(c->pid, &c->status, timeout_s);
        c->out = api_read_file(out_path);
        c->err = api_read_file(err_path);
    }
    unlink(out_path);
    unlink(err_path);
    rmdir(dir);
    if (rc == 0 && !c->out)
        c->out = strdup("");
    if (rc == 0 && !c->err)
        c->err = strdup("");
    return rc == 0;
}

/* The exit report's closing line, as the tests expect it. */
static inline void api_leak_line(char *buf, size_t cap, unsigned long long bytes,
                                 unsigned long long count)
{
    snprintf(buf, cap, "LEAK SUMMARY: %llu bytes leaked in %llu allocations", bytes, count);
}

#endif
