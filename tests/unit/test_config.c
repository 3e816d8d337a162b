/* Configuration: every accepted form of every option type, every class of bad value (and the one
 * error line it must produce), unknown-variable warnings, and the process-wide load. Most tests
 * parse a small fake environment through the `get` callback, so they never touch the real one. */
#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <locale.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gm_config.h"

#define KiB ((uint64_t)1 << 10)
#define MiB ((uint64_t)1 << 20)
#define GiB ((uint64_t)1 << 30)
#define TiB ((uint64_t)1 << 40)

/* ---------------------------------------------------------------- a fake environment */

/* NAME, VALUE, NAME, VALUE, ..., NULL */
#define ENV(...) ((const char *const[]){__VA_ARGS__, NULL})
#define NO_ENV ((const char *const[]){NULL})

static const char *fake_get(const char *name, void *user)
{
    const char *const *pairs = user;
    for (size_t i = 0; pairs[i]; i += 2)
        if (strcmp(pairs[i], name) == 0)
            return pairs[i + 1];
    return NULL;
}

/* The names of a pair list, as gm_config_parse's `names` argument. */
static char *const *fake_names(const char *const *pairs)
{
    static char *names[64];
    size_t n = 0;
    for (size_t i = 0; pairs[i] && n < 63; i += 2)
        names[n++] = (char *)pairs[i];
    names[n] = NULL;
    return names;
}

static char err[1024];

static int parse(const char *const *pairs, gm_config *cfg)
{
    return gm_config_parse(cfg, fake_get, (void *)pairs, fake_names(pairs), err, sizeof err);
}

/* Runs gm_config_parse with stderr pointed at a temporary file; returns what was printed. */
static char captured[4096];

static int parse_capturing(const char *const *pairs, char *const *names, gm_config *cfg)
{
    FILE *saved = stderr, *tmp = tmpfile();
    cr_assert_not_null(tmp);
    stderr = tmp;
    int rc = gm_config_parse(cfg, fake_get, (void *)pairs, names, err, sizeof err);
    stderr = saved;
    rewind(tmp);
    size_t n = fread(captured, 1, sizeof captured - 1, tmp);
    captured[n] = '\0';
    fclose(tmp);
    return rc;
}

/* One variable set to a bad value: parsing fails with one line naming the variable, the value as
 * given and containing `fragment` (the accepted forms, the range or the reason). */
static void expect_error_for(const char *name, const char *value, const char *fragment)
{
    gm_config cfg;
    char head[512];
    const char *pairs[] = {name, value, NULL};
    cr_assert_eq(parse(pairs, &cfg), -1, "%s='%s' was accepted", name, value);
    snprintf(head, sizeof head, "gpumem: %s='%s' is not valid: ", name, value);
    cr_assert(strncmp(err, head, strlen(head)) == 0, "error line: %s", err);
    cr_assert_null(strchr(err, '\n'), "error is not one line: %s", err);
    cr_assert_not_null(strstr(err, fragment), "'%s' not in: %s", fragment, err);
    cr_assert(strstr(err, "expected ") != NULL, "no accepted forms in: %s", err);
}

static gm_config parse_ok(const char *const *pairs)
{
    gm_config cfg;
    int rc = parse(pairs, &cfg);
    cr_assert_eq(rc, 0, "unexpected error: %s", err);
    return cfg;
}

/* ---------------------------------------------------------------- the table */

Test(config_table, has_every_option_once)
{
    cr_assert_eq(gm_option_count, 37);
    for (size_t i = 0; i < gm_option_count; i++) {
        cr_assert(strncmp(gm_options[i].name, "GPUMEM_", 7) == 0);
        cr_assert_not_null(gm_options[i].default_value);
        cr_assert(gm_options[i].doc && gm_options[i].doc[0]);
        for (size_t j = i + 1; j < gm_option_count; j++)
            cr_assert_str_neq(gm_options[i].name, gm_options[j].name);
    }
    cr_assert_str_eq(gm_options[0].name, "GPUMEM_POOL");
    cr_assert_eq(gm_options[0].type, GM_OPT_BOOL);
    cr_assert_str_eq(gm_options[4].name, "GPUMEM_LIMIT_<i>");
    cr_assert_eq(gm_options[6].min, 2097152.0);
    cr_assert_eq(gm_options[13].max, 3.0);
}

Test(config_table, defaults)
{
    gm_config cfg = parse_ok(NO_ENV);
    cr_assert(cfg.pool);
    cr_assert(cfg.free_sync);
    cr_assert_eq(cfg.fence_batch, 1024 * MiB);
    for (int i = 0; i < GM_MAX_DEVICES; i++)
        cr_assert_eq(cfg.limit[i].kind, GM_LIMIT_NONE);
    cr_assert_eq(cfg.growth_factor, 2.0);
    cr_assert_eq(cfg.segment_min, 8 * MiB);
    cr_assert_eq(cfg.segment_max, 1 * GiB);
    cr_assert_eq(cfg.small_segment, 2 * MiB);
    cr_assert_eq(cfg.dedicated_min, 256 * MiB);
    cr_assert_eq(cfg.max_cached, GM_UNLIMITED);
    cr_assert_str_eq(cfg.report, "stderr");
    cr_assert_eq(cfg.verbose, 0);
}

Test(config_table, defaults_function_matches_empty_environment)
{
    gm_config a, b;
    gm_config_defaults(&a);
    cr_assert_eq(gm_config_parse(&b, NULL, NULL, NULL, err, sizeof err), 0);
    cr_assert_eq(a.pool, b.pool);
    cr_assert_eq(a.segment_max, b.segment_max);
    cr_assert_eq(a.max_cached, b.max_cached);
    cr_assert_str_eq(a.report, b.report);
    for (int i = 0; i < GM_MAX_DEVICES; i++) {
        cr_assert_eq(a.limit[i].kind, b.limit[i].kind);
        cr_assert_eq(a.limit[i].bytes, b.limit[i].bytes);
    }
}

/* ---------------------------------------------------------------- sizes */

static void expect_size(const char *text, uint64_t want)
{
    uint64_t got = 12345;
    cr_assert_eq(gm_parse_size(text, &got), 0, "'%s' was refused", text);
    cr_assert_eq(got, want, "'%s' -> %llu, expected %llu", text, (unsigned long long)got,
                 (unsigned long long)want);
}

static void expect_bad_size(const char *text)
{
    uint64_t got = 12345;
    cr_assert_eq(gm_parse_size(text, &got), -1, "'%s' was accepted", text);
    cr_assert_eq(got, 12345, "'%s' wrote the output", text);
}

Test(size, plain_bytes)
{
    expect_size("0", 0);
    expect_size("1", 1);
    expect_size("1048576", MiB);
    expect_size("007", 7);
    expect_size("18446744073709551615", UINT64_MAX);
}

