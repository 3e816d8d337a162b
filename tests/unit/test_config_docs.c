/* docs/configuration.md must describe exactly the options in options.def: the one variables
 * table has a row per gm_options entry, in order, with the same name, type and default. The
 * checker is also run on damaged copies of the page to prove that it notices a missing, extra,
 * reordered or wrong row. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gm_config.h"

#ifndef GPUMEM_SOURCE_ROOT
#error "build with -DGPUMEM_SOURCE_ROOT=\"/path/to/the/source/tree\" (meson passes it)"
#endif

#define DOCS_PATH GPUMEM_SOURCE_ROOT "/docs/configuration.md"
#define TABLE_HEADER "| Variable | Type | Default | Description |"

/* The word the Type column uses for each option type. */
static const char *type_word(gm_option_type type)
{
    switch (type) {
    case GM_OPT_BOOL: return "bool";
    case GM_OPT_SIZE: return "size";
    case GM_OPT_SIZE_OR_UNLIMITED: return "size or unlimited";
    case GM_OPT_DOUBLE: return "number";
    case GM_OPT_INT: return "integer";
    case GM_OPT_STRING: return "string";
    case GM_OPT_ENUM: return "enum";
    case GM_OPT_LIMIT: return "limit";
    }
    return "?";
}

static char *read_docs(void)
{
    FILE *f = fopen(DOCS_PATH, "rb");
    cr_assert_not_null(f, "cannot open %s", DOCS_PATH);
    cr_assert_eq(fseek(f, 0, SEEK_END), 0);
    long len = ftell(f);
    cr_assert_geq(len, 0);
    rewind(f);
    char *text = malloc((size_t)len + 1);
    cr_assert_not_null(text);
    cr_assert_eq(fread(text, 1, (size_t)len, f), (size_t)len);
    text[len] = '\0';
    fclose(f);
    return text;
}

/* ---------------------------------------------------------------- the checker */

typedef struct line {
    const char *s;
    size_t n;
} line;

/* The line starting at *pos (without its newline); advances *pos. False at the end. */
static bool next_line(const char **pos, line *out)
{
    if (!**pos)
        return false;
    out->s = *pos;
    out->n = strcspn(*pos, "\n");
    *pos += out->n + (out->s[out->n] == '\n');
    return true;
}

static bool line_is(line l, const char *text)
{
    return l.n == strlen(text) && strncmp(l.s, text, l.n) == 0;
}

/* Cell `index` (0-based) of a "| a | b | c |" row, trimmed, into buf. False if absent. */
static bool cell(line l, int index, char *buf, size_t cap)
{
    const char *p = l.s, *end = l.s + l.n;
    if (p == end || *p != '|')
        return false;
    for (int i = 0; i <= index; i++) {
        const char *start = p + 1;
        const char *bar = memchr(start, '|', (size_t)(end - start));
        if (!bar)
            return false;
        if (i == index) {
            while (start < bar && *start == ' ')
                start++;
            const char *stop = bar;
            while (stop > start && stop[-1] == ' ')
                stop--;
            snprintf(buf, cap, "%.*s", (int)(stop - start), start);
        }
        p = bar;
    }
    return true;
}

/* One table row against one gm_options entry. */
static int check_row(line l, const gm_option_desc *o, size_t row, char *why, size_t cap)
{
    char var[128], type[64], def[128], desc[1024], want[160];
    if (!cell(l, 0, var, sizeof var) || !cell(l, 1, type, sizeof type) ||
        !cell(l, 2, def, sizeof def) || !cell(l, 3, desc, sizeof desc)) {
        snprintf(why, cap, "row %zu does not have four cells: %.*s", row + 1, (int)l.n, l.s);
        return -1;
    }
    snprintf(want, sizeof want, "`%s`", o->name);
    if (strcmp(var, want) != 0) {
        snprintf(why, cap, "row %zu is %s, options.def has %s there", row + 1, var, want);
        return -1;
    }
    if (strcmp(type, type_word(o->type)) != 0) {
        snprintf(why, cap, "%s: type '%s', expected '%s'", o->name, type, type_word(o->type));
        return -1;
    }
    snprintf(want, sizeof want, "`%s`", o->default_value);
    if (strcmp(def, want) != 0) {
        snprintf(why, cap, "%s: default %s, options.def says %s", o->name, def, want);
        return -1;
    }
    if (!desc[0]) {
        snprintf(why, cap, "%s: empty description", o->name);
        return -1;
    }
    return 0;
}

