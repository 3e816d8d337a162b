/* Configuration: every tunable comes from options.def, is read from the environment once, and
 * a bad value stops the process with one line naming the variable, the value and what is
 * accepted. */
#ifndef GM_CONFIG_H
#define GM_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GM_MAX_DEVICES 64
#define GM_UNLIMITED UINT64_MAX

typedef enum { GM_LIMIT_NONE = 0, GM_LIMIT_BYTES, GM_LIMIT_PERCENT } gm_limit_kind;

typedef struct gm_limit_setting {
    gm_limit_kind kind;
    uint64_t bytes;  /* GM_LIMIT_BYTES */
    double percent;  /* GM_LIMIT_PERCENT, in (0, 100] */
} gm_limit_setting;

/* A GPUMEM_LIMIT list entry keyed by device UUID ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as
 * nvidia-smi -L and NVML print it, or "MIG-..."): it follows the physical device whatever ordinal
 * CUDA_VISIBLE_DEVICES gives it. */
typedef struct gm_limit_uuid {
    unsigned char uuid[16]; /* cuDeviceGetUuid's bytes */
    char text[48];          /* as written, for error lines */
    gm_limit_setting setting;
} gm_limit_uuid;

/* Who named which device: what gm_config_check_devices checks against the devices a process sees. */
typedef struct gm_limit_keys {
    uint64_t listed;       /* bit per ordinal named in GPUMEM_LIMIT's list */
    uint64_t overridden;   /* bit per ordinal that has a GPUMEM_LIMIT_<i> */
    int nuuid;
    gm_limit_uuid uuid[GM_MAX_DEVICES];
    char text[256];        /* GPUMEM_LIMIT as given (cut short), for error lines */
} gm_limit_keys;

typedef enum {
    GM_OPT_BOOL, GM_OPT_SIZE, GM_OPT_SIZE_OR_UNLIMITED, GM_OPT_DOUBLE, GM_OPT_INT,
    GM_OPT_STRING, GM_OPT_ENUM, GM_OPT_LIMIT
} gm_option_type;

typedef struct gm_option_desc {
    const char *name;          /* environment variable */
    gm_option_type type;
    const char *default_value; /* as a user would write it */
    double min, max;           /* range for SIZE/DOUBLE/INT */
    const char *doc;
} gm_option_desc;

extern const gm_option_desc gm_options[];
extern const size_t gm_option_count;

typedef struct gm_config {
    bool pool;
    bool free_sync;
    uint64_t fence_batch;                   /* GPUMEM_FENCE_BATCH: fast mode's pending bytes (fence.c) */
    gm_limit_setting limit[GM_MAX_DEVICES]; /* by ordinal: GPUMEM_LIMIT then GPUMEM_LIMIT_<i> */
    gm_limit_keys limit_keys;               /* UUID entries, and which ordinals were named */
    double growth_factor;
    uint64_t segment_min;
    uint64_t segment_max;
    uint64_t small_segment;
    uint64_t dedicated_min;
    uint64_t max_cached;                    /* GM_UNLIMITED for "unlimited" */
    uint64_t thread_cache;                  /* bytes per thread and context; 0 off */
    bool expandable;
    uint64_t expandable_chunk;
    char report[4096];
    int verbose;
    int report_format;      /* 0 text, 1 json */
    int report_signal;      /* 0 off, 1-2 SIGUSR1, 3-4 SIGUSR2 (gm_config_report_signal) */
    int report_interval;    /* seconds, 0 off */
    bool oom_report;
    int oom_report_interval; /* seconds */
    char suppressions[4096];
    int leak_exitcode;
    int stack_depth;
    int stack_unwinder;     /* 0 fp, 1 dwarf */
    char trace[4096];
    int trace_interval_us;
    bool check_copies;
    bool staging;
    uint64_t staging_min;
    uint64_t staging_chunk;
    int staging_threads;
    bool pinned_pool;
    uint64_t pinned_max_cached;             /* GM_UNLIMITED for "unlimited" */
    char ipc_dir[4096];
    char shared[4096];
    int publish_interval_ms;
} gm_config;

/* The signal number GPUMEM_REPORT_SIGNAL names, or 0 for off. */
int gm_config_report_signal(const gm_config *cfg);

/* Reads an environment-like source. `get` returns the value of a variable or NULL.
 * `names` (may be NULL) lists every variable name present, NULL-terminated, to warn about unknown
 * GPUMEM_* names. Returns 0 on success; on error writes one line to `err` and returns -1. */
typedef const char *(*gm_env_get_fn)(const char *name, void *user);
int gm_config_parse(gm_config *out, gm_env_get_fn get, void *user, char *const *names,
                    char *err, size_t errlen);

/* Defaults only (what gm_config_parse yields with an empty environment). */
void gm_config_defaults(gm_config *out);

/* The process-wide configuration, read from the environment on first use. On a bad value prints
 * the error line ("gpumem: ...") to stderr and exits with status 2. */
const gm_config *gm_config_get(void);

/* Test hook: forget the loaded configuration so the next gm_config_get() reads again. */
void gm_config_reset_for_tests(void);

/* Parsers, exposed for tests. Return 0 on success, -1 on malformed / out-of-range input. */
int gm_parse_size(const char *text, uint64_t *out);
int gm_parse_bool(const char *text, bool *out);
int gm_parse_limit(const char *text, gm_limit_setting *out); /* one device's value: size, %, none */

/* The limit setting of the device the process sees as ordinal `device`, whose UUID is `uuid`
 * (NULL: the driver named none): its GPUMEM_LIMIT_<i>, else a GPUMEM_LIMIT entry naming its UUID,
 * else what GPUMEM_LIMIT says for its ordinal. */
const gm_limit_setting *gm_config_limit_of(const gm_config *cfg, int device, const unsigned char *uuid);

/* Checks the per-device limits against the devices this process sees: `count` ordinals,
 * `uuid[i]` the UUID of ordinal i where `has_uuid[i]`. An ordinal named by GPUMEM_LIMIT's list
 * or a GPUMEM_LIMIT_<i> must be below `count`; a UUID entry must be one of theirs, unless
 * `subset` (CUDA_VISIBLE_DEVICES hides some of the host's devices: the entry may be for one of
 * them, and is skipped); GPUMEM_LIMIT may not name one device both by ordinal and by UUID.
 * 0, or -1 with one line ("gpumem: GPUMEM_LIMIT='...' is not valid: ...") in `err`. */
int gm_config_check_devices(const gm_config *cfg, int count, const unsigned char (*uuid)[16],
                            const bool *has_uuid, bool subset, char *err, size_t errlen);

/* gm_config_check_devices on the process's configuration, `subset` from CUDA_VISIBLE_DEVICES;
 * on a bad setting prints the line and exits with status 2, as gm_config_get does. */
void gm_config_check_devices_or_exit(int count, const unsigned char (*uuid)[16], const bool *has_uuid);

/* A limit setting to bytes for a device of `device_total` bytes; 0 means "no limit". */
uint64_t gm_limit_resolve(const gm_limit_setting *setting, uint64_t device_total);

#endif