Test(size, every_suffix)
{
    expect_size("512B", 512);
    expect_size("4K", 4 * KiB);
    expect_size("4KB", 4 * KiB);
    expect_size("4KiB", 4 * KiB);
    expect_size("4M", 4 * MiB);
    expect_size("4MB", 4 * MiB);
    expect_size("4MiB", 4 * MiB);
    expect_size("4G", 4 * GiB);
    expect_size("4GB", 4 * GiB);
    expect_size("4GiB", 4 * GiB);
    expect_size("4T", 4 * TiB);
    expect_size("4TB", 4 * TiB);
    expect_size("4TiB", 4 * TiB);
}

Test(size, suffixes_ignore_case)
{
    expect_size("4gib", 4 * GiB);
    expect_size("4GIB", 4 * GiB);
    expect_size("4Gib", 4 * GiB);
    expect_size("4g", 4 * GiB);
    expect_size("4gB", 4 * GiB);
    expect_size("2k", 2 * KiB);
    expect_size("3mib", 3 * MiB);
    expect_size("1tIb", TiB);
    expect_size("512b", 512);
}

Test(size, decimals_round_down)
{
    expect_size("1.5GiB", GiB + GiB / 2);
    expect_size("1.5G", GiB + GiB / 2);
    expect_size("0.5K", 512);
    expect_size("2.25M", 2 * MiB + MiB / 4);
    expect_size("0.1K", 102);         /* 102.4 */
    expect_size("0.001KiB", 1);       /* 1.024 */
    expect_size("0.0001KiB", 0);      /* 0.1024 */
    expect_size("1.0", 1);            /* a whole number of bytes, written with a fraction */
    expect_size("3.000B", 3);
    expect_size("0.33333333333333333333333333G", 357913941); /* 357913941.33 */
}

Test(size, whitespace_is_trimmed)
{
    expect_size("  4GiB", 4 * GiB);
    expect_size("4GiB  ", 4 * GiB);
    expect_size("\t 4GiB \n", 4 * GiB);
    expect_size("4 GiB", 4 * GiB);
    expect_size(" 4 GiB ", 4 * GiB);
    expect_size("4 B", 4);
    expect_size(" 1048576 ", MiB);
}

Test(size, largest_values)
{
    expect_size("16777215TiB", UINT64_MAX - TiB + 1);
    expect_bad_size("16777216TiB");         /* exactly 2^64 */
    expect_bad_size("17179869184GiB");      /* exactly 2^64 */
    expect_bad_size("18446744073709551616"); /* UINT64_MAX + 1 */
    expect_bad_size("99999999999999999999999999");
    expect_size("16777215.99999999999999999999TiB", UINT64_MAX); /* rounds down, so it fits */
    expect_size("16777215.5TiB", UINT64_MAX - TiB + 1 + TiB / 2);
    expect_bad_size("16777216.5TiB");
}

Test(size, malformed)
{
    expect_bad_size("");
    expect_bad_size("   ");
    expect_bad_size("-1");
    expect_bad_size("-1GiB");
    expect_bad_size("+5");
    expect_bad_size("abc");
    expect_bad_size("GiB");
    expect_bad_size("4XB");
    expect_bad_size("4GiBx");
    expect_bad_size("4GiB 4");
    expect_bad_size("4 G iB");
    expect_bad_size("4  GiB"); /* one space may separate number and unit, not two */
    expect_bad_size("4   G");
    expect_bad_size("4\tGiB");
    expect_bad_size("1.5  G");
    expect_bad_size("4Gi");
    expect_bad_size("4KiBB");
    expect_bad_size("4E");
    expect_bad_size("4P");
    expect_bad_size("1.");
    expect_bad_size(".5G");
    expect_bad_size("1..5G");
    expect_bad_size("1.5.2G");
    expect_bad_size("1,5G");
    expect_bad_size("1e3");
    expect_bad_size("0x10");
    expect_bad_size("nan");
    expect_bad_size("NaN");
    expect_bad_size("inf");
    expect_bad_size("infinity");
    expect_bad_size(NULL);
}

Test(size, fractional_bytes_are_refused)
{
    expect_bad_size("1.5");
    expect_bad_size("1.5B");
    expect_bad_size("0.1");
    expect_bad_size("1048576.0001");
}

/* ---------------------------------------------------------------- booleans */

static void expect_bool(const char *text, bool want)
{
    bool got = !want;
    cr_assert_eq(gm_parse_bool(text, &got), 0, "'%s' was refused", text);
    cr_assert_eq(got, want, "'%s'", text);
}

Test(boolean, every_word_any_case)
{
    const char *yes[] = {"1", "true", "yes", "on", "TRUE", "True", "YES", "On", "oN", " yes "};
    const char *no[] = {"0", "false", "no", "off", "FALSE", "False", "NO", "Off", "OFF", "\t0\n"};
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++)
        expect_bool(yes[i], true);
    for (size_t i = 0; i < sizeof no / sizeof no[0]; i++)
        expect_bool(no[i], false);
}

Test(boolean, malformed)
{
    const char *bad[] = {"", " ", "2", "-1", "y", "n", "t", "f", "truee", "yess", "of", "enable",
                         "1.0", "01", "on off"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        bool got;
        cr_assert_eq(gm_parse_bool(bad[i], &got), -1, "'%s' was accepted", bad[i]);
    }
    bool got;
    cr_assert_eq(gm_parse_bool(NULL, &got), -1);
}

/* ---------------------------------------------------------------- limit values */

static gm_limit_setting limit_of(const char *text)
{
    gm_limit_setting s;
    cr_assert_eq(gm_parse_limit(text, &s), 0, "'%s' was refused", text);
    return s;
}

Test(limit_value, none_size_and_percent)
{
    cr_assert_eq(limit_of("none").kind, GM_LIMIT_NONE);
    cr_assert_eq(limit_of("NONE").kind, GM_LIMIT_NONE);
    cr_assert_eq(limit_of(" None ").kind, GM_LIMIT_NONE);
    gm_limit_setting s = limit_of("4GiB");
    cr_assert_eq(s.kind, GM_LIMIT_BYTES);
    cr_assert_eq(s.bytes, 4 * GiB);
    cr_assert_eq(limit_of("1").bytes, 1);
    cr_assert_eq(limit_of("1.5g").bytes, GiB + GiB / 2);
    s = limit_of("80%");
    cr_assert_eq(s.kind, GM_LIMIT_PERCENT);
    cr_assert_eq(s.percent, 80.0);
    cr_assert_eq(limit_of("12.5%").percent, 12.5);
    cr_assert_eq(limit_of("100%").percent, 100.0);
    cr_assert_eq(limit_of("0.001%").percent, 0.001);
    cr_assert_eq(limit_of(" 50 % ").percent, 50.0);
    cr_assert_eq(limit_of("4 GiB").bytes, 4 * GiB);
}

