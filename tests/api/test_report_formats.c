/* api_report_formats: what issue 4 promises of the report, through the real preload path: the
 * call stack points at the program's own function (not gpumem's, not the driver's), JSON is valid
 * and carries the same numbers, suppressions move groups out of the summary, GPUMEM_LEAK_EXITCODE
 * turns leaks into an exit status, the timeline is valid JSON with counter events, and exit()
 * from a second thread still produces the report. */
#include "api_test.h"

/* ---------------------------------------------------------------- a small JSON validator */

typedef struct { const char *p; int depth; } json_cursor;

static bool json_value(json_cursor *c);

static void skip_ws(json_cursor *c)
{
    while (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t') c->p++;
}

static bool json_string_lit(json_cursor *c)
{
    if (*c->p != '"') return false;
    for (c->p++; *c->p && *c->p != '"'; c->p++) {
        if ((unsigned char)*c->p < 0x20) return false;
        if (*c->p == '\\' && !*++c->p) return false;
    }
    return *c->p == '"' ? (c->p++, true) : false;
}

static bool json_number(json_cursor *c)
{
    char *end;
    strtod(c->p, &end);
    if (end == c->p) return false;
    c->p = end;
    return true;
}

static bool json_list(json_cursor *c, char close, bool object)
{
    c->p++;
    skip_ws(c);
    if (*c->p == close) return c->p++, true;
    for (;;) {
        skip_ws(c);
        if (object) {
            if (!json_string_lit(c)) return false;
            skip_ws(c);
            if (*c->p++ != ':') return false;
        }
        if (!json_value(c)) return false;
        skip_ws(c);
        if (*c->p == ',') { c->p++; continue; }
        return *c->p == close ? (c->p++, true) : false;
    }
}

static bool json_value(json_cursor *c)
{
    skip_ws(c);
    if (++c->depth > 64) return false;
    bool ok;
    switch (*c->p) {
    case '{': ok = json_list(c, '}', true); break;
    case '[': ok = json_list(c, ']', false); break;
    case '"': ok = json_string_lit(c); break;
    case 't': ok = !strncmp(c->p, "true", 4) && (c->p += 4); break;
    case 'f': ok = !strncmp(c->p, "false", 5) && (c->p += 5); break;
    case 'n': ok = !strncmp(c->p, "null", 4) && (c->p += 4); break;
    default: ok = json_number(c);
    }
    c->depth--;
    return ok;
}

static bool json_valid(const char *text)
{
    json_cursor c = {text, 0};
    if (!json_value(&c)) return false;
    skip_ws(&c);
    return *c.p == 0;
}

/* ---------------------------------------------------------------- helpers */

static char *run_to_file(const char *scenario, const char *var, const char *tag, const char *extra,
                         api_child *out)
{
    static char dir[64];
    char setting[160], path[160];
    cr_assert(api_tmpdir(dir, sizeof dir, tag));
    snprintf(setting, sizeof setting, "%s=%s/f.%%p", var, dir);
    const char *env[] = {setting, extra ? extra : "GPUMEM_VERBOSE=0", "GPUMEM_REPORT_FORMAT=json", NULL};
    *out = api_scenario_ok(scenario, env);
    snprintf(path, sizeof path, "%s/f.%ld", dir, (long)out->pid);
    char *text = api_read_file(path);
    cr_assert_not_null(text, "nothing written at %s; stderr:\n%s", path, out->err);
    unlink(path);
    rmdir(dir);
    return text;
}

/* ---------------------------------------------------------------- tests */

Test(report_formats, stack_points_at_the_programs_function)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("leak3", env);
    /* #0 is api_child's own leak3(), not the hook in the shim nor the driver. */
    cr_assert(strstr(c.err, "    #0 0x") && strstr(c.err, " in leak3 api_child+0x"),
              "frame #0 should name leak3 in api_child:\n%s", c.err);
    cr_assert(strstr(c.err, "libgpumem_shim") == NULL, "gpumem's frames leaked into the report:\n%s", c.err);
    cr_assert(strstr(c.err, "(api_child.c:"), "file:line from the debug info:\n%s", c.err);
    api_child_free(&c);
}

