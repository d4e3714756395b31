/*
 * safetensors.c - the safetensors reader (mmap, validated) and writer.
 */
#define _POSIX_C_SOURCE 200809L
#include "runtime/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file.h"

/* ---- dtypes ---------------------------------------------------------------- */

static const struct {
    const char *name;
    size_t bytes;
} dtype_info[HX_SAFETENSORS_DTYPE_COUNT] = {
    [HX_SAFETENSORS_F32] = {"F32", 4},         [HX_SAFETENSORS_BF16] = {"BF16", 2},
    [HX_SAFETENSORS_F16] = {"F16", 2},         [HX_SAFETENSORS_F64] = {"F64", 8},
    [HX_SAFETENSORS_I64] = {"I64", 8},         [HX_SAFETENSORS_I32] = {"I32", 4},
    [HX_SAFETENSORS_I16] = {"I16", 2},         [HX_SAFETENSORS_I8] = {"I8", 1},
    [HX_SAFETENSORS_U64] = {"U64", 8},         [HX_SAFETENSORS_U32] = {"U32", 4},
    [HX_SAFETENSORS_U16] = {"U16", 2},         [HX_SAFETENSORS_U8] = {"U8", 1},
    [HX_SAFETENSORS_BOOL] = {"BOOL", 1},       [HX_SAFETENSORS_F8_E4M3] = {"F8_E4M3", 1},
    [HX_SAFETENSORS_F8_E5M2] = {"F8_E5M2", 1},
};

const char *hx_safetensors_dtype_name(hx_safetensors_dtype dtype)
{
    if ((int)dtype < 0 || dtype >= HX_SAFETENSORS_DTYPE_COUNT)
        return "?";
    return dtype_info[dtype].name;
}

size_t hx_safetensors_dtype_bytes(hx_safetensors_dtype dtype)
{
    if ((int)dtype < 0 || dtype >= HX_SAFETENSORS_DTYPE_COUNT)
        return 0;
    return dtype_info[dtype].bytes;
}

hx_status hx_safetensors_dtype_parse(const char *name, hx_safetensors_dtype *out)
{
    for (int i = 0; i < HX_SAFETENSORS_DTYPE_COUNT; i++) {
        if (strcmp(name, dtype_info[i].name) == 0) {
            *out = (hx_safetensors_dtype)i;
            return HX_OK;
        }
    }
    return HX_EINVAL;
}

/* ---- element conversions ------------------------------------------------------ */

static float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float hx_safetensors_bf16_to_f32(uint16_t h)
{
    return bits_to_f32((uint32_t)h << 16);
}

float hx_safetensors_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                exp--;
            }
            mant &= 0x3ffu;
            bits = sign | ((exp + 112u) << 23) | (mant << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    return bits_to_f32(bits);
}

uint16_t hx_safetensors_f32_to_bf16(float f)
{
    uint32_t x = f32_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

uint16_t hx_safetensors_f32_to_f16(float f)
{
    uint32_t x = f32_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) { /* inf, NaN */
        if (absx == 0x7f800000u)
            return (uint16_t)(sign | 0x7c00u);
        return (uint16_t)(sign | 0x7e00u | ((absx >> 13) & 0x3ffu));
    }
    if (absx >= 0x477ff000u) /* >= 65520 rounds to infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (absx < 0x38800000u) { /* below 2^-14: subnormal or zero */
        if (absx < 0x33000000u) /* below 2^-25 */
            return (uint16_t)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24 */
        uint32_t q = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = (((absx >> 23) - 112u) << 10) | ((absx & 0x7fffffu) >> 13);
    uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u)))
        q++;
    return (uint16_t)(sign | q);
}

/* ---- one file ------------------------------------------------------------------ */

struct hx_safetensors {
    char *path;                     /* owned */
    void *map;                      /* owned mapping of map_bytes */
    size_t map_bytes;
    json_t *header;                 /* owned; tensor names and metadata borrow from it */
    const json_t *metadata;         /* borrowed from header, or NULL */
    size_t count;
    hx_safetensors_tensor *tensors; /* owned, [count], header order */
    const hx_safetensors_tensor **by_name; /* owned, [count], into tensors, sorted by name */
};