Test(limit_value, malformed)
{
    const char *bad[] = {"", "0", "0B", "0GiB", "0.0001K" /* rounds to 0 bytes */, "0%", "0.0%",
                         "100.5%", "101%", "1000%", "-5%", "-1", "%", "abc%", "5%%", "1e2%",
                         "nan%", "inf%", ".5%", "5.%", "50  %", "4  GiB", "4XB", "unlimited", "nones", "0:4GiB",
                         "1.5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        gm_limit_setting s;
        cr_assert_eq(gm_parse_limit(bad[i], &s), -1, "'%s' was accepted", bad[i]);
    }
    gm_limit_setting s;
    cr_assert_eq(gm_parse_limit(NULL, &s), -1);
}

Test(limit_value, resolve)
{
    gm_limit_setting none = {GM_LIMIT_NONE, 0, 0};
    gm_limit_setting bytes = {GM_LIMIT_BYTES, 4 * GiB, 0};
    gm_limit_setting half = {GM_LIMIT_PERCENT, 0, 50.0};
    gm_limit_setting eighth = {GM_LIMIT_PERCENT, 0, 12.5};
    gm_limit_setting tiny = {GM_LIMIT_PERCENT, 0, 0.0001};
    gm_limit_setting all = {GM_LIMIT_PERCENT, 0, 100.0};
    gm_limit_setting third = {GM_LIMIT_PERCENT, 0, 100.0 / 3.0};
    cr_assert_eq(gm_limit_resolve(&none, 80 * GiB), 0);
    cr_assert_eq(gm_limit_resolve(&bytes, 80 * GiB), 4 * GiB);
    cr_assert_eq(gm_limit_resolve(&half, 80 * GiB), 40 * GiB);
    cr_assert_eq(gm_limit_resolve(&half, 1001), 500); /* floor */
    cr_assert_eq(gm_limit_resolve(&eighth, 1000), 125);
    cr_assert_eq(gm_limit_resolve(&tiny, 100), 1);    /* never 0, which would mean no limit */
    cr_assert_eq(gm_limit_resolve(&half, 0), 1);
    cr_assert_eq(gm_limit_resolve(&all, 80 * GiB), 80 * GiB);
    cr_assert_eq(gm_limit_resolve(&all, UINT64_MAX), UINT64_MAX);
    cr_assert_eq(gm_limit_resolve(&third, 3000), 1000);
    cr_assert(gm_limit_resolve(&half, UINT64_MAX) <= UINT64_MAX / 2 + 1);
}

/* ---------------------------------------------------------------- every option, valid */

Test(config_valid, booleans)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_POOL", "off", "GPUMEM_FREE_SYNC", "No"));
    cr_assert(!cfg.pool);
    cr_assert(!cfg.free_sync);
    cfg = parse_ok(ENV("GPUMEM_POOL", "YES", "GPUMEM_FREE_SYNC", "0"));
    cr_assert(cfg.pool);
    cr_assert(!cfg.free_sync);
}

Test(config_valid, numbers)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_GROWTH_FACTOR", " 1.5 ", "GPUMEM_VERBOSE", "3"));
    cr_assert_eq(cfg.growth_factor, 1.5);
    cr_assert_eq(cfg.verbose, 3);
    cfg = parse_ok(ENV("GPUMEM_GROWTH_FACTOR", "1", "GPUMEM_VERBOSE", "0"));
    cr_assert_eq(cfg.growth_factor, 1.0);
    cr_assert_eq(cfg.verbose, 0);
    cfg = parse_ok(ENV("GPUMEM_GROWTH_FACTOR", "16", "GPUMEM_VERBOSE", " 2"));
    cr_assert_eq(cfg.growth_factor, 16.0);
    cr_assert_eq(cfg.verbose, 2);
    cfg = parse_ok(ENV("GPUMEM_GROWTH_FACTOR", "16.0", "GPUMEM_VERBOSE", "03"));
    cr_assert_eq(cfg.growth_factor, 16.0);
    cr_assert_eq(cfg.verbose, 3);
    cfg = parse_ok(ENV("GPUMEM_GROWTH_FACTOR", "01.25", "GPUMEM_STACK_DEPTH", "64"));
    cr_assert_eq(cfg.growth_factor, 1.25);
    cr_assert_eq(cfg.stack_depth, 64);
}

/* The documented forms only: digits, a fraction for numbers, one space before a unit. */
Test(config_invalid, numbers_are_plain_decimal)
{
    const char *number = "expected a decimal number from 1 to 16";
    const char *bad_numbers[] = {"0x10", "0X10", "0x1.8p1", "1e1", "1E1", "1.6e1", "+2", "+1.5",
                                 "1.", ".5", "1.5.0", "1,5", "- 2", "2 .5"};
    for (size_t i = 0; i < sizeof bad_numbers / sizeof *bad_numbers; i++)
        expect_error_for("GPUMEM_GROWTH_FACTOR", bad_numbers[i], number);
    const char *integer = "expected a whole decimal number from 0 to 3";
    const char *bad_integers[] = {"+1", "+0", "0x1", "1e0", "1.0", "1.", " + 1", "--1"};
    for (size_t i = 0; i < sizeof bad_integers / sizeof *bad_integers; i++)
        expect_error_for("GPUMEM_VERBOSE", bad_integers[i], integer);
    expect_error_for("GPUMEM_STAGING_MIN", "4  GiB", "expected a size (e.g. 4GiB");
    expect_error_for("GPUMEM_LIMIT", "50  %", "a percentage of device memory");
    /* ...and the one-space forms next to them are fine. */
    gm_config cfg = parse_ok(ENV("GPUMEM_STAGING_MIN", "4 GiB", "GPUMEM_LIMIT", "50 %"));
    cr_assert_eq(cfg.staging_min, 4 * GiB);
    cr_assert_eq(cfg.limit[0].percent, 50.0);
}

/* A program may switch to a decimal-comma locale before its first allocation. */
Test(config_valid, decimals_ignore_the_program_locale)
{
    const char *locales[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "de_DE"};
    const char *set = NULL;
    for (size_t i = 0; i < sizeof locales / sizeof locales[0] && !set; i++)
        set = setlocale(LC_NUMERIC, locales[i]);
    if (!set)
        cr_skip_test("no decimal-comma locale installed");
    gm_config cfg = parse_ok(ENV("GPUMEM_GROWTH_FACTOR", "1.5", "GPUMEM_LIMIT", "12.5%"));
    cr_assert_eq(cfg.growth_factor, 1.5);
    cr_assert_eq(cfg.limit[0].percent, 12.5);
    setlocale(LC_NUMERIC, "C");
}

Test(config_valid, sizes_at_their_bounds)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_SEGMENT_MIN", "2MiB", "GPUMEM_SEGMENT_MAX", "1TiB",
                                 "GPUMEM_SMALL_SEGMENT", "1MiB", "GPUMEM_DEDICATED_MIN", "1T"));
    cr_assert_eq(cfg.segment_min, 2 * MiB);
    cr_assert_eq(cfg.segment_max, TiB);
    cr_assert_eq(cfg.small_segment, MiB);
    cr_assert_eq(cfg.dedicated_min, TiB);
    cfg = parse_ok(ENV("GPUMEM_SEGMENT_MIN", "2097152", "GPUMEM_SEGMENT_MAX", "2097152",
                       "GPUMEM_SMALL_SEGMENT", "1GiB", "GPUMEM_DEDICATED_MIN", "1048576"));
    cr_assert_eq(cfg.segment_min, 2 * MiB);
    cr_assert_eq(cfg.segment_max, 2 * MiB);
    cr_assert_eq(cfg.small_segment, GiB);
    cr_assert_eq(cfg.dedicated_min, MiB);
}

