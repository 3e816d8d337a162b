/* Configuration: the option table (generated from options.def), the value parsers, and the
 * one-time load from the environment.
 *
 * Every value, the defaults included, goes through the same parser, so a default in options.def
 * that the parser would refuse shows up as an error in the tests instead of as a silent zero. */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gm_base.h"
#include "gm_config.h"

/* ---------------------------------------------------------------- the table */

/* ENUM rows carry their accepted words ("a|b|c") in the min column; every other type carries a
 * number there. These per-type macros keep both shapes compiling from the one X-macro. */
#define GM_NUM_BOOL(x) (x)
#define GM_NUM_SIZE(x) (x)
#define GM_NUM_SIZE_OR_UNLIMITED(x) (x)
#define GM_NUM_DOUBLE(x) (x)
#define GM_NUM_INT(x) (x)
#define GM_NUM_STRING(x) (x)
#define GM_NUM_ENUM(x) 0
#define GM_NUM_LIMIT(x) (x)

#define GM_WORDS_BOOL(x) NULL
#define GM_WORDS_SIZE(x) NULL
#define GM_WORDS_SIZE_OR_UNLIMITED(x) NULL
#define GM_WORDS_DOUBLE(x) NULL
#define GM_WORDS_INT(x) NULL
#define GM_WORDS_STRING(x) NULL
#define GM_WORDS_ENUM(x) (x)
#define GM_WORDS_LIMIT(x) NULL