static int cmp_by_name(const void *a, const void *b)
{
    return strcmp((*(const hx_safetensors_tensor *const *)a)->name,
                  (*(const hx_safetensors_tensor *const *)b)->name);
}

static int cmp_by_offset(const void *a, const void *b)
{
    const hx_safetensors_tensor *x = *(const hx_safetensors_tensor *const *)a;
    const hx_safetensors_tensor *y = *(const hx_safetensors_tensor *const *)b;
    if (x->data_begin != y->data_begin)
        return x->data_begin < y->data_begin ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

/* Reads a non-negative JSON integer; 0 on success. */
static int json_uint(const json_t *v, uint64_t *out)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

/* Validates one tensor entry of the header into *t. */
static hx_status parse_tensor(const char *what, const char *path, const char *name,
                              const json_t *v, const unsigned char *data, uint64_t data_bytes,
                              hx_safetensors_tensor *t, hx_err *err)
{
#define BAD(...)                                                                             \
    do {                                                                                     \
        char why_[512];                                                                      \
        snprintf(why_, sizeof why_, __VA_ARGS__);                                            \
        return hx_err_set(err, HX_EPARSE, "%s '%s': tensor '%s': %s", what, path, name,      \
                          why_);                                                             \
    } while (0)

    memset(t, 0, sizeof *t);
    t->name = name;
    if (!json_is_object(v))
        BAD("not a JSON object");
    const json_t *jd = json_object_get(v, "dtype");
    if (!jd)
        BAD("dtype: missing");
    if (!json_is_string(jd))
        BAD("dtype: not a string");
    if (hx_safetensors_dtype_parse(json_string_value(jd), &t->dtype) != HX_OK)
        BAD("dtype: unknown type '%.64s' (expected F32, BF16, F16, F64, I64, I32, I16, I8, "
            "U64, U32, U16, U8, BOOL, F8_E4M3 or F8_E5M2)",
            json_string_value(jd));

    const json_t *js = json_object_get(v, "shape");
    if (!js)
        BAD("shape: missing");
    if (!json_is_array(js))
        BAD("shape: not an array");
    size_t nd = json_array_size(js);
    if (nd > HX_SAFETENSORS_MAX_DIMS)
        BAD("shape: %zu dimensions (at most %d supported)", nd, HX_SAFETENSORS_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t numel = 1;
    int overflow = 0;
    for (size_t i = 0; i < nd; i++) {
        uint64_t d;
        if (json_uint(json_array_get(js, i), &d) != 0)
            BAD("shape: dimension %zu is not a non-negative integer", i);
        t->shape[i] = (int64_t)d;
        if (__builtin_mul_overflow(numel, d, &numel))
            overflow = 1;
    }
    uint64_t nbytes = 0;
    if (overflow || numel > (uint64_t)INT64_MAX ||
        __builtin_mul_overflow(numel, (uint64_t)dtype_info[t->dtype].bytes, &nbytes))
        BAD("shape: element count overflows");

    const json_t *jo = json_object_get(v, "data_offsets");
    if (!jo)
        BAD("data_offsets: missing");
    uint64_t begin, end;
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        json_uint(json_array_get(jo, 0), &begin) != 0 ||
        json_uint(json_array_get(jo, 1), &end) != 0)
        BAD("data_offsets: not an array of two non-negative integers");
    if (begin > end)
        BAD("data_offsets [%llu, %llu]: begin after end", (unsigned long long)begin,
            (unsigned long long)end);
    if (end > data_bytes)
        BAD("data_offsets [%llu, %llu] outside the %llu bytes of data",
            (unsigned long long)begin, (unsigned long long)end,
            (unsigned long long)data_bytes);
    if (end - begin != nbytes) {
        char shape[256];
        size_t o = 0;
        shape[0] = '\0';
        for (int i = 0; i < t->ndim && o < sizeof shape; i++)
            o += (size_t)snprintf(shape + o, sizeof shape - o, "%s%lld", i ? ", " : "",
                                  (long long)t->shape[i]);
        BAD("data_offsets [%llu, %llu] hold %llu bytes but %s [%s] needs %llu",
            (unsigned long long)begin, (unsigned long long)end,
            (unsigned long long)(end - begin), dtype_info[t->dtype].name, shape,
            (unsigned long long)nbytes);
    }
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)nbytes;
    t->data_begin = begin;
    t->data = data + begin;
    return HX_OK;
#undef BAD
}