Test(report_formats, stack_depth_zero_keeps_the_caller_only)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", "GPUMEM_STACK_DEPTH=0", NULL};
    api_child c = api_scenario_ok("leak3", env);
    ASSERT_LEAKS(c.err, 6000, 3);
    cr_assert(strstr(c.err, " in leak3 api_child+0x"), "%s", c.err);
    cr_assert(strstr(c.err, "    #1 ") == NULL, "only one frame without stacks:\n%s", c.err);
    api_child_free(&c);
}

Test(report_formats, dwarf_unwinder_finds_the_same_function)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", "GPUMEM_STACK_UNWINDER=dwarf", NULL};
    api_child c = api_scenario_ok("leak3", env);
    ASSERT_LEAKS(c.err, 6000, 3);
    cr_assert(strstr(c.err, " in leak3 api_child+0x") && strstr(c.err, " in __libc_start_main libc.so.6"),
              "%s", c.err);
    api_child_free(&c);
}

Test(report_formats, json_report_is_valid_and_exact)
{
    api_child c;
    char *text = run_to_file("leak3", "GPUMEM_REPORT", "json", NULL, &c);
    cr_assert(json_valid(text), "not valid JSON:\n%s", text);
    cr_assert(strstr(text, "\"format\":\"gpumem-report\",\"version\":1"), "%s", text);
    cr_assert(strstr(text, "\"leaked_bytes\":6000,\"leaked_allocations\":3"), "%s", text);
    cr_assert(strstr(text, "\"function\":\"leak3\""), "%s", text);
    cr_assert(strstr(text, "\"reason\":\"at exit\""), "%s", text);
    free(text);
    api_child_free(&c);
}

Test(report_formats, suppressions_move_groups_out_of_the_summary)
{
    char dir[64], supp[128], setting[160];
    cr_assert(api_tmpdir(dir, sizeof dir, "supp"));
    snprintf(supp, sizeof supp, "%s/s.supp", dir);
    FILE *f = fopen(supp, "w");
    cr_assert_not_null(f);
    fputs("# leak3 keeps its buffers on purpose\nleak:lea*3\n", f);
    fclose(f);
    snprintf(setting, sizeof setting, "GPUMEM_SUPPRESSIONS=%s", supp);
    const char *env[] = {"GPUMEM_REPORT=stderr", setting, NULL};
    api_child c = api_scenario_ok("leak3", env);
    unlink(supp);
    rmdir(dir);
    ASSERT_LEAKS(c.err, 0, 0);
    cr_assert(strstr(c.err, "Suppressed: 6000 bytes in 3 allocations"), "%s", c.err);
    api_child_free(&c);
}

Test(report_formats, leak_exitcode_turns_leaks_into_a_status)
{
    const char *leaky[] = {"GPUMEM_REPORT=off", "GPUMEM_LEAK_EXITCODE=9", NULL};
    api_child c = api_scenario("leak3", leaky, 20.0);
    cr_assert(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 9, "status %#x", c.status);
    api_child_free(&c);
    c = api_scenario("alloc_one", leaky, 20.0);
    cr_assert(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0, "no leak, no new status: %#x", c.status);
    api_child_free(&c);
}

Test(report_formats, timeline_is_valid_json_with_counters)
{
    api_child c;
    char *text = run_to_file("leak3", "GPUMEM_TRACE", "trace", "GPUMEM_REPORT=off", &c);
    cr_assert(json_valid(text), "not valid JSON:\n%s", text);
    cr_assert(text[0] == '[', "JSON Array Format");
    cr_assert(strstr(text, "\"name\":\"device 0 memory\",\"ph\":\"C\""), "%s", text);
    cr_assert(strstr(text, "\"allocated\":6144"), "the last state is written:\n%s", text);
    cr_assert(strstr(text, "\"name\":\"leak check point\""), "%s", text);
    free(text);
    api_child_free(&c);
}

Test(report_formats, exit_from_a_second_thread_still_reports)
{
    const char *env[] = {"GPUMEM_REPORT=stderr", NULL};
    api_child c = api_scenario_ok("exit_from_thread", env);
    ASSERT_LEAKS(c.err, 7000, 1);
    api_child_free(&c);
}