Test(config_valid, max_cached)
{
    cr_assert_eq(parse_ok(ENV("GPUMEM_MAX_CACHED", "unlimited")).max_cached, GM_UNLIMITED);
    cr_assert_eq(parse_ok(ENV("GPUMEM_MAX_CACHED", "UNLIMITED")).max_cached, GM_UNLIMITED);
    cr_assert_eq(parse_ok(ENV("GPUMEM_MAX_CACHED", " Unlimited ")).max_cached, GM_UNLIMITED);
    cr_assert_eq(parse_ok(ENV("GPUMEM_MAX_CACHED", "0")).max_cached, 0);
    cr_assert_eq(parse_ok(ENV("GPUMEM_MAX_CACHED", "4GiB")).max_cached, 4 * GiB);
    cr_assert_eq(parse_ok(ENV("GPUMEM_MAX_CACHED", "0.5g")).max_cached, GiB / 2);
}

Test(config_valid, report)
{
    cr_assert_str_eq(parse_ok(ENV("GPUMEM_REPORT", "off")).report, "off");
    cr_assert_str_eq(parse_ok(ENV("GPUMEM_REPORT", "/tmp/gm-%p.txt")).report, "/tmp/gm-%p.txt");
    char path[4096];
    memset(path, 'x', sizeof path - 1);
    path[sizeof path - 1] = '\0';
    cr_assert_eq(strlen(parse_ok(ENV("GPUMEM_REPORT", path)).report), 4095);
}

Test(config_valid, one_limit_applies_to_every_device)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", "4GiB"));
    for (int i = 0; i < GM_MAX_DEVICES; i++) {
        cr_assert_eq(cfg.limit[i].kind, GM_LIMIT_BYTES);
        cr_assert_eq(cfg.limit[i].bytes, 4 * GiB);
    }
    cfg = parse_ok(ENV("GPUMEM_LIMIT", "80%"));
    cr_assert_eq(cfg.limit[0].kind, GM_LIMIT_PERCENT);
    cr_assert_eq(cfg.limit[GM_MAX_DEVICES - 1].percent, 80.0);
    cfg = parse_ok(ENV("GPUMEM_LIMIT", "None"));
    cr_assert_eq(cfg.limit[7].kind, GM_LIMIT_NONE);
}

Test(config_valid, per_device_list)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", "0:4GiB,1:6GiB,2:50%"));
    cr_assert_eq(cfg.limit[0].kind, GM_LIMIT_BYTES);
    cr_assert_eq(cfg.limit[0].bytes, 4 * GiB);
    cr_assert_eq(cfg.limit[1].bytes, 6 * GiB);
    cr_assert_eq(cfg.limit[2].kind, GM_LIMIT_PERCENT);
    cr_assert_eq(cfg.limit[2].percent, 50.0);
    for (int i = 3; i < GM_MAX_DEVICES; i++)
        cr_assert_eq(cfg.limit[i].kind, GM_LIMIT_NONE, "device %d", i);
}

Test(config_valid, per_device_list_any_order_with_spaces)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", " 63 : 1.5GiB , 0:none, 10:12.5% "));
    cr_assert_eq(cfg.limit[63].bytes, GiB + GiB / 2);
    cr_assert_eq(cfg.limit[0].kind, GM_LIMIT_NONE);
    cr_assert_eq(cfg.limit[10].percent, 12.5);
    cr_assert_eq(cfg.limit[1].kind, GM_LIMIT_NONE);
}

Test(config_valid, device_variable_overrides)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", "8GiB", "GPUMEM_LIMIT_1", "2GiB",
                                 "GPUMEM_LIMIT_63", "none", "GPUMEM_LIMIT_10", "25%"));
    cr_assert_eq(cfg.limit[0].bytes, 8 * GiB);
    cr_assert_eq(cfg.limit[1].kind, GM_LIMIT_BYTES);
    cr_assert_eq(cfg.limit[1].bytes, 2 * GiB);
    cr_assert_eq(cfg.limit[10].kind, GM_LIMIT_PERCENT);
    cr_assert_eq(cfg.limit[10].percent, 25.0);
    cr_assert_eq(cfg.limit[63].kind, GM_LIMIT_NONE);
    cr_assert_eq(cfg.limit[62].bytes, 8 * GiB);
}

Test(config_valid, device_variable_overrides_a_list)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", "0:1GiB,1:2GiB", "GPUMEM_LIMIT_0", "50%",
                                 "GPUMEM_LIMIT_5", "3GiB"));
    cr_assert_eq(cfg.limit[0].kind, GM_LIMIT_PERCENT);
    cr_assert_eq(cfg.limit[1].bytes, 2 * GiB);
    cr_assert_eq(cfg.limit[5].bytes, 3 * GiB);
    cr_assert_eq(cfg.limit[4].kind, GM_LIMIT_NONE);
}