hx_status hx_safetensors_open(const char *path, const char *what, hx_safetensors **out,
                              hx_err *err)
{
    hx_status st = HX_OK;
    if (!what)
        what = "safetensors file";
    hx_safetensors *f = calloc(1, sizeof *f);
    if (!f)
        return hx_err_set(err, HX_ENOMEM, "cannot open %s '%s': out of memory", what, path);
    f->path = strdup(path);
    if (!f->path) {
        st = hx_err_set(err, HX_ENOMEM, "cannot open %s '%s': out of memory", what, path);
        goto out_free;
    }

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        st = hx_err_set(err, e == ENOENT ? HX_ENOENT : HX_EIO, "cannot open %s '%s': %s", what,
                        path, hx_errno_text(e));
        goto out_free;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = hx_err_set(err, HX_EIO, "cannot read %s '%s': %s", what, path, strerror(errno));
        close(fd);
        goto out_free;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = hx_err_set(err, HX_EINVAL, "cannot open %s '%s': not a regular file", what, path);
        close(fd);
        goto out_free;
    }
    uint64_t file_bytes = (uint64_t)sb.st_size;
    if (file_bytes < 8) {
        st = hx_err_set(err, HX_EPARSE,
                        "%s '%s': truncated: %llu bytes, too short for the 8-byte header "
                        "length",
                        what, path, (unsigned long long)file_bytes);
        close(fd);
        goto out_free;
    }
    if (file_bytes > (uint64_t)SIZE_MAX) {
        st = hx_err_set(err, HX_EIO, "cannot map %s '%s': too large", what, path);
        close(fd);
        goto out_free;
    }
    f->map = mmap(NULL, (size_t)file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        st = hx_err_set(err, HX_EIO, "cannot map %s '%s': %s", what, path, strerror(errno));
        goto out_free;
    }
    f->map_bytes = (size_t)file_bytes;

    const unsigned char *p = f->map;
    uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; i--)
        header_bytes = (header_bytes << 8) | p[i];
    if (header_bytes > HX_SAFETENSORS_MAX_HEADER_BYTES) {
        st = hx_err_set(err, HX_EPARSE,
                        "%s '%s': header length %llu is over the limit of %llu bytes", what,
                        path, (unsigned long long)header_bytes,
                        (unsigned long long)HX_SAFETENSORS_MAX_HEADER_BYTES);
        goto out_free;
    }
    if (header_bytes > file_bytes - 8) {
        st = hx_err_set(err, HX_EPARSE,
                        "%s '%s': truncated: header length %llu runs past the end of the file "
                        "(%llu bytes)",
                        what, path, (unsigned long long)header_bytes,
                        (unsigned long long)file_bytes);
        goto out_free;
    }
    const unsigned char *data = p + 8 + header_bytes;
    uint64_t data_bytes = file_bytes - 8 - header_bytes;

    json_error_t jerr;
    f->header = json_loadb((const char *)p + 8, (size_t)header_bytes, JSON_REJECT_DUPLICATES,
                           &jerr);
    if (!f->header) {
        if (json_error_code(&jerr) == json_error_duplicate_key)
            st = hx_err_set(err, HX_EPARSE, "%s '%s': header: duplicate tensor name (%s)", what,
                            path, jerr.text);
        else
            st = hx_err_set(err, HX_EPARSE, "%s '%s': header is not valid JSON: %s at byte %d",
                            what, path, jerr.text, jerr.position);
        goto out_free;
    }
    if (!json_is_object(f->header)) {
        st = hx_err_set(err, HX_EPARSE, "%s '%s': header is not a JSON object", what, path);
        goto out_free;
    }

    size_t n = json_object_size(f->header);
    f->tensors = calloc(n ? n : 1, sizeof *f->tensors);
    f->by_name = calloc(n ? n : 1, sizeof *f->by_name);
    if (!f->tensors || !f->by_name) {
        st = hx_err_set(err, HX_ENOMEM, "cannot open %s '%s': out of memory", what, path);
        goto out_free;
    }
    const char *key;
    json_t *v;
    json_object_foreach(f->header, key, v) {
        if (strcmp(key, "__metadata__") == 0) {
            if (!json_is_object(v)) {
                st = hx_err_set(err, HX_EPARSE, "%s '%s': __metadata__ is not a JSON object",
                                what, path);
                goto out_free;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(v, mk, mv) {
                if (!json_is_string(mv)) {
                    st = hx_err_set(err, HX_EPARSE,
                                    "%s '%s': __metadata__: '%s' is not a string", what, path,
                                    mk);
                    goto out_free;
                }
            }
            f->metadata = v;
            continue;
        }
        st = parse_tensor(what, path, key, v, data, data_bytes, &f->tensors[f->count], err);
        if (st != HX_OK)
            goto out_free;
        f->by_name[f->count] = &f->tensors[f->count];
        f->count++;
    }

    /* No two tensors share a byte (empty tensors take none). */
    qsort(f->by_name, f->count, sizeof *f->by_name, cmp_by_offset);
    const hx_safetensors_tensor *prev = NULL;
    for (size_t i = 0; i < f->count; i++) {
        const hx_safetensors_tensor *t = f->by_name[i];
        if (t->nbytes == 0)
            continue;
        if (prev && t->data_begin < prev->data_begin + prev->nbytes) {
            st = hx_err_set(err, HX_EPARSE,
                            "%s '%s': tensor '%s': data_offsets [%llu, %llu] overlap those of "
                            "tensor '%s' [%llu, %llu]",
                            what, path, t->name, (unsigned long long)t->data_begin,
                            (unsigned long long)(t->data_begin + t->nbytes), prev->name,
                            (unsigned long long)prev->data_begin,
                            (unsigned long long)(prev->data_begin + prev->nbytes));
            goto out_free;
        }
        prev = t;
    }
    qsort(f->by_name, f->count, sizeof *f->by_name, cmp_by_name);

    *out = f;
    return HX_OK;
out_free:
    hx_safetensors_free(f);
    return st;
}