const gm_option_desc gm_options[] = {
#define GM_OPTION(field, name, type, def, min, max, doc) \
    {name, GM_OPT_##type, def, GM_NUM_##type(min), GM_NUM_##type(max), doc},
#include "options.def"
#undef GM_OPTION
};
const size_t gm_option_count = sizeof gm_options / sizeof gm_options[0];

/* Where each row lands in gm_config. Both LIMIT rows (GPUMEM_LIMIT and GPUMEM_LIMIT_<i>) feed the
 * one per-device array, so their field name is not a member. */
#define GM_MEMBER(type, field) GM_MEMBER_##type(field)
#define GM_MEMBER_BOOL(f) f
#define GM_MEMBER_SIZE(f) f
#define GM_MEMBER_SIZE_OR_UNLIMITED(f) f
#define GM_MEMBER_DOUBLE(f) f
#define GM_MEMBER_INT(f) f
#define GM_MEMBER_STRING(f) f
#define GM_MEMBER_ENUM(f) f
#define GM_MEMBER_LIMIT(f) limit

/* The C type each option type is stored as; checked at compile time so a row whose member has
 * the wrong type cannot be written through a mismatched pointer. */
#define GM_CTYPE_BOOL bool
#define GM_CTYPE_SIZE uint64_t
#define GM_CTYPE_SIZE_OR_UNLIMITED uint64_t
#define GM_CTYPE_DOUBLE double
#define GM_CTYPE_INT int
#define GM_CTYPE_STRING char *
#define GM_CTYPE_ENUM int
#define GM_CTYPE_LIMIT gm_limit_setting *

#define GM_OPTION(field, name, type, def, min, max, doc)                                      \
    _Static_assert(_Generic(((gm_config *)0)->GM_MEMBER(type, field), GM_CTYPE_##type: 1,    \
                            default: 0),                                                     \
                   "gm_config." #field " does not have the C type of a " #type " option");
#include "options.def"
#undef GM_OPTION

typedef struct gm_option_slot {
    size_t offset;     /* of the member in gm_config */
    size_t size;       /* of the member: the capacity of STRING values */
    const char *words; /* ENUM: accepted words, '|'-separated */
} gm_option_slot;

static const gm_option_slot gm_slots[] = {
#define GM_OPTION(field, name, type, def, min, max, doc)                                      \
    {offsetof(gm_config, GM_MEMBER(type, field)),                                            \
     sizeof(((gm_config *)0)->GM_MEMBER(type, field)), GM_WORDS_##type(min)},
#include "options.def"
#undef GM_OPTION
};

/* A row whose name holds this marker stands for a family of variables, one per device. */
#define GM_FAMILY_MARK "<i>"
/* Longest variable name we build or copy; real names are far shorter. */
#define GM_NAME_MAX 128

/* ---------------------------------------------------------------- text helpers */

typedef struct span {
    const char *s;
    size_t n;
} span;

static span trim_span(span t)
{
    while (t.n && isspace((unsigned char)t.s[0])) {
        t.s++;
        t.n--;
    }
    while (t.n && isspace((unsigned char)t.s[t.n - 1]))
        t.n--;
    return t;
}

static span trim(const char *text)
{
    return trim_span((span){text, strlen(text)});
}

static bool span_ieq(span t, const char *word)
{
    return strlen(word) == t.n && strncasecmp(t.s, word, t.n) == 0;
}

/* Leading run of decimal digits of `t`. */
static size_t digit_run(span t)
{
    size_t i = 0;
    while (i < t.n && isdigit((unsigned char)t.s[i]))
        i++;
    return i;
}

/* strtod/strtol need a terminated string; numbers longer than this are not numbers anyone means. */
static int span_copy(span t, char *buf, size_t cap)
{
    if (t.n == 0 || t.n >= cap)
        return -1;
    memcpy(buf, t.s, t.n);
    buf[t.n] = '\0';
    return 0;
}

/* strtod in the "C" locale: the program may have called setlocale() with a decimal comma before
 * its first allocation, and "1.5" must mean the same in every program. Clears errno first so the
 * caller can test for ERANGE. */
static double c_strtod(const char *text, char **end)
{
    locale_t c = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    errno = 0;
    if (c == (locale_t)0)
        return strtod(text, end); /* out of memory: the program's locale is the best we have */
    double d = strtod_l(text, end, c);
    freelocale(c);
    return d;
}

/* ---------------------------------------------------------------- sizes */

/* Multiplier of a unit suffix: none or B, then K/M/G/T alone, with B, or with iB. All binary. */
static int parse_unit(span u, uint64_t *unit)
{
    static const char prefixes[] = "kmgt";
    *unit = 1;
    if (u.n == 0 || span_ieq(u, "b"))
        return 0;
    const char *p = memchr(prefixes, tolower((unsigned char)u.s[0]), 4);
    if (!p)
        return -1;
    span rest = {u.s + 1, u.n - 1};
    if (rest.n != 0 && !span_ieq(rest, "b") && !span_ieq(rest, "ib"))
        return -1;
    *unit = (uint64_t)1 << (10 * (p - prefixes + 1));
    return 0;
}

/* floor(0.<digits> * unit), exactly: working from the last digit back, each step is
 * floor((unit * d + previous) / 10), which never exceeds unit and so cannot overflow. */
static uint64_t fraction_times(span digits, uint64_t unit)
{
    uint64_t f = 0;
    for (size_t i = digits.n; i-- > 0;)
        f = (unit * (uint64_t)(digits.s[i] - '0') + f) / 10;
    return f;
}

static bool has_nonzero_digit(span digits)
{
    for (size_t i = 0; i < digits.n; i++)
        if (digits.s[i] != '0')
            return true;
    return false;
}

/* Whole part with overflow checking; returns the digits consumed, 0 on overflow or no digit. */
static size_t parse_whole(span t, uint64_t *out)
{
    size_t n = digit_run(t);
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t d = (uint64_t)(t.s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    *out = v;
    return n;
}

/* Grammar: digits [ '.' digits ] [ ' ' ] [ unit ]. Parsed by hand rather than with strtod so
 * that every byte count up to UINT64_MAX is exact and signs, hex, exponents, inf and nan never
 * get in. */
static int parse_size_span(span t, uint64_t *out)
{
    uint64_t whole, unit;
    size_t i = parse_whole(t, &whole);
    if (i == 0)
        return -1;
    span frac = {t.s + i, 0};
    if (i < t.n && t.s[i] == '.') {
        frac.s++;
        frac.n = digit_run((span){frac.s, t.n - i - 1});
        if (frac.n == 0)
            return -1;
        i += 1 + frac.n;
    }
    if (i < t.n && t.s[i] == ' ') /* "4 GiB": one space, as documented */
        i++;
    if (parse_unit((span){t.s + i, t.n - i}, &unit) != 0)
        return -1;
    if (unit == 1 && has_nonzero_digit(frac))
        return -1; /* a byte count is whole: "1.5" bytes means nothing */
    uint64_t part = fraction_times(frac, unit);
    if (whole > (UINT64_MAX - part) / unit)
        return -1;
    *out = whole * unit + part;
    return 0;
}

int gm_parse_size(const char *text, uint64_t *out)
{
    if (!text)
        return -1;
    return parse_size_span(trim(text), out);
}

/* ---------------------------------------------------------------- booleans */

static int parse_bool_span(span t, bool *out)
{
    static const char *const yes[] = {"1", "true", "yes", "on"};
    static const char *const no[] = {"0", "false", "no", "off"};
    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        if (span_ieq(t, yes[i]) || span_ieq(t, no[i])) {
            *out = span_ieq(t, yes[i]);
            return 0;
        }
    }
    return -1;
}

int gm_parse_bool(const char *text, bool *out)
{
    if (!text)
        return -1;
    return parse_bool_span(trim(text), out);
}

/* ---------------------------------------------------------------- numbers */

/* Digits, an optional leading '-' (so that "-1" is reported as out of range) and, where
 * `fraction`, a '.' and more digits: the plain decimal forms the documentation promises. strtod
 * and strtol alone would also take '+', hexadecimal, exponents and "0x1.8p1". */
static bool is_decimal(span t, bool fraction)
{
    size_t i = t.n && t.s[0] == '-';
    size_t whole = digit_run((span){t.s + i, t.n - i});
    if (whole == 0)
        return false;
    i += whole;
    if (i == t.n)
        return true;
    if (!fraction || t.s[i] != '.')
        return false;
    size_t frac = digit_run((span){t.s + i + 1, t.n - i - 1});
    return frac > 0 && i + 1 + frac == t.n;
}

/* ---------------------------------------------------------------- limits */

/* Why a limit was refused, for the error line; NULL when it is merely malformed. */
typedef struct limit_error {
    const char *why;
    char buf[256];
} limit_error;

/* "80%", "12.5%": the same digit grammar as sizes, so no sign, exponent, inf or nan. */
static int parse_percent(span t, double *out, limit_error *e)
{
    char buf[64];
    span num = t;
    num.n--; /* the '%' */
    if (num.n && num.s[num.n - 1] == ' ') /* "50 %": one space, as before a size's unit */
        num.n--;
    size_t whole = digit_run(num);
    size_t frac = whole < num.n && num.s[whole] == '.'
                      ? digit_run((span){num.s + whole + 1, num.n - whole - 1})
                      : 0;
    bool shape_ok = whole > 0 && (whole == num.n || (frac > 0 && whole + 1 + frac == num.n));
    if (!shape_ok || span_copy(num, buf, sizeof buf) != 0)
        return -1;
    double pct = c_strtod(buf, NULL);
    if (!(pct > 0.0 && pct <= 100.0)) {
        e->why = "a percentage must be above 0% and at most 100%";
        return -1;
    }
    *out = pct;
    return 0;
}

/* One device's limit: none, a size, or a percentage. */
static int parse_limit_span(span t, gm_limit_setting *out, limit_error *e)
{
    gm_limit_setting s = {GM_LIMIT_NONE, 0, 0.0};
    if (span_ieq(t, "none")) {
        *out = s;
        return 0;
    }
    if (t.n && t.s[t.n - 1] == '%') {
        s.kind = GM_LIMIT_PERCENT;
        if (parse_percent(t, &s.percent, e) != 0)
            return -1;
    } else {
        s.kind = GM_LIMIT_BYTES;
        if (parse_size_span(t, &s.bytes) != 0)
            return -1;
        if (s.bytes == 0) {
            /* 0 would refuse every allocation; "no limit" has its own word. */
            e->why = "a limit of 0 bytes would refuse every allocation (write none for no limit)";
            return -1;
        }
    }
    *out = s;
    return 0;
}

int gm_parse_limit(const char *text, gm_limit_setting *out)
{
    limit_error e = {NULL, {0}};
    if (!text)
        return -1;
    return parse_limit_span(trim(text), out, &e);
}

/* Device index of a list entry or a GPUMEM_LIMIT_<i> name: decimal, no sign, no leading zeros
 * (so each device has exactly one spelling), below GM_MAX_DEVICES. */
static int parse_device_index(span t, int *out)
{
    uint64_t v;
    if (t.n == 0 || digit_run(t) != t.n || (t.n > 1 && t.s[0] == '0'))
        return -1;
    if (t.n > 3 || parse_whole(t, &v) != t.n || v >= GM_MAX_DEVICES)
        return -1;
    *out = (int)v;
    return 0;
}

static int hex_digit(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (NVML's and nvidia-smi -L's spelling) or "MIG-" and
 * the same: 16 bytes in hex, dashes after bytes 4, 6, 8 and 10. */
static bool looks_like_uuid(span t)
{
    return t.n >= 4 && (strncasecmp(t.s, "GPU-", 4) == 0 || strncasecmp(t.s, "MIG-", 4) == 0);
}

static int parse_uuid(span t, unsigned char out[16])
{
    static const int dash_after[] = {4, 6, 8, 10};
    size_t i = 4, d = 0;
    if (!looks_like_uuid(t)) return -1;
    for (int b = 0; b < 16; b++) {
        if (d < 4 && b == dash_after[d]) {
            if (i >= t.n || t.s[i] != '-') return -1;
            i++;
            d++;
        }
        int hi = i + 1 < t.n ? hex_digit(t.s[i]) : -1, lo = i + 1 < t.n ? hex_digit(t.s[i + 1]) : -1;
        if (hi < 0 || lo < 0) return -1;
        out[b] = (unsigned char)(hi << 4 | lo);
        i += 2;
    }
    return i == t.n ? 0 : -1;
}

#define GM_UUID_FORM "a UUID as nvidia-smi -L prints it (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, or MIG-...)"

/* A "GPU-...:value" entry: its own table, since which ordinal it is is known only once the
 * driver runs (gm_config_limit_of). */
static int parse_uuid_entry(span key, span val, gm_limit_keys *keys, limit_error *e)
{
    gm_limit_uuid u;
    memset(&u, 0, sizeof u);
    snprintf(u.text, sizeof u.text, "%.*s", (int)(key.n < sizeof u.text - 1 ? key.n : sizeof u.text - 1), key.s);
    if (parse_uuid(key, u.uuid) != 0) {
        snprintf(e->buf, sizeof e->buf, "device '%.40s' is not %s", u.text, GM_UUID_FORM);
        e->why = e->buf;
        return -1;
    }
    for (int i = 0; i < keys->nuuid; i++)
        if (memcmp(keys->uuid[i].uuid, u.uuid, 16) == 0) {
            snprintf(e->buf, sizeof e->buf, "device %.40s is listed twice", u.text);
            e->why = e->buf;
            return -1;
        }
    if (keys->nuuid == GM_MAX_DEVICES) {
        e->why = "more than 64 devices are listed";
        return -1;
    }
    if (parse_limit_span(val, &u.setting, e) != 0) return -1;
    keys->uuid[keys->nuuid++] = u;
    return 0;
}

/* One "i:value" or "UUID:value" entry of a per-device list, refusing a device listed twice. */
static int parse_list_entry(span entry, gm_limit_setting *devices, gm_limit_keys *keys, limit_error *e)
{
    const char *colon = memchr(entry.s, ':', entry.n);
    if (!colon)
        return -1;
    span idx = trim_span((span){entry.s, (size_t)(colon - entry.s)});
    span val = trim_span((span){colon + 1, entry.n - (size_t)(colon - entry.s) - 1});
    int dev;
    if (looks_like_uuid(idx))
        return parse_uuid_entry(idx, val, keys, e);
    if (parse_device_index(idx, &dev) != 0) {
        snprintf(e->buf, sizeof e->buf, "device index '%.*s' is not a number from 0 to %d nor a UUID (GPU-...)",
                 (int)(idx.n > 16 ? 16 : idx.n), idx.s, GM_MAX_DEVICES - 1);
        e->why = e->buf;
        return -1;
    }
    if (keys->listed & (1ull << dev)) {
        snprintf(e->buf, sizeof e->buf, "device %d is listed twice", dev);
        e->why = e->buf;
        return -1;
    }
    keys->listed |= 1ull << dev;
    return parse_limit_span(val, &devices[dev], e);
}

/* "0:4GiB,1:6GiB,GPU-...:50%": devices not listed get no limit. Written to `devices` and `keys`
 * only when the whole list is valid. */
static int parse_limit_list(span t, gm_limit_setting *devices, gm_limit_keys *keys, limit_error *e)
{
    gm_limit_setting parsed[GM_MAX_DEVICES] = {{GM_LIMIT_NONE, 0, 0.0}};
    gm_limit_keys k;
    memset(&k, 0, sizeof k);
    const char *end = t.s + t.n;
    for (const char *p = t.s;; ) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *stop = comma ? comma : end;
        if (parse_list_entry((span){p, (size_t)(stop - p)}, parsed, &k, e) != 0)
            return -1;
        if (!comma)
            break;
        p = comma + 1;
    }
    memcpy(devices, parsed, sizeof parsed);
    keys->listed = k.listed;
    keys->nuuid = k.nuuid;
    memcpy(keys->uuid, k.uuid, sizeof k.uuid);
    return 0;
}

/* ---------------------------------------------------------------- error lines */

typedef struct env_src {
    gm_env_get_fn get; /* NULL: an empty environment */
    void *user;
    char *const *names;
} env_src;

static const char *env_get(const env_src *env, const char *name)
{
    return env->get ? env->get(name, env->user) : NULL;
}

/* One variable being applied: what the error line needs to name. */
typedef struct parse_ctx {
    const gm_option_desc *opt;
    const gm_option_slot *slot;
    const char *name;  /* the variable as set: GPUMEM_LIMIT_3 for the per-device row */
    const char *value; /* as given */
    char *err;
    size_t errlen;
} parse_ctx;

#define GM_SIZE_FORMS "a size (e.g. 4GiB, 512MiB, 1.5G, 1048576)"
#define GM_LIMIT_FORMS GM_SIZE_FORMS ", a percentage of device memory (e.g. 80%)"

/* The value as given, on one line: control characters are escaped so that the error stays a
 * single line, and a runaway value is cut short. */
static void show_value(span v, char *buf, size_t cap)
{
    size_t o = 0, i = 0, room = cap - 8; /* room for one escape, "..." and the NUL */
    for (; i < v.n && o < room; i++) {
        unsigned char ch = (unsigned char)v.s[i];
        if (ch < 0x20 || ch == 0x7f)
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", ch);
        else
            buf[o++] = (char)ch;
    }
    if (i < v.n)
        o += (size_t)snprintf(buf + o, cap - o, "...");
    buf[o] = '\0';
}

/* 2097152 -> "2MiB": the largest binary unit that divides the value exactly. */
static void format_bytes(uint64_t v, char *buf, size_t cap)
{
    static const char *const units[] = {"TiB", "GiB", "MiB", "KiB"};
    for (int i = 0; i < 4; i++) {
        unsigned shift = 10u * (unsigned)(4 - i);
        if (v && v % ((uint64_t)1 << shift) == 0) {
            snprintf(buf, cap, "%llu%s", (unsigned long long)(v >> shift), units[i]);
            return;
        }
    }
    snprintf(buf, cap, "%llu", (unsigned long long)v);
}

/* min/max in the table are inclusive; a row with max <= min has no range (BOOL, LIMIT, ...). */
static bool has_range(const gm_option_desc *o)
{
    return o->max > o->min;
}

static bool in_range(const gm_option_desc *o, long double v)
{
    return !has_range(o) || (v >= (long double)o->min && v <= (long double)o->max);
}

static void describe_size(const gm_option_desc *o, char *buf, size_t cap)
{
    char lo[32], hi[32];
    if (!has_range(o)) {
        snprintf(buf, cap, "%s", GM_SIZE_FORMS);
        return;
    }
    format_bytes((uint64_t)o->min, lo, sizeof lo);
    format_bytes((uint64_t)o->max, hi, sizeof hi);
    snprintf(buf, cap, GM_SIZE_FORMS " from %s to %s", lo, hi);
}

static void describe_number(const gm_option_desc *o, const char *noun, char *buf, size_t cap)
{
    if (has_range(o))
        snprintf(buf, cap, "%s from %g to %g", noun, o->min, o->max);
    else
        snprintf(buf, cap, "%s", noun);
}

static void describe_enum(const char *words, char *buf, size_t cap)
{
    size_t o = (size_t)snprintf(buf, cap, "one of ");
    for (const char *w = words; *w && o < cap; w++)
        buf[o++] = *w == '|' ? '/' : *w;
    buf[o < cap ? o : cap - 1] = '\0';
}

/* What the variable accepts, after "expected ". */
static void describe_forms(const parse_ctx *c, char *buf, size_t cap)
{
    const gm_option_desc *o = c->opt;
    switch (o->type) {
    case GM_OPT_BOOL: snprintf(buf, cap, "1, 0, true, false, yes, no, on or off"); break;
    case GM_OPT_SIZE: describe_size(o, buf, cap); break;
    case GM_OPT_SIZE_OR_UNLIMITED: snprintf(buf, cap, GM_SIZE_FORMS " or unlimited"); break;
    case GM_OPT_DOUBLE: describe_number(o, "a decimal number", buf, cap); break;
    case GM_OPT_INT: describe_number(o, "a whole decimal number", buf, cap); break;
    case GM_OPT_STRING:
        snprintf(buf, cap, "a non-empty value shorter than %zu bytes", c->slot->size);
        break;
    case GM_OPT_ENUM: describe_enum(c->slot->words, buf, cap); break;
    case GM_OPT_LIMIT:
        if (strstr(o->name, GM_FAMILY_MARK))
            snprintf(buf, cap, "%s", GM_LIMIT_FORMS ", or none");
        else
            snprintf(buf, cap, "%s",
                     GM_LIMIT_FORMS ", none, or a per-device list (e.g. 0:4GiB,1:50%) whose devices may also be UUIDs (GPU-...:4GiB)");
        break;
    }
}

/* Writes the one error line: variable, value as given, optional reason, accepted forms. */
static int fail(const parse_ctx *c, const char *why)
{
    char shown[272], forms[256];
    if (!c->err || c->errlen == 0)
        return -1;
    show_value((span){c->value, strlen(c->value)}, shown, sizeof shown);
    describe_forms(c, forms, sizeof forms);
    snprintf(c->err, c->errlen, "gpumem: %s='%s' is not valid: %s%sexpected %s", c->name, shown,
             why ? why : "", why ? "; " : "", forms);
    return -1;
}

/* ---------------------------------------------------------------- applying one value */

static int apply_bool(const parse_ctx *c, span v, void *slot)
{
    return parse_bool_span(v, slot) == 0 ? 0 : fail(c, NULL);
}

static int apply_size(const parse_ctx *c, span v, void *slot)
{
    uint64_t bytes;
    if (parse_size_span(v, &bytes) != 0)
        return fail(c, NULL);
    if (!in_range(c->opt, (long double)bytes))
        return fail(c, "out of range");
    *(uint64_t *)slot = bytes;
    return 0;
}

static int apply_size_or_unlimited(const parse_ctx *c, span v, void *slot)
{
    if (span_ieq(v, "unlimited")) {
        *(uint64_t *)slot = GM_UNLIMITED;
        return 0;
    }
    return apply_size(c, v, slot);
}

static int apply_double(const parse_ctx *c, span v, void *slot)
{
    char buf[64], *end;
    if (!is_decimal(v, true) || span_copy(v, buf, sizeof buf) != 0)
        return fail(c, NULL);
    double d = c_strtod(buf, &end);
    if (*end || errno == ERANGE || !isfinite(d))
        return fail(c, NULL);
    if (!in_range(c->opt, d))
        return fail(c, "out of range");
    *(double *)slot = d;
    return 0;
}

static int apply_int(const parse_ctx *c, span v, void *slot)
{
    char buf[64], *end;
    if (!is_decimal(v, false) || span_copy(v, buf, sizeof buf) != 0)
        return fail(c, NULL);
    errno = 0;
    long n = strtol(buf, &end, 10);
    if (*end || errno == ERANGE)
        return fail(c, NULL);
    if (n < INT_MIN || n > INT_MAX || !in_range(c->opt, (long double)n))
        return fail(c, "out of range");
    *(int *)slot = (int)n;
    return 0;
}

static int apply_string(const parse_ctx *c, span v, void *slot)
{
    if (v.n >= c->slot->size)
        return fail(c, "too long");
    memcpy(slot, v.s, v.n);
    ((char *)slot)[v.n] = '\0';
    return 0;
}

/* ENUM: the index of the matching word, case-insensitively. */
static int apply_enum(const parse_ctx *c, span v, void *slot)
{
    const char *w = c->slot->words;
    for (int i = 0; w && *w; i++) {
        size_t len = strcspn(w, "|");
        if (len == v.n && strncasecmp(w, v.s, len) == 0) {
            *(int *)slot = i;
            return 0;
        }
        w += len + (w[len] == '|');
    }
    return fail(c, NULL);
}

/* Both LIMIT rows land in gm_config.limit (their slot); the keys beside it say who named what. */
static gm_limit_keys *keys_of(gm_limit_setting *limit_slot)
{
    return &((gm_config *)((char *)limit_slot - offsetof(gm_config, limit)))->limit_keys;
}

/* GPUMEM_LIMIT: a per-device list, or one value for every device. */
static int apply_limit(const parse_ctx *c, span v, void *slot)
{
    gm_limit_setting *devices = slot, one;
    gm_limit_keys *keys = keys_of(devices);
    limit_error e = {NULL, {0}};
    snprintf(keys->text, sizeof keys->text, "%s", c->value);
    if (memchr(v.s, ':', v.n))
        return parse_limit_list(v, devices, keys, &e) == 0 ? 0 : fail(c, e.why);
    if (parse_limit_span(v, &one, &e) != 0)
        return fail(c, e.why);
    for (int i = 0; i < GM_MAX_DEVICES; i++)
        devices[i] = one;
    return 0;
}

/* GPUMEM_LIMIT_<i>: one device's value, no list. */
static int apply_device_limit(const parse_ctx *c, span v, gm_limit_setting *device)
{
    limit_error e = {NULL, {0}};
    return parse_limit_span(v, device, &e) == 0 ? 0 : fail(c, e.why);
}

typedef int (*gm_applier)(const parse_ctx *c, span v, void *slot);

static int apply_value(const parse_ctx *c, void *slot)
{
    static const gm_applier appliers[] = {
        [GM_OPT_BOOL] = apply_bool,
        [GM_OPT_SIZE] = apply_size,
        [GM_OPT_SIZE_OR_UNLIMITED] = apply_size_or_unlimited,
        [GM_OPT_DOUBLE] = apply_double,
        [GM_OPT_INT] = apply_int,
        [GM_OPT_STRING] = apply_string,
        [GM_OPT_ENUM] = apply_enum,
        [GM_OPT_LIMIT] = apply_limit,
    };
    span v = trim(c->value);
    if (v.n == 0)
        return fail(c, "the value is empty");
    return appliers[c->opt->type](c, v, slot);
}

/* ---------------------------------------------------------------- per-device families */

/* Length of the name part of a `names` entry, which may be "NAME" or environ's "NAME=VALUE". */
static size_t name_len(const char *entry)
{
    return strcspn(entry, "=");
}

static size_t family_prefix_len(const gm_option_desc *o)
{
    const char *mark = strstr(o->name, GM_FAMILY_MARK);
    return mark ? (size_t)(mark - o->name) : 0;
}

/* The digits after a family prefix ("GPUMEM_LIMIT_" + "12"), or an empty span if the name is not
 * the prefix followed by digits only. */
static span family_suffix(const gm_option_desc *o, const char *name, size_t len)
{
    size_t plen = family_prefix_len(o);
    span none = {name, 0};
    if (!plen || len <= plen || strncmp(name, o->name, plen) != 0)
        return none;
    span digits = {name + plen, len - plen};
    return digit_run(digits) == digits.n ? digits : none;
}

/* A GPUMEM_LIMIT_<digits> that names no device (64, 007) is an error rather than an unknown
 * variable: the user clearly meant a per-device limit, and ignoring it would drop the limit. */
static int check_family_names(const parse_ctx *base, const env_src *env)
{
    int dev;
    for (char *const *p = env->names; p && *p; p++) {
        size_t len = name_len(*p);
        span digits = family_suffix(base->opt, *p, len);
        if (!digits.n || parse_device_index(digits, &dev) == 0)
            continue;
        char name[GM_NAME_MAX], shown[272];
        snprintf(name, sizeof name, "%.*s", (int)len, *p);
        const char *value = env_get(env, name);
        show_value((span){value ? value : "", value ? strlen(value) : 0}, shown, sizeof shown);
        if (base->err && base->errlen)
            snprintf(base->err, base->errlen,
                     "gpumem: %s='%s' is not valid: expected a device number from 0 to %d "
                     "without leading zeros in the name (%.*s0 ... %.*s%d)",
                     name, shown, GM_MAX_DEVICES - 1, (int)family_prefix_len(base->opt),
                     base->opt->name, (int)family_prefix_len(base->opt), base->opt->name,
                     GM_MAX_DEVICES - 1);
        return -1;
    }
    return 0;
}

/* GPUMEM_LIMIT_<i>: probed by name for every device, so it works without a `names` list. */
static int apply_family(const parse_ctx *base, const env_src *env, gm_limit_setting *devices)
{
    if (check_family_names(base, env) != 0)
        return -1;
    for (int i = 0; i < GM_MAX_DEVICES; i++) {
        char name[GM_NAME_MAX];
        int plen = (int)family_prefix_len(base->opt);
        snprintf(name, sizeof name, "%.*s%d", plen, base->opt->name, i);
        parse_ctx c = *base;
        c.name = name;
        c.value = env_get(env, name);
        if (!c.value)
            continue;
        if (trim(c.value).n == 0)
            return fail(&c, "the value is empty");
        if (apply_device_limit(&c, trim(c.value), &devices[i]) != 0)
            return -1;
        keys_of(devices)->overridden |= 1ull << i;
    }
    return 0;
}

static int apply_row(gm_config *cfg, size_t row, const env_src *env, char *err, size_t errlen)
{
    const gm_option_desc *o = &gm_options[row];
    parse_ctx c = {o, &gm_slots[row], o->name, NULL, err, errlen};
    void *slot = (char *)cfg + gm_slots[row].offset;
    if (family_prefix_len(o))
        return apply_family(&c, env, slot); /* its default is "unset": nothing to apply */
    c.value = env_get(env, o->name);
    if (!c.value)
        c.value = o->default_value;
    return apply_value(&c, slot);
}

/* ---------------------------------------------------------------- unknown variables */

static bool is_known(const char *name, size_t len)
{
    for (size_t i = 0; i < gm_option_count; i++) {
        const gm_option_desc *o = &gm_options[i];
        if (family_prefix_len(o) ? family_suffix(o, name, len).n > 0
                                 : strlen(o->name) == len && strncmp(o->name, name, len) == 0)
            return true;
    }
    return false;
}

static size_t min3(size_t a, size_t b, size_t c)
{
    size_t m = a < b ? a : b;
    return m < c ? m : c;
}

/* Levenshtein distance; both strings are shorter than GM_NAME_MAX. */
static size_t edit_distance(const char *a, size_t an, const char *b, size_t bn)
{
    size_t prev[GM_NAME_MAX + 1], cur[GM_NAME_MAX + 1];
    for (size_t j = 0; j <= bn; j++)
        prev[j] = j;
    for (size_t i = 1; i <= an; i++) {
        cur[0] = i;
        for (size_t j = 1; j <= bn; j++)
            cur[j] = min3(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]));
        memcpy(prev, cur, (bn + 1) * sizeof prev[0]);
    }
    return prev[bn];
}

/* The name a row offers as a suggestion: its own, or for a per-device family the prefix with the
 * misspelled name's trailing device number (GPUMEM_LIMT_1 -> GPUMEM_LIMIT_1). */
static bool candidate_name(const gm_option_desc *o, const char *name, size_t len, char *buf,
                           size_t cap)
{
    size_t plen = family_prefix_len(o), d = 0;
    if (!plen) {
        snprintf(buf, cap, "%s", o->name);
        return true;
    }
    while (d < len && d < 3 && isdigit((unsigned char)name[len - 1 - d]))
        d++;
    snprintf(buf, cap, "%.*s%.*s", (int)plen, o->name, (int)d, name + len - d);
    return d > 0;
}

/* Closest known name within an edit distance of 3, or "" when none is that close. */
static void suggest(const char *name, size_t len, char *best, size_t cap)
{
    size_t best_d = 4;
    best[0] = '\0';
    if (len >= GM_NAME_MAX)
        return;
    for (size_t i = 0; i < gm_option_count; i++) {
        char cand[GM_NAME_MAX];
        if (!candidate_name(&gm_options[i], name, len, cand, sizeof cand))
            continue;
        size_t d = edit_distance(name, len, cand, strlen(cand));
        if (d < best_d) {
            best_d = d;
            snprintf(best, cap, "%s", cand);
        }
    }
}

/* A misspelled variable would otherwise be silently ignored; a warning is enough because the
 * program can still run correctly with the default. */
static void warn_unknown(const env_src *env)
{
    static const char prefix[] = "GPUMEM_";
    for (char *const *p = env->names; p && *p; p++) {
        size_t len = name_len(*p);
        if (strncmp(*p, prefix, sizeof prefix - 1) != 0 || is_known(*p, len))
            continue;
        char shown[272], best[GM_NAME_MAX];
        show_value((span){*p, len}, shown, sizeof shown);
        suggest(*p, len, best, sizeof best);
        fprintf(stderr, "gpumem: warning: unknown variable %s ignored%s%s%s\n", shown,
                best[0] ? "; did you mean " : "", best, best[0] ? "?" : "");
    }
}

/* ---------------------------------------------------------------- cross-field checks */

static const gm_option_desc *find_option(const char *name)
{
    for (size_t i = 0; i < gm_option_count; i++)
        if (strcmp(gm_options[i].name, name) == 0)
            return &gm_options[i];
    return NULL;
}

/* "'2GiB'" for a value that was set, "'1GiB' (the default)" for one that was not. */
static void show_setting(const env_src *env, const char *name, char *buf, size_t cap)
{
    const char *v = env_get(env, name);
    const char *text = v ? v : find_option(name)->default_value;
    char shown[272];
    show_value((span){text, strlen(text)}, shown, sizeof shown);
    snprintf(buf, cap, "'%s'%s", shown, v ? "" : " (the default)");
}

/* lo <= hi, else one line naming both variables and their values. */
static int check_order(const env_src *env, uint64_t lo, const char *lo_name, uint64_t hi,
                       const char *hi_name, char *err, size_t errlen)
{
    char lo_shown[300], hi_shown[300];
    if (lo <= hi)
        return 0;
    show_setting(env, lo_name, lo_shown, sizeof lo_shown);
    show_setting(env, hi_name, hi_shown, sizeof hi_shown);
    if (err && errlen)
        snprintf(err, errlen, "gpumem: %s=%s is not valid: expected a size no larger than %s=%s",
                 lo_name, lo_shown, hi_name, hi_shown);
    return -1;
}

/* 77 tells meson (and automake) "test skipped": a leak must never read as a skip. */
static int check_leak_exitcode(const gm_config *cfg, const env_src *env, char *err, size_t errlen)
{
    if (cfg->leak_exitcode != 77)
        return 0;
    char shown[300];
    show_setting(env, "GPUMEM_LEAK_EXITCODE", shown, sizeof shown);
    if (err && errlen)
        snprintf(err, errlen,
                 "gpumem: GPUMEM_LEAK_EXITCODE=%s is not valid: expected a whole decimal number "
                 "from 0 to 255 other than 77 (77 means \"skipped\" to test runners)", shown);
    return -1;
}

static int check_cross_fields(const gm_config *cfg, const env_src *env, char *err, size_t errlen)
{
    if (check_leak_exitcode(cfg, env, err, errlen))
        return -1;
    return check_order(env, cfg->segment_min, "GPUMEM_SEGMENT_MIN", cfg->segment_max,
                       "GPUMEM_SEGMENT_MAX", err, errlen);
}

/* ---------------------------------------------------------------- entry points */

int gm_config_parse(gm_config *out, gm_env_get_fn get, void *user, char *const *names,
                    char *err, size_t errlen)
{
    env_src env = {get, user, names};
    gm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    if (err && errlen)
        err[0] = '\0';
    warn_unknown(&env);
    for (size_t i = 0; i < gm_option_count; i++)
        if (apply_row(&cfg, i, &env, err, errlen) != 0)
            return -1;
    if (check_cross_fields(&cfg, &env, err, errlen) != 0)
        return -1;
    *out = cfg; /* only a fully valid configuration is ever handed out */
    return 0;
}

int gm_config_report_signal(const gm_config *cfg)
{
    switch (cfg->report_signal) { /* the words of options.def: off|SIGUSR1|USR1|SIGUSR2|USR2 */
    case 1: case 2: return SIGUSR1;
    case 3: case 4: return SIGUSR2;
    default: return 0;
    }
}

void gm_config_defaults(gm_config *out)
{
    char err[512];
    if (gm_config_parse(out, NULL, NULL, NULL, err, sizeof err) != 0) {
        /* A default options.def itself gets wrong: a build bug the tests exist to catch. */
        fprintf(stderr, "%s (a default in options.def)\n", err);
        abort();
    }
}

static gm_config g_config;
static pthread_once_t g_config_once = PTHREAD_ONCE_INIT;

static const char *process_getenv(const char *name, void *user)
{
    (void)user;
    return getenv(name);
}

/* _exit, not exit: this can run inside the first cudaMalloc or a library constructor, where
 * atexit handlers (our own exit report included) would run against a half-started manager. */
static void load_from_environment(void)
{
    char err[1024];
    if (gm_config_parse(&g_config, process_getenv, NULL, environ, err, sizeof err) == 0) {
        gm_log_set_verbosity(g_config.verbose);
        return;
    }
    fprintf(stderr, "%s\n", err);
    fflush(stderr);
    _exit(2);
}

const gm_config *gm_config_get(void)
{
    pthread_once(&g_config_once, load_from_environment);
    return &g_config;
}

void gm_config_reset_for_tests(void)
{
    static const pthread_once_t fresh = PTHREAD_ONCE_INIT;
    g_config_once = fresh;
}

uint64_t gm_limit_resolve(const gm_limit_setting *setting, uint64_t device_total)
{
    switch (setting->kind) {
    case GM_LIMIT_BYTES:
        return setting->bytes;
    case GM_LIMIT_PERCENT: {
        if (setting->percent >= 100.0)
            return device_total ? device_total : 1;
        /* long double holds any uint64_t exactly, so only the percentage itself is inexact. */
        long double v = floorl((long double)device_total * setting->percent / 100.0L);
        return v >= 1.0L ? (uint64_t)v : 1; /* 0 would read as "no limit" */
    }
    case GM_LIMIT_NONE:
    default:
        return 0;
    }
}

/* ---------------------------------------------------------------- limits by device */

_Static_assert(GM_MAX_DEVICES == 64, "gm_limit_keys keeps one bit per ordinal in a uint64_t");

static const gm_limit_uuid *uuid_entry(const gm_limit_keys *k, const unsigned char uuid[16])
{
    for (int i = 0; uuid && i < k->nuuid; i++)
        if (memcmp(k->uuid[i].uuid, uuid, 16) == 0) return &k->uuid[i];
    return NULL;
}

const gm_limit_setting *gm_config_limit_of(const gm_config *cfg, int device, const unsigned char *uuid)
{
    static const gm_limit_setting none = {GM_LIMIT_NONE, 0, 0.0};
    if (device < 0 || device >= GM_MAX_DEVICES) return &none;
    const gm_limit_uuid *u = uuid_entry(&cfg->limit_keys, uuid);
    if (u && !(cfg->limit_keys.overridden & (1ull << device))) return &u->setting;
    return &cfg->limit[device];
}

/* "it sees 2 devices (0 to 1)" */
static void describe_seen(int count, char *buf, size_t cap)
{
    if (count == 1) snprintf(buf, cap, "this process sees 1 device (0)");
    else snprintf(buf, cap, "this process sees %d devices (0 to %d)", count, count - 1);
}

static int check_ordinals(const gm_config *cfg, int count, char *err, size_t errlen)
{
    const gm_limit_keys *k = &cfg->limit_keys;
    char seen[64], shown[300];
    describe_seen(count, seen, sizeof seen);
    for (int i = count; i < GM_MAX_DEVICES; i++) {
        if (k->overridden & (1ull << i)) {
            char name[32];
            snprintf(name, sizeof name, "GPUMEM_LIMIT_%d", i);
            const char *v = getenv(name);
            show_value(trim(v ? v : ""), shown, sizeof shown);
            snprintf(err, errlen,
                     "gpumem: %s='%s' is not valid: there is no device %d: %s, numbered after "
                     "CUDA_VISIBLE_DEVICES; expected GPUMEM_LIMIT_0 to GPUMEM_LIMIT_%d, or a UUID entry in "
                     "GPUMEM_LIMIT (GPU-...:size)", name, shown, i, seen, count - 1);
            return -1;
        }
        if (k->listed & (1ull << i)) {
            show_value(trim(k->text), shown, sizeof shown);
            snprintf(err, errlen,
                     "gpumem: GPUMEM_LIMIT='%s' is not valid: there is no device %d: %s, numbered after "
                     "CUDA_VISIBLE_DEVICES; expected device numbers from 0 to %d or %s", shown, i, seen,
                     count - 1, GM_UUID_FORM);
            return -1;
        }
    }
    return 0;
}

static int check_uuids(const gm_config *cfg, int count, const unsigned char (*uuid)[16], const bool *has_uuid,
                       bool subset, char *err, size_t errlen)
{
    const gm_limit_keys *k = &cfg->limit_keys;
    char shown[300], seen[64];
    show_value(trim(k->text), shown, sizeof shown);
    describe_seen(count, seen, sizeof seen);
    for (int e = 0; e < k->nuuid; e++) {
        int found = -1;
        for (int i = 0; i < count && found < 0; i++)
            if (has_uuid[i] && memcmp(uuid[i], k->uuid[e].uuid, 16) == 0) found = i;
        if (found >= 0 && (k->listed & (1ull << found))) {
            snprintf(err, errlen,
                     "gpumem: GPUMEM_LIMIT='%s' is not valid: %s is device %d, which the list also names by "
                     "number; expected each device once", shown, k->uuid[e].text, found);
            return -1;
        }
        if (found < 0 && subset) {
            gm_log(GM_INFO, "GPUMEM_LIMIT: %s is not a device this process sees (CUDA_VISIBLE_DEVICES): "
                            "its entry is skipped", k->uuid[e].text);
            continue;
        }
        if (found < 0) {
            snprintf(err, errlen,
                     "gpumem: GPUMEM_LIMIT='%s' is not valid: no device has the UUID %s (%s; nvidia-smi -L "
                     "lists their UUIDs); expected device numbers or %s", shown, k->uuid[e].text, seen,
                     GM_UUID_FORM);
            return -1;
        }
    }
    return 0;
}

int gm_config_check_devices(const gm_config *cfg, int count, const unsigned char (*uuid)[16],
                            const bool *has_uuid, bool subset, char *err, size_t errlen)
{
    char scratch[8];
    if (!err || !errlen) {
        err = scratch;
        errlen = sizeof scratch;
    }
    err[0] = '\0';
    if (count < 0) count = 0;
    if (count > GM_MAX_DEVICES) count = GM_MAX_DEVICES;
    if (check_ordinals(cfg, count, err, errlen) != 0) return -1;
    return check_uuids(cfg, count, uuid, has_uuid, subset, err, errlen);
}

void gm_config_check_devices_or_exit(int count, const unsigned char (*uuid)[16], const bool *has_uuid)
{
    char err[1024];
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    if (gm_config_check_devices(gm_config_get(), count, uuid, has_uuid, visible != NULL, err, sizeof err) == 0)
        return;
    fprintf(stderr, "%s\n", err);
    fflush(stderr);
    _exit(2); /* as for any bad setting (load_from_environment says why not exit) */
}