Test(config_valid, device_variable_without_a_names_list)
{
    const char *const *pairs = ENV("GPUMEM_LIMIT_3", "1GiB");
    gm_config cfg;
    int rc = gm_config_parse(&cfg, fake_get, (void *)pairs, NULL, err, sizeof err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_eq(cfg.limit[3].bytes, GiB);
    cr_assert_eq(cfg.limit[2].kind, GM_LIMIT_NONE);
}

Test(config_valid, null_error_buffer_is_allowed)
{
    gm_config cfg;
    const char *const *pairs = ENV("GPUMEM_POOL", "maybe");
    cr_assert_eq(gm_config_parse(&cfg, fake_get, (void *)pairs, NULL, NULL, 0), -1);
}

/* ---------------------------------------------------------------- every option, invalid */

Test(config_invalid, the_documented_error_line)
{
    gm_config cfg;
    cr_assert_eq(parse(ENV("GPUMEM_LIMIT", "4XB"), &cfg), -1);
    cr_assert_str_eq(err, "gpumem: GPUMEM_LIMIT='4XB' is not valid: expected a size (e.g. 4GiB, "
                          "512MiB, 1.5G, 1048576), a percentage of device memory (e.g. 80%), none, "
                          "or a per-device list (e.g. 0:4GiB,1:50%) whose devices may also be UUIDs "
                          "(GPU-...:4GiB)");
}

Test(config_invalid, empty_value_for_every_option)
{
    for (size_t i = 0; i < gm_option_count; i++) {
        const char *name = gm_options[i].name;
        if (strstr(name, "<i>"))
            name = "GPUMEM_LIMIT_0";
        expect_error_for(name, "", "the value is empty");
        expect_error_for(name, "  ", "the value is empty");
    }
}

Test(config_invalid, booleans)
{
    expect_error_for("GPUMEM_POOL", "maybe", "expected 1, 0, true, false, yes, no, on or off");
    expect_error_for("GPUMEM_POOL", "2", "on or off");
    expect_error_for("GPUMEM_FREE_SYNC", "-1", "on or off");
    expect_error_for("GPUMEM_FREE_SYNC", "strict", "on or off");
}

Test(config_invalid, growth_factor)
{
    const char *range = "expected a decimal number from 1 to 16";
    expect_error_for("GPUMEM_GROWTH_FACTOR", "abc", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "2.0x", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "2 0", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "nan", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "NAN", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "inf", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "-inf", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "1e400", range);
    expect_error_for("GPUMEM_GROWTH_FACTOR", "0.5",
                     "out of range; expected a decimal number from 1 to 16");
    expect_error_for("GPUMEM_GROWTH_FACTOR", "-2", "out of range");
    expect_error_for("GPUMEM_GROWTH_FACTOR", "16.01", "out of range");
    expect_error_for("GPUMEM_GROWTH_FACTOR", "0.99999", "out of range");
}

Test(config_invalid, verbose)
{
    const char *range = "expected a whole decimal number from 0 to 3";
    expect_error_for("GPUMEM_VERBOSE", "loud", range);
    expect_error_for("GPUMEM_VERBOSE", "1.5", range);
    expect_error_for("GPUMEM_VERBOSE", "3x", range);
    expect_error_for("GPUMEM_VERBOSE", "0x1", range);
    expect_error_for("GPUMEM_VERBOSE", "-", range);
    expect_error_for("GPUMEM_VERBOSE", "99999999999999999999", range);
    expect_error_for("GPUMEM_VERBOSE", "4", "out of range; expected a whole decimal number from 0 to 3");
    expect_error_for("GPUMEM_VERBOSE", "-1", "out of range");
    expect_error_for("GPUMEM_VERBOSE", "4294967296", "out of range");
}

Test(config_invalid, sizes_malformed)
{
    const char *names[] = {"GPUMEM_SEGMENT_MIN", "GPUMEM_SEGMENT_MAX", "GPUMEM_SMALL_SEGMENT",
                           "GPUMEM_DEDICATED_MIN"};
    const char *bad[] = {"-1", "-8MiB", "abc", "8XB", "8MiB!", "8 MiB x", "1.5", "nan", "inf",
                         "18446744073709551616", "16777216TiB", "0x800000", "8e6"};
    const char *forms = "expected a size (e.g. 4GiB, 512MiB, 1.5G, 1048576)";
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        for (size_t j = 0; j < sizeof bad / sizeof bad[0]; j++)
            expect_error_for(names[i], bad[j], forms);
}

Test(config_invalid, sizes_out_of_range)
{
    expect_error_for("GPUMEM_SEGMENT_MIN", "1MiB", "out of range; expected a size (e.g. 4GiB, "
                                                   "512MiB, 1.5G, 1048576) from 2MiB to 1TiB");
    expect_error_for("GPUMEM_SEGMENT_MIN", "2097151", "from 2MiB to 1TiB");
    expect_error_for("GPUMEM_SEGMENT_MIN", "0", "from 2MiB to 1TiB");
    expect_error_for("GPUMEM_SEGMENT_MAX", "1.5MiB", "from 2MiB to 1TiB");
    expect_error_for("GPUMEM_SEGMENT_MAX", "1099511627777", "from 2MiB to 1TiB");
    expect_error_for("GPUMEM_SEGMENT_MAX", "2TiB", "from 2MiB to 1TiB");
    expect_error_for("GPUMEM_SMALL_SEGMENT", "512KiB",
                     "out of range; expected a size (e.g. 4GiB, 512MiB, 1.5G, 1048576) "
                     "from 1MiB to 1GiB");
    expect_error_for("GPUMEM_SMALL_SEGMENT", "1.5GiB", "from 1MiB to 1GiB");
    expect_error_for("GPUMEM_DEDICATED_MIN", "512K", "from 1MiB to 1TiB");
    expect_error_for("GPUMEM_DEDICATED_MIN", "1.01TiB", "from 1MiB to 1TiB");
}

Test(config_invalid, max_cached)
{
    const char *forms = "expected a size (e.g. 4GiB, 512MiB, 1.5G, 1048576) or unlimited";
    expect_error_for("GPUMEM_MAX_CACHED", "-1", forms);
    expect_error_for("GPUMEM_MAX_CACHED", "lots", forms);
    expect_error_for("GPUMEM_MAX_CACHED", "unlimitedd", forms);
    expect_error_for("GPUMEM_MAX_CACHED", "18446744073709551616", forms);
    expect_error_for("GPUMEM_MAX_CACHED", "none", forms);
}

Test(config_invalid, report_too_long)
{
    static char path[5000];
    gm_config cfg;
    memset(path, 'p', sizeof path - 1);
    cr_assert_eq(parse(ENV("GPUMEM_REPORT", path), &cfg), -1);
    cr_assert(strncmp(err, "gpumem: GPUMEM_REPORT='pppp", 27) == 0, "%s", err);
    cr_assert_not_null(strstr(err, "...' is not valid: too long; expected a non-empty value "
                                    "shorter than 4096 bytes"), "%s", err);
}

Test(config_invalid, limit_malformed)
{
    const char *forms = "expected a size (e.g. 4GiB, 512MiB, 1.5G, 1048576), a percentage of "
                        "device memory (e.g. 80%), none, or a per-device list (e.g. 0:4GiB,1:50%)";
    const char *bad[] = {"-1", "-1GiB", "abc", "4XB", "4GiB!", "4 GiB x", "1.5", "nan", "inf",
                         "18446744073709551616", "unlimited", "4GiB,8GiB", "%", "abc%", "-5%"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_error_for("GPUMEM_LIMIT", bad[i], forms);
}

Test(config_invalid, limit_zero_says_use_none)
{
    expect_error_for("GPUMEM_LIMIT", "0", "write none for no limit");
    expect_error_for("GPUMEM_LIMIT", "0GiB", "write none for no limit");
    expect_error_for("GPUMEM_LIMIT", "0:0", "write none for no limit");
    expect_error_for("GPUMEM_LIMIT_2", "0B", "write none for no limit");
}

Test(config_invalid, limit_percent_range)
{
    const char *why = "a percentage must be above 0% and at most 100%";
    expect_error_for("GPUMEM_LIMIT", "0%", why);
    expect_error_for("GPUMEM_LIMIT", "0.0%", why);
    expect_error_for("GPUMEM_LIMIT", "100.01%", why);
    expect_error_for("GPUMEM_LIMIT", "150%", why);
    expect_error_for("GPUMEM_LIMIT", "1:150%", why);
    expect_error_for("GPUMEM_LIMIT_1", "101%", why);
    expect_error_for("GPUMEM_LIMIT_1", "0%", why);
}

Test(config_invalid, limit_list_device_index)
{
    expect_error_for("GPUMEM_LIMIT", "64:1GiB", "device index '64' is not a number from 0 to 63");
    expect_error_for("GPUMEM_LIMIT", "0:1GiB,100:2GiB", "device index '100'");
    expect_error_for("GPUMEM_LIMIT", "a:1GiB", "device index 'a'");
    expect_error_for("GPUMEM_LIMIT", "-1:1GiB", "device index '-1'");
    expect_error_for("GPUMEM_LIMIT", "01:1GiB", "device index '01'");
    expect_error_for("GPUMEM_LIMIT", ":1GiB", "device index ''");
    expect_error_for("GPUMEM_LIMIT", "99999999999999999999:1GiB", "is not a number from 0 to 63");
}

Test(config_invalid, limit_list_duplicate_device)
{
    expect_error_for("GPUMEM_LIMIT", "0:1GiB,0:2GiB", "device 0 is listed twice");
    expect_error_for("GPUMEM_LIMIT", "3:1GiB,1:50%,3:none", "device 3 is listed twice");
}

Test(config_invalid, limit_list_malformed_entries)
{
    const char *forms = "or a per-device list (e.g. 0:4GiB,1:50%)";
    expect_error_for("GPUMEM_LIMIT", "0:4GiB,", forms);
    expect_error_for("GPUMEM_LIMIT", "0:4GiB,,1:2GiB", forms);
    expect_error_for("GPUMEM_LIMIT", "0:", forms);
    expect_error_for("GPUMEM_LIMIT", "0:4XB", forms);
    expect_error_for("GPUMEM_LIMIT", "0:4GiB;1:2GiB", forms);
    expect_error_for("GPUMEM_LIMIT", "0:1:4GiB", forms);
    expect_error_for("GPUMEM_LIMIT", "0=4GiB,1:2GiB", forms);
}

Test(config_invalid, device_variable_value)
{
    const char *forms = "expected a size (e.g. 4GiB, 512MiB, 1.5G, 1048576), a percentage of "
                        "device memory (e.g. 80%), or none";
    expect_error_for("GPUMEM_LIMIT_0", "4XB", forms);
    expect_error_for("GPUMEM_LIMIT_0", "0:4GiB", forms); /* lists belong in GPUMEM_LIMIT */
    expect_error_for("GPUMEM_LIMIT_63", "-1", forms);
    gm_config cfg;
    cr_assert_eq(parse(ENV("GPUMEM_LIMIT_5", "lots"), &cfg), -1);
    cr_assert_null(strstr(err, "per-device list"), "%s", err);
}

Test(config_invalid, device_variable_name)
{
    const char *want = "expected a device number from 0 to 63 without leading zeros in the name "
                       "(GPUMEM_LIMIT_0 ... GPUMEM_LIMIT_63)";
    expect_error_for("GPUMEM_LIMIT_64", "4GiB", want);
    expect_error_for("GPUMEM_LIMIT_01", "4GiB", want);
    expect_error_for("GPUMEM_LIMIT_00", "4GiB", want);
    expect_error_for("GPUMEM_LIMIT_1000", "none", want);
}

Test(config_invalid, segment_min_above_segment_max)
{
    gm_config cfg;
    cr_assert_eq(parse(ENV("GPUMEM_SEGMENT_MIN", "64MiB", "GPUMEM_SEGMENT_MAX", "32MiB"), &cfg),
                 -1);
    cr_assert_str_eq(err, "gpumem: GPUMEM_SEGMENT_MIN='64MiB' is not valid: expected a size no "
                          "larger than GPUMEM_SEGMENT_MAX='32MiB'");
    cr_assert_eq(parse(ENV("GPUMEM_SEGMENT_MIN", "2GiB"), &cfg), -1);
    cr_assert_str_eq(err, "gpumem: GPUMEM_SEGMENT_MIN='2GiB' is not valid: expected a size no "
                          "larger than GPUMEM_SEGMENT_MAX='1GiB' (the default)");
    cr_assert_eq(parse(ENV("GPUMEM_SEGMENT_MAX", "4MiB"), &cfg), -1);
    cr_assert_str_eq(err, "gpumem: GPUMEM_SEGMENT_MIN='8MiB' (the default) is not valid: expected "
                          "a size no larger than GPUMEM_SEGMENT_MAX='4MiB'");
}

Test(config_invalid, value_is_shown_on_one_line)
{
    gm_config cfg;
    cr_assert_eq(parse(ENV("GPUMEM_LIMIT", "4\nGiB"), &cfg), -1);
    cr_assert_null(strchr(err, '\n'), "%s", err);
    cr_assert(strncmp(err, "gpumem: GPUMEM_LIMIT='4\\x0aGiB' is not valid", 43) == 0, "%s", err);
}

Test(config_invalid, first_error_in_table_order_wins)
{
    gm_config cfg;
    cr_assert_eq(parse(ENV("GPUMEM_VERBOSE", "9", "GPUMEM_POOL", "maybe"), &cfg), -1);
    cr_assert(strncmp(err, "gpumem: GPUMEM_POOL='maybe'", 27) == 0, "%s", err);
}

Test(config_invalid, output_untouched_on_error)
{
    gm_config cfg;
    memset(&cfg, 0xAB, sizeof cfg);
    cr_assert_eq(parse(ENV("GPUMEM_POOL", "0", "GPUMEM_VERBOSE", "9"), &cfg), -1);
    cr_assert_eq(cfg.verbose, (int)0xABABABAB);
}

Test(config_invalid, small_error_buffer_is_truncated_safely)
{
    gm_config cfg;
    char small[16];
    const char *const *pairs = ENV("GPUMEM_LIMIT", "4XB");
    memset(small, 'z', sizeof small);
    cr_assert_eq(gm_config_parse(&cfg, fake_get, (void *)pairs, NULL, small, sizeof small), -1);
    cr_assert_str_eq(small, "gpumem: GPUMEM_");
}

/* ---------------------------------------------------------------- unknown variables */

Test(unknown, misspelling_gets_a_suggestion)
{
    gm_config cfg;
    const char *const *pairs = ENV("GPUMEM_LIMTI", "4GiB");
    cr_assert_eq(parse_capturing(pairs, fake_names(pairs), &cfg), 0, "a warning is not an error");
    cr_assert_str_eq(captured,
                     "gpumem: warning: unknown variable GPUMEM_LIMTI ignored; did you mean "
                     "GPUMEM_LIMIT?\n");
    cr_assert_eq(cfg.limit[0].kind, GM_LIMIT_NONE, "the misspelled variable must not apply");
}

Test(unknown, suggestions)
{
    gm_config cfg;
    const char *const *pairs = ENV("GPUMEM_VERBSE", "1", "GPUMEM_POOLL", "1", "GPUMEM_FREESYNC",
                                   "1", "GPUMEM_LIMT_1", "1G", "GPUMEM_MAXCACHE", "1G");
    cr_assert_eq(parse_capturing(pairs, fake_names(pairs), &cfg), 0);
    cr_assert_str_eq(captured,
                     "gpumem: warning: unknown variable GPUMEM_VERBSE ignored; did you mean "
                     "GPUMEM_VERBOSE?\n"
                     "gpumem: warning: unknown variable GPUMEM_POOLL ignored; did you mean "
                     "GPUMEM_POOL?\n"
                     "gpumem: warning: unknown variable GPUMEM_FREESYNC ignored; did you mean "
                     "GPUMEM_FREE_SYNC?\n"
                     "gpumem: warning: unknown variable GPUMEM_LIMT_1 ignored; did you mean "
                     "GPUMEM_LIMIT_1?\n"
                     "gpumem: warning: unknown variable GPUMEM_MAXCACHE ignored; did you mean "
                     "GPUMEM_MAX_CACHED?\n");
}

Test(unknown, nothing_close_means_no_suggestion)
{
    gm_config cfg;
    const char *const *pairs = ENV("GPUMEM_COMPLETELY_DIFFERENT", "1");
    cr_assert_eq(parse_capturing(pairs, fake_names(pairs), &cfg), 0);
    cr_assert_str_eq(captured,
                     "gpumem: warning: unknown variable GPUMEM_COMPLETELY_DIFFERENT ignored\n");
}

Test(unknown, known_and_foreign_names_are_quiet)
{
    gm_config cfg;
    const char *const *pairs = ENV("GPUMEM_POOL", "1", "GPUMEM_LIMIT_5", "1GiB", "GPUMEM_LIMIT",
                                   "none", "PATH", "/bin", "gpumem_limti", "x", "XGPUMEM_POOLL",
                                   "1");
    cr_assert_eq(parse_capturing(pairs, fake_names(pairs), &cfg), 0, "%s", err);
    cr_assert_str_eq(captured, "");
}

Test(unknown, environ_style_entries)
{
    gm_config cfg;
    char *names[] = {"HOME=/root", "GPUMEM_SEGMNT_MAX=1GiB", "GPUMEM_POOL=0", NULL};
    cr_assert_eq(parse_capturing(ENV("GPUMEM_POOL", "0"), names, &cfg), 0, "%s", err);
    cr_assert_str_eq(captured,
                     "gpumem: warning: unknown variable GPUMEM_SEGMNT_MAX ignored; did you mean "
                     "GPUMEM_SEGMENT_MAX?\n");
    cr_assert(!cfg.pool);
}

Test(unknown, warned_even_when_a_value_is_bad)
{
    gm_config cfg;
    const char *const *pairs = ENV("GPUMEM_GROWTH_FACTR", "2", "GPUMEM_GROWTH_FACTOR", "x");
    cr_assert_eq(parse_capturing(pairs, fake_names(pairs), &cfg), -1);
    cr_assert_not_null(strstr(captured, "did you mean GPUMEM_GROWTH_FACTOR?\n"), "%s", captured);
    cr_assert(strncmp(err, "gpumem: GPUMEM_GROWTH_FACTOR='x'", 32) == 0, "%s", err);
}

Test(unknown, through_criterion_redirect, .init = cr_redirect_stderr)
{
    gm_config cfg;
    const char *const *pairs = ENV("GPUMEM_DEDICATD_MIN", "1GiB");
    cr_assert_eq(parse(pairs, &cfg), 0);
    fflush(stderr);
    cr_assert_stderr_eq_str("gpumem: warning: unknown variable GPUMEM_DEDICATD_MIN ignored; did "
                            "you mean GPUMEM_DEDICATED_MIN?\n");
}

/* ---------------------------------------------------------------- the process-wide load */

/* Criterion runs each test in its own process; clear GPUMEM_* so the caller's shell cannot
 * change what these tests see. */
static void clean_environment(void)
{
    extern char **environ;
    char name[256];
    for (bool again = true; again;) {
        again = false;
        for (char **p = environ; *p; p++) {
            if (strncmp(*p, "GPUMEM_", 7) != 0)
                continue;
            snprintf(name, sizeof name, "%.*s", (int)strcspn(*p, "="), *p);
            unsetenv(name);
            again = true;
            break;
        }
    }
    gm_config_reset_for_tests();
}

Test(config_get, reads_the_environment_once, .init = clean_environment)
{
    setenv("GPUMEM_VERBOSE", "2", 1);
    setenv("GPUMEM_LIMIT_1", "3GiB", 1);
    const gm_config *cfg = gm_config_get();
    cr_assert_eq(cfg->verbose, 2);
    cr_assert_eq(cfg->limit[1].bytes, 3 * GiB);
    setenv("GPUMEM_VERBOSE", "3", 1);
    cr_assert_eq(gm_config_get(), cfg);
    cr_assert_eq(gm_config_get()->verbose, 2, "read once, not on every call");
    gm_config_reset_for_tests();
    cr_assert_eq(gm_config_get()->verbose, 3);
}

Test(config_get, empty_environment_gives_defaults, .init = clean_environment)
{
    const gm_config *cfg = gm_config_get();
    cr_assert(cfg->pool);
    cr_assert_eq(cfg->segment_min, 8 * MiB);
    cr_assert_eq(cfg->max_cached, GM_UNLIMITED);
}

static void *get_from_thread(void *arg)
{
    (void)arg;
    return (void *)gm_config_get();
}

Test(config_get, concurrent_first_use, .init = clean_environment)
{
    pthread_t threads[8];
    void *seen[8];
    setenv("GPUMEM_GROWTH_FACTOR", "3", 1);
    for (int i = 0; i < 8; i++)
        cr_assert_eq(pthread_create(&threads[i], NULL, get_from_thread, NULL), 0);
    for (int i = 0; i < 8; i++) {
        pthread_join(threads[i], &seen[i]);
        cr_assert_eq(seen[i], seen[0]);
    }
    cr_assert_eq(((const gm_config *)seen[0])->growth_factor, 3.0);
}

static void clean_and_redirect(void)
{
    clean_environment();
    cr_redirect_stderr();
}

Test(config_get, bad_value_exits_with_status_2, .init = clean_and_redirect, .exit_code = 2)
{
    setenv("GPUMEM_LIMIT", "4XB", 1);
    gm_config_reset_for_tests();
    gm_config_get();
    cr_assert_fail("gm_config_get() returned with a bad GPUMEM_LIMIT");
}

Test(config_get, bad_device_name_exits_with_status_2, .init = clean_and_redirect, .exit_code = 2)
{
    setenv("GPUMEM_LIMIT_64", "1GiB", 1);
    gm_config_reset_for_tests();
    gm_config_get();
    cr_assert_fail("gm_config_get() returned with GPUMEM_LIMIT_64 set");
}

Test(config_get, unknown_variable_only_warns, .init = clean_and_redirect)
{
    setenv("GPUMEM_POOLL", "0", 1);
    gm_config_reset_for_tests();
    cr_assert(gm_config_get()->pool);
    fflush(stderr);
    cr_assert_stderr_eq_str("gpumem: warning: unknown variable GPUMEM_POOLL ignored; did you mean "
                            "GPUMEM_POOL?\n");
}

/* ---------------------------------------------------------------- limits keyed by UUID (issue 16) */

#define UUID_A "GPU-01234567-89ab-cdef-0123-456789abcdef"
#define UUID_B "GPU-fedcba98-7654-3210-FEDC-BA9876543210"

static const unsigned char uuid_a[16] = {0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef,
                                         0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef};
static const unsigned char uuid_b[16] = {0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10,
                                         0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10};

Test(config_valid, list_keyed_by_uuid_follows_the_device)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", UUID_A ":4GiB, " UUID_B " : 50%,2:1GiB"));
    cr_assert_eq(cfg.limit_keys.nuuid, 2);
    cr_assert_eq(memcmp(cfg.limit_keys.uuid[1].uuid, uuid_b, 16), 0, "hex in either case");
    /* Whatever ordinal the device has, its UUID entry applies. */
    cr_assert_eq(gm_config_limit_of(&cfg, 0, uuid_a)->bytes, 4 * GiB);
    cr_assert_eq(gm_config_limit_of(&cfg, 5, uuid_a)->bytes, 4 * GiB);
    cr_assert_eq(gm_config_limit_of(&cfg, 0, uuid_b)->percent, 50.0);
    /* An ordinal entry for a device no UUID entry names; nothing for the others. */
    static const unsigned char other[16] = {9};
    cr_assert_eq(gm_config_limit_of(&cfg, 2, other)->bytes, GiB);
    cr_assert_eq(gm_config_limit_of(&cfg, 2, NULL)->bytes, GiB);
    cr_assert_eq(gm_config_limit_of(&cfg, 1, other)->kind, GM_LIMIT_NONE);
    cfg = parse_ok(ENV("GPUMEM_LIMIT", "MIG-01234567-89ab-cdef-0123-456789abcdef:2GiB"));
    cr_assert_eq(gm_config_limit_of(&cfg, 0, uuid_a)->bytes, 2 * GiB, "MIG- spelling");
}

Test(config_valid, per_device_variable_beats_a_uuid_entry)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", UUID_A ":4GiB", "GPUMEM_LIMIT_1", "1GiB"));
    cr_assert_eq(gm_config_limit_of(&cfg, 1, uuid_a)->bytes, GiB);
    cr_assert_eq(gm_config_limit_of(&cfg, 0, uuid_a)->bytes, 4 * GiB);
}