void hx_safetensors_free(hx_safetensors *f)
{
    if (!f)
        return;
    if (f->map)
        munmap(f->map, f->map_bytes);
    json_decref(f->header);
    free(f->tensors);
    free(f->by_name);
    free(f->path);
    free(f);
}

const char *hx_safetensors_path(const hx_safetensors *f)
{
    return f->path;
}

size_t hx_safetensors_count(const hx_safetensors *f)
{
    return f->count;
}

const hx_safetensors_tensor *hx_safetensors_at(const hx_safetensors *f, size_t i)
{
    return i < f->count ? &f->tensors[i] : NULL;
}

const hx_safetensors_tensor *hx_safetensors_find(const hx_safetensors *f, const char *name)
{
    size_t lo = 0, hi = f->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const hx_safetensors_tensor *t = f->by_name[mid];
        int c = strcmp(name, t->name);
        if (c == 0)
            return t;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const char *hx_safetensors_metadata(const hx_safetensors *f, const char *key)
{
    if (!f->metadata)
        return NULL;
    const json_t *v = json_object_get(f->metadata, key);
    return v ? json_string_value(v) : NULL;
}

/* ---- a set of files --------------------------------------------------------------- */

typedef struct shard {
    char *file;          /* owned: name relative to dir */
    char *path;          /* owned: dir/file */
    hx_safetensors *st;  /* owned, NULL until opened */
} shard;

typedef struct name_entry {
    const char *name; /* borrowed from the index JSON or the single file */
    size_t shard;
} name_entry;

struct hx_safetensors_index {
    char *path;       /* owned: what it was opened from */
    json_t *index;    /* owned: the index JSON, NULL for a single file */
    size_t n_shards;
    shard *shards;    /* owned, [n_shards] */
    size_t n_names;
    name_entry *names; /* owned, [n_names], sorted by name */
};

static int cmp_name_entry(const void *a, const void *b)
{
    return strcmp(((const name_entry *)a)->name, ((const name_entry *)b)->name);
}

static char *join_path(const char *dir, const char *file)
{
    size_t n = strlen(dir) + strlen(file) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, file);
    return p;
}

