/* misuse_config: configuration mistakes. A value gpumem cannot read stops the process at its
 * first allocation with exit status 2 and one stderr line naming the variable and the value; an
 * unknown GPUMEM_ variable is ignored with a warning that suggests the closest name. The
 * scenarios run in api_child, whose exit status and stderr are checked. */
#include "misuse_capture.h"

static void expect_refused(const char *assignment, const char *name, const char *value)
{
    const char *env[] = {assignment, "GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario("alloc_one", env, 20.0);
    cr_assert(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 2,
              "%s: expected exit status 2, got status %#x; stderr:\n%s", assignment, c.status, c.err);
    cr_assert_eq(api_line_count(c.err), 1, "%s: one line expected on stderr, got:\n%s", assignment, c.err);
    cr_assert(strstr(c.err, name), "%s: the line must name %s:\n%s", assignment, name, c.err);
    cr_assert(strstr(c.err, value), "%s: the line must repeat '%s':\n%s", assignment, value, c.err);
    cr_assert(strstr(c.err, "LEAK SUMMARY") == NULL, "no report after a configuration error");
    api_child_free(&c);
}

Test(misuse_config, bad_limit_stops_the_process)
{
    expect_refused("GPUMEM_LIMIT=12XB", "GPUMEM_LIMIT", "12XB");
}

Test(misuse_config, other_bad_values_stop_the_process)
{
    expect_refused("GPUMEM_LIMIT=0", "GPUMEM_LIMIT", "'0'");
    expect_refused("GPUMEM_POOL=maybe", "GPUMEM_POOL", "maybe");
    expect_refused("GPUMEM_FREE_SYNC=", "GPUMEM_FREE_SYNC", "''");
    expect_refused("GPUMEM_VERBOSE=7", "GPUMEM_VERBOSE", "7");
    expect_refused("GPUMEM_LIMIT_64=1GiB", "GPUMEM_LIMIT_64", "1GiB");
}

Test(misuse_config, unknown_variable_is_a_warning)
{
    const char *env[] = {"GPUMEM_LIMTI=1MiB", "GPUMEM_REPORT=off", NULL};
    api_child c = api_scenario_ok("alloc_one", env);
    cr_assert_eq(api_count_lines(c.err, "did you mean GPUMEM_LIMIT"), 1,
                 "one warning suggesting GPUMEM_LIMIT expected:\n%s", c.err);
    cr_assert_eq(api_count_lines(c.err, "GPUMEM_LIMTI"), 1, "%s", c.err);
    cr_assert_eq(api_line_count(c.err), 1, "only the warning expected:\n%s", c.err);
    cr_assert(strstr(c.out, "limit_bytes=0\n"), "the misspelt limit must not apply: %s", c.out);
    api_child_free(&c);
}

Test(misuse_config, good_limit_applies)
{
    const char *env[] = {"GPUMEM_LIMIT=1GiB", "GPUMEM_REPORT=off", NULL};
    api_child c = api_scenario_ok("alloc_one", env);
    cr_assert(strstr(c.out, "limit_bytes=1073741824\n"), "%s", c.out);
    cr_assert_str_eq(c.err, "");
    api_child_free(&c);
}
