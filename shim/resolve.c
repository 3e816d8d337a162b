/* Resolution: how a program's driver calls reach our hooks, whichever way it finds the driver.
 *
 *  - Programs linked with -lcuda bind to the cu* functions this library exports (it is loaded
 *    first, by LD_PRELOAD).
 *  - cudart (static or shared) and most frameworks dlopen libcuda.so.1, dlsym one
 *    cuGetProcAddress_v2 and fetch every entry point through it. We export dlsym and answer the
 *    names of our hooks with our functions; cuGetProcAddress answers are compared against the
 *    real addresses of the entry points we hook, so every ABI version and per-thread-stream
 *    variant maps to the hook of exactly that variant, and anything else passes through.
 *  - NVML clients (nvidia-smi dlopens libnvidia-ml.so.1 and dlsyms each name; others link
 *    -lnvidia-ml) reach the hooks of hooks_nvml.def the same two ways.
 *
 * dlsym(RTLD_NEXT, ...) is resolved by glibc relative to its caller's object, so forwarding it
 * from a C wrapper would search from the shim instead. Our dlsym is a small trampoline that asks
 * the C side for a hook and otherwise *jumps* to libc's dlsym with the caller's return address
 * still on the stack. */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include "shim.h"

#define SHIM_HOOK(name) __typeof__(name) *shim_real_##name;
#include "hooks.def"
#undef SHIM_HOOK

typedef struct shim_entry {
    const char *name;
    void *hook;
    void **real;
} shim_entry;

static shim_entry entries[] = {
#define SHIM_HOOK(name) {#name, (void *)name, (void **)&shim_real_##name},
#include "hooks.def"
#undef SHIM_HOOK
};
#define NENTRIES (sizeof entries / sizeof *entries)

#define SHIM_NVML_HOOK(name) __typeof__(name) *shim_real_##name;
#include "hooks_nvml.def"
#undef SHIM_NVML_HOOK

static shim_entry nvml_entries[] = {
#define SHIM_NVML_HOOK(name) {#name, (void *)name, (void **)&shim_real_##name},
#include "hooks_nvml.def"
#undef SHIM_NVML_HOOK
};
#define NNVML (sizeof nvml_entries / sizeof *nvml_entries)

_Atomic bool shim_ready;
bool shim_trace;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* ------------------------------------------------------------------ init and exit */

static void resolve_reals(void)
{
    for (size_t i = 0; i < NENTRIES; i++) *entries[i].real = gm_driver_sym(entries[i].name);
}

static void init_once_fn(void)
{
    resolve_reals();
    const gm_backend *be = gm_cuda_backend();
    if (!be) {
        gm_log(GM_ERROR, "libcuda.so.1 has none of the entry points gpumem needs; memory calls pass through");
        return;
    }
    gm_report_start(be);
    shim_trace = gm_mgr.cfg->verbose >= GM_TRACE;
    atomic_store_explicit(&shim_ready, true, memory_order_release);
}

void shim_init_slow(void)
{
    pthread_once(&init_once, init_once_fn);
}

/* The exit report is an on_exit handler the manager installs at its first use (it sees the exit
 * status, for GPUMEM_LEAK_EXITCODE). */

/* ------------------------------------------------------------------ NVML
 * Resolved apart from the driver, once, at the first NVML hook called or NVML name looked up:
 * a CUDA program may never load NVML, and nvidia-smi loads it without ever loading CUDA. By then
 * NVML is loaded (the program linked it, or holds the handle it asks dlsym about), so a
 * resolution that finds no NVML means there is none. */

static void *nvml_handle;
static pthread_once_t nvml_once = PTHREAD_ONCE_INIT;

/* The NVML the program loaded (by soname), else one of our own. */
static void nvml_open(void)
{
    nvml_handle = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!nvml_handle) nvml_handle = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    /* dlsym on NVML's own handle finds NVML's definition, never the one this library exports. */
    for (size_t i = 0; nvml_handle && i < NNVML; i++)
        *nvml_entries[i].real = gm_real_dlsym()(nvml_handle, nvml_entries[i].name);
}

bool shim_nvml_resolve(void)
{
    pthread_once(&nvml_once, nvml_open);
    return nvml_handle != NULL;
}

void *shim_nvml_sym(const char *name)
{
    return shim_nvml_resolve() ? gm_real_dlsym()(nvml_handle, name) : NULL;
}

/* ------------------------------------------------------------------ lookups */

GM_NO_SANITIZE static shim_entry *entry_by_name(const char *name)
{
    if (!name || name[0] != 'c' || name[1] != 'u') return NULL;
    for (size_t i = 0; i < NENTRIES; i++)
        if (strcmp(entries[i].name, name) == 0) return &entries[i];
    return NULL;
}

GM_NO_SANITIZE static shim_entry *nvml_entry_by_name(const char *name)
{
    if (!name || strncmp(name, "nvml", 4) != 0) return NULL;
    for (size_t i = 0; i < NNVML; i++)
        if (strcmp(nvml_entries[i].name, name) == 0) return &nvml_entries[i];
    return NULL;
}