Test(config_invalid, limit_list_bad_uuids)
{
    expect_error_for("GPUMEM_LIMIT", "GPU-0123:1GiB", "device 'GPU-0123' is not a UUID as nvidia-smi -L prints it");
    expect_error_for("GPUMEM_LIMIT", "GPU-01234567-89ab-cdef-0123-456789abcdeg:1GiB", "is not a UUID");
    expect_error_for("GPUMEM_LIMIT", "GPU-0123456789abcdef0123456789abcdef:1GiB", "is not a UUID");
    expect_error_for("GPUMEM_LIMIT", UUID_A "0:1GiB", "is not a UUID");
    expect_error_for("GPUMEM_LIMIT", UUID_A ":1GiB," UUID_A ":2GiB", "device " UUID_A " is listed twice");
    expect_error_for("GPUMEM_LIMIT", UUID_A ":0", "write none for no limit");
    expect_error_for("GPUMEM_LIMIT", "gpu0:1GiB", "nor a UUID");
}

static int check_devices(gm_config *cfg, int count, bool subset)
{
    static const unsigned char u[2][16] = {{0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45,
                                            0x67, 0x89, 0xab, 0xcd, 0xef},
                                           {7}};
    static const bool has[2] = {true, true};
    return gm_config_check_devices(cfg, count, u, has, subset, err, sizeof err);
}