static hx_status open_single(hx_safetensors_index *ix, const char *file_path, hx_err *err)
{
    ix->shards = calloc(1, sizeof *ix->shards);
    if (!ix->shards)
        return hx_err_set(err, HX_ENOMEM, "cannot open model '%s': out of memory", ix->path);
    ix->n_shards = 1;
    const char *slash = strrchr(file_path, '/');
    ix->shards[0].file = strdup(slash ? slash + 1 : file_path);
    ix->shards[0].path = strdup(file_path);
    if (!ix->shards[0].file || !ix->shards[0].path)
        return hx_err_set(err, HX_ENOMEM, "cannot open model '%s': out of memory", ix->path);
    hx_status st = hx_safetensors_open(file_path, "model file", &ix->shards[0].st, err);
    if (st != HX_OK)
        return st;
    const hx_safetensors *f = ix->shards[0].st;
    ix->n_names = hx_safetensors_count(f);
    ix->names = calloc(ix->n_names ? ix->n_names : 1, sizeof *ix->names);
    if (!ix->names)
        return hx_err_set(err, HX_ENOMEM, "cannot open model '%s': out of memory", ix->path);
    for (size_t i = 0; i < ix->n_names; i++)
        ix->names[i] = (name_entry){hx_safetensors_at(f, i)->name, 0};
    qsort(ix->names, ix->n_names, sizeof *ix->names, cmp_name_entry);
    return HX_OK;
}

static int valid_shard_name(const char *s)
{
    return s[0] != '\0' && strchr(s, '/') == NULL && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static hx_status open_index(hx_safetensors_index *ix, const char *index_path, hx_err *err)
{
    const char *what = "model index";
    char *text = NULL;
    size_t len = 0;
    hx_status st = hx_file_read_all(index_path, what, HX_SAFETENSORS_MAX_INDEX_BYTES, &text,
                                    &len, err);
    if (st != HX_OK)
        return st;
    json_error_t jerr;
    ix->index = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!ix->index)
        return hx_err_set(err, HX_EPARSE, "%s '%s':%d:%d: %s", what, index_path, jerr.line,
                          jerr.column, jerr.text);
    if (!json_is_object(ix->index))
        return hx_err_set(err, HX_EPARSE, "%s '%s': not a JSON object", what, index_path);
    const json_t *map = json_object_get(ix->index, "weight_map");
    if (!map)
        return hx_err_set(err, HX_EPARSE, "%s '%s': weight_map: missing", what, index_path);
    if (!json_is_object(map))
        return hx_err_set(err, HX_EPARSE, "%s '%s': weight_map: not a JSON object", what,
                          index_path);

    /* The directory the shards live in. */
    char *dir = strdup(index_path);
    if (!dir)
        return hx_err_set(err, HX_ENOMEM, "cannot open %s '%s': out of memory", what,
                          index_path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        strcpy(dir, ".");

    size_t n = json_object_size(map);
    ix->names = calloc(n ? n : 1, sizeof *ix->names);
    ix->shards = calloc(n ? n : 1, sizeof *ix->shards);
    if (!ix->names || !ix->shards) {
        st = hx_err_set(err, HX_ENOMEM, "cannot open %s '%s': out of memory", what, index_path);
        goto out_dir;
    }
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)map, key, v) {
        if (!json_is_string(v)) {
            st = hx_err_set(err, HX_EPARSE, "%s '%s': weight_map: '%s': not a string", what,
                            index_path, key);
            goto out_dir;
        }
        const char *file = json_string_value(v);
        if (!valid_shard_name(file)) {
            st = hx_err_set(err, HX_EPARSE,
                            "%s '%s': weight_map: '%s': shard '%s' is not a file name in the "
                            "index's directory",
                            what, index_path, key, file);
            goto out_dir;
        }
        size_t s = 0;
        while (s < ix->n_shards && strcmp(ix->shards[s].file, file) != 0)
            s++;
        if (s == ix->n_shards) {
            ix->shards[s].file = strdup(file);
            ix->shards[s].path = join_path(dir, file);
            ix->n_shards++;
            if (!ix->shards[s].file || !ix->shards[s].path) {
                st = hx_err_set(err, HX_ENOMEM, "cannot open %s '%s': out of memory", what,
                                index_path);
                goto out_dir;
            }
        }
        ix->names[ix->n_names++] = (name_entry){key, s};
    }
    qsort(ix->names, ix->n_names, sizeof *ix->names, cmp_name_entry);
out_dir:
    free(dir);
    return st;
}

