/* A stand-in for the part of Criterion the preload-path tests use, for ThreadSanitizer builds.
 *
 * Criterion cannot start under ThreadSanitizer (boxfort's shared arena is mapped at an address
 * TSan's mmap interceptor refuses: "Could not initialize inheritable arena"), yet the LD_PRELOAD
 * path is where races between the program's threads and the shim live. This header keeps the
 * test sources unchanged: Test() registers a function, the cr_assert and cr_expect families
 * check, and criterion_lite.c's main runs every test in a process of its own, as Criterion does,
 * so each test starts with a fresh shim, manager and fake driver. */
#ifndef GPUMEM_CRITERION_LITE_H
#define GPUMEM_CRITERION_LITE_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Test()'s options are designated initializers of this struct, as in Criterion; an option it
 * does not have fails to compile rather than being ignored. */
typedef struct crl_test {
    const char *suite_name, *test_name; /* not "suite"/"name": Test()'s parameters */
    void (*fn)(void);
    struct crl_test *next;
    void (*init)(void), (*fini)(void);
    double timeout; /* seconds; 0: the runner's default */
    bool disabled;
} crl_test;

void crl_register(crl_test *t);
/* Reports a failed check; `fatal` ends the test at once (cr_assert), else it fails at the end.
 * No printf format attribute: cr_assert(cond) passes an empty format, and messages may print
 * strings that are NULL on a failing path (glibc prints "(null)", as under Criterion). */
void crl_fail(bool fatal, const char *file, int line, const char *what, const char *fmt, ...);
/* Ends the test as skipped. */
__attribute__((noreturn)) void crl_skip(const char *fmt, ...);

#define Test(suite, name, ...)                                                   \
    static void crl_fn_##suite##_##name(void);                                   \
    static crl_test crl_test_##suite##_##name = {                                \
        .suite_name = #suite, .test_name = #name, .fn = crl_fn_##suite##_##name, __VA_ARGS__}; \
    __attribute__((constructor)) static void crl_reg_##suite##_##name(void)      \
    {                                                                            \
        crl_register(&crl_test_##suite##_##name);                                \
    }                                                                            \
    static void crl_fn_##suite##_##name(void)

#define CRL_CHECK(fatal, ok, what, ...)                                  \
    do {                                                                 \
        if (!(ok)) crl_fail((fatal), __FILE__, __LINE__, what, "" __VA_ARGS__); \
    } while (0)

#define cr_assert(cond, ...) CRL_CHECK(true, cond, #cond, __VA_ARGS__)
#define cr_expect(cond, ...) CRL_CHECK(false, cond, #cond, __VA_ARGS__)
#define cr_assert_fail(...) CRL_CHECK(true, false, "cr_assert_fail", __VA_ARGS__)

#define CRL_CMP(fatal, a, op, b, ...) CRL_CHECK(fatal, (a) op (b), #a " " #op " " #b, __VA_ARGS__)
#define cr_assert_eq(a, b, ...) CRL_CMP(true, a, ==, b, __VA_ARGS__)
#define cr_assert_neq(a, b, ...) CRL_CMP(true, a, !=, b, __VA_ARGS__)
#define cr_assert_lt(a, b, ...) CRL_CMP(true, a, <, b, __VA_ARGS__)
#define cr_assert_leq(a, b, ...) CRL_CMP(true, a, <=, b, __VA_ARGS__)
#define cr_assert_gt(a, b, ...) CRL_CMP(true, a, >, b, __VA_ARGS__)
#define cr_assert_geq(a, b, ...) CRL_CMP(true, a, >=, b, __VA_ARGS__)
#define cr_expect_eq(a, b, ...) CRL_CMP(false, a, ==, b, __VA_ARGS__)
#define cr_expect_neq(a, b, ...) CRL_CMP(false, a, !=, b, __VA_ARGS__)
#define cr_expect_lt(a, b, ...) CRL_CMP(false, a, <, b, __VA_ARGS__)
#define cr_expect_leq(a, b, ...) CRL_CMP(false, a, <=, b, __VA_ARGS__)
#define cr_expect_gt(a, b, ...) CRL_CMP(false, a, >, b, __VA_ARGS__)
#define cr_expect_geq(a, b, ...) CRL_CMP(false, a, >=, b, __VA_ARGS__)
#define cr_assert_null(p, ...) CRL_CHECK(true, (p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_assert_not_null(p, ...) CRL_CHECK(true, (p) != NULL, #p " != NULL", __VA_ARGS__)
#define cr_expect_null(p, ...) CRL_CHECK(false, (p) == NULL, #p " == NULL", __VA_ARGS__)
#define cr_expect_not_null(p, ...) CRL_CHECK(false, (p) != NULL, #p " != NULL", __VA_ARGS__)
#define cr_assert_str_eq(a, b, ...) CRL_CHECK(true, strcmp((a), (b)) == 0, #a " eq " #b, __VA_ARGS__)
#define cr_assert_str_neq(a, b, ...) CRL_CHECK(true, strcmp((a), (b)) != 0, #a " neq " #b, __VA_ARGS__)
#define cr_expect_str_eq(a, b, ...) CRL_CHECK(false, strcmp((a), (b)) == 0, #a " eq " #b, __VA_ARGS__)
#define cr_assert_arr_eq(a, b, size, ...) \
    CRL_CHECK(true, memcmp((a), (b), (size)) == 0, #a " eq " #b, __VA_ARGS__)
#define cr_skip_test(...) crl_skip("" __VA_ARGS__)
#define cr_assert_float_eq(a, b, eps, ...) \
    CRL_CHECK(true, fabs((double)(a) - (double)(b)) <= (eps), #a " ~ " #b, __VA_ARGS__)
#define cr_expect_float_eq(a, b, eps, ...) \
    CRL_CHECK(false, fabs((double)(a) - (double)(b)) <= (eps), #a " ~ " #b, __VA_ARGS__)

#endif