Test(config_invalid, limits_must_name_devices_the_process_sees)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", "0:1GiB,1:2GiB"));
    cr_assert_eq(check_devices(&cfg, 2, false), 0, "%s", err);
    cr_assert_eq(check_devices(&cfg, 1, false), -1);
    cr_assert(strstr(err, "gpumem: GPUMEM_LIMIT='0:1GiB,1:2GiB' is not valid: there is no device 1: "
                          "this process sees 1 device (0)"), "%s", err);
    cr_assert(strstr(err, "expected device numbers from 0 to 0 or a UUID"), "%s", err);
    cr_assert_null(strchr(err, '\n'));
    /* One value for every device names none. */
    cfg = parse_ok(ENV("GPUMEM_LIMIT", "1GiB"));
    cr_assert_eq(check_devices(&cfg, 1, false), 0);
    /* GPUMEM_LIMIT_<i> for a device the process does not see (its value comes from getenv). */
    setenv("GPUMEM_LIMIT_3", "2GiB", 1);
    cfg = parse_ok(ENV("GPUMEM_LIMIT_3", "2GiB"));
    cr_assert_eq(check_devices(&cfg, 2, false), -1);
    cr_assert(strstr(err, "gpumem: GPUMEM_LIMIT_3='2GiB' is not valid: there is no device 3: this process "
                          "sees 2 devices (0 to 1)"), "%s", err);
    cr_assert(strstr(err, "expected GPUMEM_LIMIT_0 to GPUMEM_LIMIT_1"), "%s", err);
    unsetenv("GPUMEM_LIMIT_3");
    cr_assert_eq(check_devices(&cfg, 4, false), 0);
}