/* Finds the one variables table; leaves *pos on its first row. */
static int find_table(const char *md, const char **pos, char *why, size_t cap)
{
    const char *p = md, *after = NULL;
    int headers = 0;
    line l;
    while (next_line(&p, &l)) {
        if (line_is(l, TABLE_HEADER)) {
            headers++;
            after = p;
        }
    }
    if (headers != 1) {
        snprintf(why, cap, "expected one '%s' table, found %d", TABLE_HEADER, headers);
        return -1;
    }
    if (!next_line(&after, &l) || l.n < 4 || strncmp(l.s, "|--", 3) != 0) {
        snprintf(why, cap, "the table header is not followed by a |---| separator");
        return -1;
    }
    *pos = after;
    return 0;
}

/* 0 when the table matches gm_options exactly; otherwise -1 and the first difference in why. */
static int check_docs(const char *md, char *why, size_t cap)
{
    const char *pos;
    line l;
    size_t row = 0;
    if (find_table(md, &pos, why, cap) != 0)
        return -1;
    while (next_line(&pos, &l) && l.n && l.s[0] == '|') {
        if (row >= gm_option_count) {
            snprintf(why, cap, "extra row %zu: %.*s", row + 1, (int)l.n, l.s);
            return -1;
        }
        if (check_row(l, &gm_options[row], row, why, cap) != 0)
            return -1;
        row++;
    }
    if (row != gm_option_count) {
        snprintf(why, cap, "the table has %zu rows, options.def has %zu (first missing: %s)", row,
                 gm_option_count, gm_options[row].name);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------- damaging a copy */

/* A copy of `text` with the first `old` replaced by `new`. */
static char *replaced(const char *text, const char *old, const char *new)
{
    const char *at = strstr(text, old);
    cr_assert_not_null(at, "'%s' not in the docs", old);
    size_t head = (size_t)(at - text), lo = strlen(old), ln = strlen(new);
    char *out = malloc(strlen(text) - lo + ln + 1);
    cr_assert_not_null(out);
    memcpy(out, text, head);
    memcpy(out + head, new, ln);
    strcpy(out + head + ln, at + lo);
    return out;
}

/* The whole table line that contains `needle`, with its newline. */
static char *row_of(const char *text, const char *needle)
{
    const char *at = strstr(text, needle);
    cr_assert_not_null(at, "'%s' not in the docs", needle);
    while (at > text && at[-1] != '\n')
        at--;
    size_t n = strcspn(at, "\n") + 1;
    char *out = malloc(n + 1);
    cr_assert_not_null(out);
    memcpy(out, at, n);
    out[n] = '\0';
    return out;
}

static void expect_rejected(char *damaged, const char *fragment)
{
    char why[512] = "";
    cr_assert_eq(check_docs(damaged, why, sizeof why), -1, "damage went unnoticed");
    cr_assert_not_null(strstr(why, fragment), "'%s' not in: %s", fragment, why);
    free(damaged);
}

/* ---------------------------------------------------------------- tests */

Test(config_docs, table_matches_options_def)
{
    char *md = read_docs();
    char why[512] = "";
    cr_assert_eq(check_docs(md, why, sizeof why), 0, "%s: %s", DOCS_PATH, why);
    free(md);
}

Test(config_docs, missing_row_is_noticed)
{
    char *md = read_docs();
    char *pool = row_of(md, "| `GPUMEM_POOL` |");
    char *verbose = row_of(md, "| `GPUMEM_EXPANDABLE_CHUNK` |");
    expect_rejected(replaced(md, pool, ""), "row 1 is `GPUMEM_FREE_SYNC`");
    expect_rejected(replaced(md, verbose, ""), "first missing: GPUMEM_EXPANDABLE_CHUNK");
    free(pool);
    free(verbose);
    free(md);
}

Test(config_docs, extra_row_is_noticed)
{
    char *md = read_docs();
    char *verbose = row_of(md, "| `GPUMEM_EXPANDABLE_CHUNK` |");
    char extended[2048];
    snprintf(extended, sizeof extended, "%s| `GPUMEM_EXTRA` | bool | `0` | Not an option. |\n",
             verbose);
    expect_rejected(replaced(md, verbose, extended), "extra row 38");
    snprintf(extended, sizeof extended, "%s%s", verbose, verbose);
    expect_rejected(replaced(md, verbose, extended), "extra row 38");
    free(verbose);
    free(md);
}

Test(config_docs, wrong_default_is_noticed)
{
    char *md = read_docs();
    expect_rejected(replaced(md, "| `8MiB` |", "| `16MiB` |"),
                    "GPUMEM_SEGMENT_MIN: default `16MiB`, options.def says `8MiB`");
    expect_rejected(replaced(md, "| `unlimited` |", "| unlimited |"), "GPUMEM_MAX_CACHED: default");
    free(md);
}

Test(config_docs, wrong_type_or_order_is_noticed)
{
    char *md = read_docs();
    expect_rejected(replaced(md, "| `GPUMEM_VERBOSE` | integer |", "| `GPUMEM_VERBOSE` | number |"),
                    "GPUMEM_VERBOSE: type 'number', expected 'integer'");
    char *min = row_of(md, "| `GPUMEM_SEGMENT_MIN` |");
    char *max = row_of(md, "| `GPUMEM_SEGMENT_MAX` |");
    char swapped[4096];
    snprintf(swapped, sizeof swapped, "%s%s", max, min);
    char *both = malloc(strlen(min) + strlen(max) + 1);
    cr_assert_not_null(both);
    snprintf(both, strlen(min) + strlen(max) + 1, "%s%s", min, max);
    expect_rejected(replaced(md, both, swapped), "row 7 is `GPUMEM_SEGMENT_MAX`");
    free(both);
    free(min);
    free(max);
    free(md);
}

Test(config_docs, second_table_is_noticed)
{
    char *md = read_docs();
    char *twice = replaced(md, "## Sizes", TABLE_HEADER "\n|---|---|---|---|\n\n## Sizes");
    expect_rejected(twice, "found 2");
    expect_rejected(replaced(md, TABLE_HEADER, "| Variable | Type | Description |"), "found 0");
    free(md);
}

/* The example error lines on the page are what gpumem prints for that variable and value. */
static const char *pair_get(const char *name, void *user)
{
    const char *const *pair = user;
    return strcmp(pair[0], name) == 0 ? pair[1] : NULL;
}

Test(config_docs, documented_error_lines_are_real)
{
    char *md = read_docs();
    const char *pos = md;
    line l;
    int checked = 0;
    while (next_line(&pos, &l)) {
        char doc_line[1024], name[64], value[64], err[1024];
        if (l.n >= sizeof doc_line || strncmp(l.s, "gpumem: GPUMEM_", 15) != 0)
            continue;
        snprintf(doc_line, sizeof doc_line, "%.*s", (int)l.n, l.s);
        cr_assert_eq(sscanf(doc_line, "gpumem: %63[^=]='%63[^']'", name, value), 2, "%s", doc_line);
        const char *pair[] = {name, value};
        gm_config cfg;
        if (gm_config_parse(&cfg, pair_get, pair, NULL, err, sizeof err) == 0) {
            /* A line of the device check (configuration.md, "Several GPUs"): its two devices. */
            static const unsigned char uuid[2][16] = {
                {0x5e, 0x2f, 0x3c, 0x1a, 0x0d, 0x4e, 0x4b, 0x7a, 0x9c, 0x2f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69},
                {0xa1, 0xb3, 0xc5, 0xd7, 0xe9, 0xf1, 0x4a, 0x2b, 0x8c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93}};
            static const bool has[2] = {true, true};
            setenv(name, value, 1); /* the check shows a GPUMEM_LIMIT_<i>'s value from the environment */
            cr_assert_eq(gm_config_check_devices(&cfg, 2, uuid, has, false, err, sizeof err), -1, "%s", doc_line);
            unsetenv(name);
        }
        cr_assert_str_eq(err, doc_line);
        checked++;
    }
    cr_assert_geq(checked, 3);
    free(md);
}