hx_status hx_safetensors_index_open(const char *path, hx_safetensors_index **out, hx_err *err)
{
    hx_status st = HX_OK;
    char *candidate = NULL;
    hx_safetensors_index *ix = calloc(1, sizeof *ix);
    if (!ix)
        return hx_err_set(err, HX_ENOMEM, "cannot open model '%s': out of memory", path);
    ix->path = strdup(path);
    if (!ix->path) {
        st = hx_err_set(err, HX_ENOMEM, "cannot open model '%s': out of memory", path);
        goto out_free;
    }
    if (hx_file_is_dir(path)) {
        candidate = join_path(path, "model.safetensors.index.json");
        if (!candidate) {
            st = hx_err_set(err, HX_ENOMEM, "cannot open model '%s': out of memory", path);
            goto out_free;
        }
        if (hx_file_is_regular(candidate)) {
            st = open_index(ix, candidate, err);
        } else {
            free(candidate);
            candidate = join_path(path, "model.safetensors");
            if (!candidate) {
                st = hx_err_set(err, HX_ENOMEM, "cannot open model '%s': out of memory", path);
                goto out_free;
            }
            if (!hx_file_is_regular(candidate)) {
                st = hx_err_set(err, HX_ENOENT,
                                "model '%s': no model.safetensors or "
                                "model.safetensors.index.json in the directory",
                                path);
                goto out_free;
            }
            st = open_single(ix, candidate, err);
        }
    } else {
        size_t n = strlen(path);
        if (n >= 5 && strcmp(path + n - 5, ".json") == 0)
            st = open_index(ix, path, err);
        else
            st = open_single(ix, path, err);
    }
    if (st != HX_OK)
        goto out_free;
    free(candidate);
    *out = ix;
    return HX_OK;
out_free:
    free(candidate);
    hx_safetensors_index_free(ix);
    return st;
}

void hx_safetensors_index_free(hx_safetensors_index *ix)
{
    if (!ix)
        return;
    for (size_t i = 0; i < ix->n_shards; i++) {
        hx_safetensors_free(ix->shards[i].st);
        free(ix->shards[i].file);
        free(ix->shards[i].path);
    }
    free(ix->shards);
    free(ix->names);
    json_decref(ix->index);
    free(ix->path);
    free(ix);
}

size_t hx_safetensors_index_count(const hx_safetensors_index *ix)
{
    return ix->n_names;
}

const char *hx_safetensors_index_name(const hx_safetensors_index *ix, size_t i)
{
    return i < ix->n_names ? ix->names[i].name : NULL;
}

const char *hx_safetensors_index_path(const hx_safetensors_index *ix)
{
    return ix->path;
}

static hx_status open_shard(hx_safetensors_index *ix, size_t s, hx_err *err)
{
    if (ix->shards[s].st)
        return HX_OK;
    hx_status st = hx_safetensors_open(ix->shards[s].path, "model file", &ix->shards[s].st, err);
    if (st == HX_ENOENT)
        hx_err_set(err, HX_ENOENT, "model '%s': shard '%s' named by the index is missing",
                   ix->path, ix->shards[s].path);
    return st;
}

hx_status hx_safetensors_index_find(hx_safetensors_index *ix, const char *name,
                                    hx_safetensors_tensor *out, hx_err *err)
{
    name_entry key = {name, 0};
    const name_entry *e =
        bsearch(&key, ix->names, ix->n_names, sizeof *ix->names, cmp_name_entry);
    if (!e)
        return hx_err_set(err, HX_ENOENT, "model '%s': no tensor '%s'", ix->path, name);
    hx_status st = open_shard(ix, e->shard, err);
    if (st != HX_OK)
        return st;
    const hx_safetensors_tensor *t = hx_safetensors_find(ix->shards[e->shard].st, name);
    if (!t)
        return hx_err_set(err, HX_EPARSE,
                          "model '%s': the index puts tensor '%s' in '%s', which does not "
                          "hold it",
                          ix->path, name, ix->shards[e->shard].file);
    *out = *t;
    return HX_OK;
}

hx_status hx_safetensors_index_open_all(hx_safetensors_index *ix, hx_err *err)
{
    for (size_t s = 0; s < ix->n_shards; s++) {
        hx_status st = open_shard(ix, s, err);
        if (st != HX_OK)
            return st;
    }
    return HX_OK;
}