Test(config_invalid, uuid_entries_must_name_a_visible_device)
{
    gm_config cfg = parse_ok(ENV("GPUMEM_LIMIT", UUID_B ":1GiB"));
    cr_assert_eq(check_devices(&cfg, 2, false), -1);
    cr_assert(strstr(err, "is not valid: no device has the UUID " UUID_B " (this process sees 2 devices"), "%s", err);
    /* Under CUDA_VISIBLE_DEVICES the entry may be a hidden device's: skipped. */
    cr_assert_eq(check_devices(&cfg, 2, true), 0, "%s", err);
    cfg = parse_ok(ENV("GPUMEM_LIMIT", UUID_A ":1GiB"));
    cr_assert_eq(check_devices(&cfg, 2, false), 0, "%s", err);
    /* Named twice, once by number and once by UUID. */
    cfg = parse_ok(ENV("GPUMEM_LIMIT", "0:2GiB," UUID_A ":1GiB"));
    cr_assert_eq(check_devices(&cfg, 2, false), -1);
    cr_assert(strstr(err, UUID_A " is device 0, which the list also names by number"), "%s", err);
    cfg = parse_ok(ENV("GPUMEM_LIMIT", "1:2GiB," UUID_A ":1GiB"));
    cr_assert_eq(check_devices(&cfg, 2, false), 0, "%s", err);
}