static shim_entry *entry_by_real(void *real)
{
    if (!real) return NULL;
    for (size_t i = 0; i < NENTRIES; i++)
        if (*entries[i].real == real) return &entries[i];
    return NULL;
}

/* ------------------------------------------------------------------ dlsym */

/* Used by the trampoline: jump target for everything we do not answer ourselves. */
__attribute__((visibility("hidden"))) void *shim_libc_dlsym;

/* nvidia-smi dlopens libnvidia-ml.so.1 and dlsyms every name: the same rule as for cu* (only a
 * handle that has the name gets our hook). The shim is not started here: the hook starts it
 * when it is called, so a program that only looks names up never loads the driver. */
GM_NO_SANITIZE static void *nvml_lookup(void *handle, const char *name)
{
    shim_entry *e = nvml_entry_by_name(name);
    if (!e) return NULL;
    if (handle != RTLD_NEXT && !gm_real_dlsym()(handle, name)) return NULL;
    if (!shim_nvml_resolve() || !*e->real) return NULL;
    SHIM_TRACE("dlsym %s -> hooked", name);
    return e->hook;
}

/* Returns our hook for `name`, or NULL to let libc's dlsym answer. */
__attribute__((visibility("hidden"), used)) GM_NO_SANITIZE void *shim_dlsym_lookup(void *handle,
                                                                                const char *name)
{
    if (!shim_libc_dlsym) shim_libc_dlsym = (void *)gm_real_dlsym();
    shim_entry *e = entry_by_name(name);
    if (!e) return nvml_lookup(handle, name);
    shim_init();
    /* Answer only where the driver itself would: a handle without the symbol still gets NULL. */
    if (handle != RTLD_NEXT && !gm_real_dlsym()(handle, name)) return NULL;
    if (!*e->real) return NULL;
    SHIM_TRACE("dlsym %s -> hooked", name);
    return e->hook;
}

#if defined(__x86_64__)
__asm__(".text\n"
        ".globl dlsym\n"
        ".type dlsym, @function\n"
        "dlsym:\n"
        "    pushq %rdi\n"
        "    pushq %rsi\n"
        "    subq $8, %rsp\n"          /* 16-byte alignment for the call */
        "    call shim_dlsym_lookup\n"
        "    addq $8, %rsp\n"
        "    popq %rsi\n"
        "    popq %rdi\n"
        "    testq %rax, %rax\n"
        "    jnz 1f\n"
        "    jmp *shim_libc_dlsym(%rip)\n" /* tail jump: libc sees the caller's return address */
        "1:  ret\n"
        ".size dlsym, .-dlsym\n");
#elif defined(__aarch64__)
__asm__(".text\n"
        ".globl dlsym\n"
        ".type dlsym, %function\n"
        "dlsym:\n"
        "    stp x29, x30, [sp, #-32]!\n"
        "    stp x0, x1, [sp, #16]\n"
        "    bl shim_dlsym_lookup\n"
        "    mov x9, x0\n"
        "    ldp x0, x1, [sp, #16]\n"
        "    ldp x29, x30, [sp], #32\n"
        "    cbnz x9, 1f\n"
        "    adrp x16, shim_libc_dlsym\n"
        "    ldr x16, [x16, :lo12:shim_libc_dlsym]\n"
        "    br x16\n"
        "1:  mov x0, x9\n"
        "    ret\n"
        ".size dlsym, .-dlsym\n");
#else
#error "gpumem's dlsym trampoline supports x86-64 and aarch64"
#endif

/* ------------------------------------------------------------------ cuGetProcAddress */

/* Swaps a real entry point the driver handed out for our hook of that same variant. */
static void substitute(const char *symbol, void **pfn, int version, cuuint64_t flags)
{
    shim_entry *e = entry_by_real(*pfn);
    if (e) *pfn = e->hook;
    if (__builtin_expect(shim_trace, 0))
        gm_log(GM_TRACE, "getproc %s v%d flags=%llu -> %s%s", symbol, version,
               (unsigned long long)flags, e ? "hooked " : "passthrough", e ? e->name : "");
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cuda_version, cuuint64_t flags,
                             CUdriverProcAddressQueryResult *status)
{
    shim_init();
    SHIM_REQUIRE_REAL(cuGetProcAddress_v2);
    CUresult rc = shim_real_cuGetProcAddress_v2(symbol, pfn, cuda_version, flags, status);
    if (rc == CUDA_SUCCESS && pfn && *pfn) substitute(symbol, pfn, cuda_version, flags);
    return rc;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cuda_version, cuuint64_t flags)
{
    shim_init();
    SHIM_REQUIRE_REAL(cuGetProcAddress);
    CUresult rc = shim_real_cuGetProcAddress(symbol, pfn, cuda_version, flags);
    if (rc == CUDA_SUCCESS && pfn && *pfn) substitute(symbol, pfn, cuda_version, flags);
    return rc;
}