/* ---- conversion --------------------------------------------------------------------- */

hx_status hx_safetensors_to_f32(const hx_safetensors_tensor *t, int64_t first, int64_t count,
                                float *out, hx_err *err)
{
    if (first < 0 || count < 0 || first > t->numel || count > t->numel - first)
        return hx_err_set(err, HX_ERANGE,
                          "tensor '%s': elements [%lld, %lld) outside its %lld elements",
                          t->name, (long long)first, (long long)(first + count),
                          (long long)t->numel);
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case HX_SAFETENSORS_F32:
        memcpy(out, p + (size_t)first * 4, (size_t)count * 4);
        return HX_OK;
    case HX_SAFETENSORS_BF16:
        p += (size_t)first * 2;
        for (int64_t i = 0; i < count; i++) {
            uint16_t h = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
            out[i] = hx_safetensors_bf16_to_f32(h);
        }
        return HX_OK;
    case HX_SAFETENSORS_F16:
        p += (size_t)first * 2;
        for (int64_t i = 0; i < count; i++) {
            uint16_t h = (uint16_t)(p[2 * i] | (p[2 * i + 1] << 8));
            out[i] = hx_safetensors_f16_to_f32(h);
        }
        return HX_OK;
    default:
        return hx_err_set(err, HX_ENOTSUP, "tensor '%s': cannot convert %s to fp32 (only F32, "
                          "BF16 and F16)",
                          t->name, hx_safetensors_dtype_name(t->dtype));
    }
}

hx_status hx_safetensors_rows_to_f32(const hx_safetensors_tensor *t, int64_t first_row,
                                     int64_t n_rows, float *out, hx_err *err)
{
    int64_t row = 1;
    for (int i = 1; i < t->ndim; i++)
        row *= t->shape[i];
    int64_t rows = t->ndim == 0 ? 1 : t->shape[0];
    if (first_row < 0 || n_rows < 0 || first_row > rows || n_rows > rows - first_row)
        return hx_err_set(err, HX_ERANGE, "tensor '%s': rows [%lld, %lld) outside its %lld rows",
                          t->name, (long long)first_row, (long long)(first_row + n_rows),
                          (long long)rows);
    return hx_safetensors_to_f32(t, first_row * row, n_rows * row, out, err);
}

/* ---- writing ------------------------------------------------------------------------- */

static hx_status write_all(int fd, const void *data, size_t len, const char *path, hx_err *err)
{
    const char *p = data;
    while (len > 0) {
        ssize_t k = write(fd, p, len);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, strerror(errno));
        }
        p += k;
        len -= (size_t)k;
    }
    return HX_OK;
}

/* Builds the padded header text; *out owned by the caller. */
static hx_status build_header(const char *path, const hx_safetensors_entry *tensors, size_t n,
                              const char *const *metadata, size_t n_metadata,
                              uint64_t *sizes, char **out, size_t *out_len, hx_err *err)
{
    hx_status st = HX_OK;
    char *text = NULL;
    json_t *root = json_object();
    if (!root)
        return hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
    if (n_metadata > 0) {
        json_t *meta = json_object();
        if (!meta || json_object_set_new(root, "__metadata__", meta) != 0)
            goto out_nomem;
        for (size_t i = 0; i < n_metadata; i++)
            if (json_object_set_new(meta, metadata[2 * i], json_string(metadata[2 * i + 1])) !=
                0)
                goto out_nomem;
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < n; i++) {
        const hx_safetensors_entry *e = &tensors[i];
        if (!e->name || !e->name[0] || strcmp(e->name, "__metadata__") == 0) {
            st = hx_err_set(err, HX_EINVAL, "cannot write '%s': tensor %zu: bad name", path, i);
            goto out;
        }
        if (json_object_get(root, e->name)) {
            st = hx_err_set(err, HX_EINVAL, "cannot write '%s': tensor '%s': duplicate name",
                            path, e->name);
            goto out;
        }
        size_t esize = hx_safetensors_dtype_bytes(e->dtype);
        if (esize == 0 || e->ndim < 0 || e->ndim > HX_SAFETENSORS_MAX_DIMS) {
            st = hx_err_set(err, HX_EINVAL, "cannot write '%s': tensor '%s': bad dtype or rank",
                            path, e->name);
            goto out;
        }
        uint64_t bytes = esize;
        json_t *shape = json_array();
        json_t *obj = json_object();
        if (!shape || !obj || json_object_set_new(root, e->name, obj) != 0) {
            json_decref(shape);
            goto out_nomem;
        }
        if (json_object_set_new(obj, "dtype", json_string(hx_safetensors_dtype_name(e->dtype))))
            goto out_shape;
        for (int d = 0; d < e->ndim; d++) {
            if (e->shape[d] < 0 ||
                __builtin_mul_overflow(bytes, (uint64_t)e->shape[d], &bytes)) {
                json_decref(shape);
                st = hx_err_set(err, HX_EINVAL, "cannot write '%s': tensor '%s': bad shape",
                                path, e->name);
                goto out;
            }
            if (json_array_append_new(shape, json_integer(e->shape[d])) != 0)
                goto out_shape;
        }
        if (json_object_set_new(obj, "shape", shape) != 0)
            goto out_nomem; /* set_new took shape */
        if (bytes > 0 && !e->data) {
            st = hx_err_set(err, HX_EINVAL, "cannot write '%s': tensor '%s': no data", path,
                            e->name);
            goto out;
        }
        json_t *offs = json_pack("[I,I]", (json_int_t)offset, (json_int_t)(offset + bytes));
        if (!offs || json_object_set_new(obj, "data_offsets", offs) != 0)
            goto out_nomem;
        sizes[i] = bytes;
        offset += bytes;
        continue;
    out_shape:
        json_decref(shape);
        goto out_nomem;
    }
    text = json_dumps(root, JSON_COMPACT);
    if (!text)
        goto out_nomem;
    size_t len = strlen(text);
    size_t padded = (len + 7) & ~(size_t)7;
    char *buf = malloc(padded ? padded : 8);
    if (!buf)
        goto out_nomem;
    memcpy(buf, text, len);
    memset(buf + len, ' ', padded - len);
    *out = buf;
    *out_len = padded;
    goto out;
out_nomem:
    st = hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
out:
    free(text);
    json_decref(root);
    return st;
}

hx_status hx_safetensors_write(const char *path, const hx_safetensors_entry *tensors, size_t n,
                               const char *const *metadata, size_t n_metadata, hx_err *err)
{
    hx_status st = HX_OK;
    char *header = NULL, *tmp = NULL;
    size_t header_len = 0;
    int fd = -1;
    uint64_t *sizes = calloc(n ? n : 1, sizeof *sizes);
    if (!sizes)
        return hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
    st = build_header(path, tensors, n, metadata, n_metadata, sizes, &header, &header_len, err);
    if (st != HX_OK)
        goto out;

    size_t plen = strlen(path) + 16;
    tmp = malloc(plen);
    if (!tmp) {
        st = hx_err_set(err, HX_ENOMEM, "cannot write '%s': out of memory", path);
        goto out;
    }
    snprintf(tmp, plen, "%s.tmp.XXXXXX", path);
    fd = mkstemp(tmp);
    if (fd < 0) {
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, hx_errno_text(errno));
        free(tmp);
        tmp = NULL;
        goto out;
    }
    (void)fchmod(fd, 0644);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (unsigned char)((uint64_t)header_len >> (8 * i));
    if ((st = write_all(fd, len8, 8, path, err)) != HX_OK ||
        (st = write_all(fd, header, header_len, path, err)) != HX_OK)
        goto out_unlink;
    for (size_t i = 0; i < n; i++)
        if (sizes[i] > 0 &&
            (st = write_all(fd, tensors[i].data, (size_t)sizes[i], path, err)) != HX_OK)
            goto out_unlink;
    if (fsync(fd) != 0 && errno != EINVAL) {
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, strerror(errno));
        goto out_unlink;
    }
    int rc = close(fd);
    fd = -1;
    if (rc != 0) {
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, strerror(errno));
        goto out_unlink;
    }
    if (rename(tmp, path) != 0) {
        st = hx_err_set(err, HX_EIO, "cannot write '%s': %s", path, hx_errno_text(errno));
        goto out_unlink;
    }
    goto out;
out_unlink:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
out:
    free(tmp);
    free(header);
    free(sizes);
    return st;
}
