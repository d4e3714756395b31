/*
 * safetensors.h - reading and writing safetensors files, single or sharded.
 *
 * Format (https://github.com/huggingface/safetensors):
 *
 *   [8 bytes]  N, the header length, u64 little-endian
 *   [N bytes]  JSON object, UTF-8:
 *                {"NAME": {"dtype": "F32", "shape": [d0, d1, ...],
 *                          "data_offsets": [BEGIN, END]}, ...,
 *                 "__metadata__": {"key": "value", ...}}        (optional)
 *   [rest]     the data; BEGIN and END are byte offsets into it
 *
 * The reader maps the file read-only and trusts nothing in it. It checks:
 * the file holds the 8-byte length; N is at most HX_SAFETENSORS_MAX_HEADER_BYTES
 * and 8 + N is within the file; the header is valid JSON, an object, without
 * duplicate keys; every tensor has a known dtype string, a shape of at most
 * HX_SAFETENSORS_MAX_DIMS non-negative integers, and data_offsets of two
 * integers with BEGIN <= END <= the data's size; product(shape) x dtype size
 * == END - BEGIN (computed without overflow); the data ranges of the tensors
 * do not overlap; __metadata__, when present, maps strings to strings. Every
 * error names the file and, where there is one, the tensor:
 *
 *   model file 'x/model.safetensors': tensor 'model.norm.weight':
 *       data_offsets [0, 12] outside the 8 bytes of data
 *
 * Codes: HX_ENOENT (missing file), HX_EIO (read/map failure), HX_EPARSE
 * (anything malformed), HX_ENOMEM.
 *
 * A set of files (hx_safetensors_index) is what Hugging Face writes for a
 * large model: model.safetensors.index.json, whose "weight_map" maps each
 * tensor name to the shard file (relative to the index's directory) that
 * holds it. Shards are opened on first use. A single model.safetensors is a
 * set of one file.
 *
 * Thread safety: an open hx_safetensors is immutable and may be read from
 * any thread. hx_safetensors_index_find opens shards lazily and is not
 * thread-safe; call hx_safetensors_index_open_all first to make it so.
 */
#ifndef HX_SAFETENSORS_H
#define HX_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

/* Header length limit; the reference implementation refuses more too. */
#define HX_SAFETENSORS_MAX_HEADER_BYTES ((uint64_t)100000000)
#define HX_SAFETENSORS_MAX_DIMS 8
/* Index file (model.safetensors.index.json) size limit. */
#define HX_SAFETENSORS_MAX_INDEX_BYTES ((size_t)64 << 20)

/*
 * The element types of the format. Every one can be read and listed; only
 * F32, BF16 and F16 convert to fp32 (hx_safetensors_to_f32).
 */
typedef enum hx_safetensors_dtype {
    HX_SAFETENSORS_F32 = 0,
    HX_SAFETENSORS_BF16,
    HX_SAFETENSORS_F16,
    HX_SAFETENSORS_F64,
    HX_SAFETENSORS_I64,
    HX_SAFETENSORS_I32,
    HX_SAFETENSORS_I16,
    HX_SAFETENSORS_I8,
    HX_SAFETENSORS_U64,
    HX_SAFETENSORS_U32,
    HX_SAFETENSORS_U16,
    HX_SAFETENSORS_U8,
    HX_SAFETENSORS_BOOL,
    HX_SAFETENSORS_F8_E4M3,
    HX_SAFETENSORS_F8_E5M2,
    HX_SAFETENSORS_DTYPE_COUNT
} hx_safetensors_dtype;

/* "F32", "BF16", ... (static strings; "?" for a value out of range). */
const char *hx_safetensors_dtype_name(hx_safetensors_dtype dtype);
/* Bytes per element: 4, 2, 2, 8, ...; 0 for a value out of range. */
size_t hx_safetensors_dtype_bytes(hx_safetensors_dtype dtype);
/* Parses the exact (case-sensitive) name the format uses; HX_EINVAL otherwise. */
hx_status hx_safetensors_dtype_parse(const char *name, hx_safetensors_dtype *out);

/*
 * One tensor of an open file. Plain value; every pointer in it is borrowed
 * from the hx_safetensors that produced it and stays valid until that file
 * is freed. `data` points into the read-only mapping and is NOT necessarily
 * aligned to the element size: read it with memcpy or the converters below.
 */
typedef struct hx_safetensors_tensor {
    const char *name;
    hx_safetensors_dtype dtype;
    int ndim;                               /* 0 for a scalar */
    int64_t shape[HX_SAFETENSORS_MAX_DIMS]; /* shape[0..ndim-1] */
    int64_t numel;                          /* product of the shape (1 for a scalar) */
    size_t nbytes;                          /* numel * dtype bytes */
    uint64_t data_begin;                    /* offset of the data within the data section */
    const void *data;                       /* nbytes of raw little-endian elements */
} hx_safetensors_tensor;

/* ---- one file -------------------------------------------------------------- */

typedef struct hx_safetensors hx_safetensors; /* opaque: one mapped file */

/*
 * Opens and validates `path` (borrowed). `what` (borrowed, may be NULL for
 * "safetensors file") names the file in messages ("model file"). On success
 * *out is a new object the caller frees with hx_safetensors_free.
 */
hx_status hx_safetensors_open(const char *path, const char *what, hx_safetensors **out,
                              hx_err *err);

/* Unmaps and frees; NULL is a no-op. Every tensor pointer from it dies. */
void hx_safetensors_free(hx_safetensors *f);

/* The path it was opened with (borrowed). */
const char *hx_safetensors_path(const hx_safetensors *f);

/* Number of tensors, and the i-th in header order (NULL when i is out of range). */
size_t hx_safetensors_count(const hx_safetensors *f);
const hx_safetensors_tensor *hx_safetensors_at(const hx_safetensors *f, size_t i);

/* The tensor called `name`, or NULL. Binary search: O(log n). */
const hx_safetensors_tensor *hx_safetensors_find(const hx_safetensors *f, const char *name);

/* The __metadata__ value for `key` (borrowed), or NULL. */
const char *hx_safetensors_metadata(const hx_safetensors *f, const char *key);

/* ---- a set of files (sharded or single) ------------------------------------- */

typedef struct hx_safetensors_index hx_safetensors_index; /* opaque */

/*
 * Opens the weights of a model. `path` (borrowed) is one of:
 *   - a directory holding model.safetensors.index.json (sharded), or else
 *     model.safetensors (single file);
 *   - the path of a *.index.json file;
 *   - the path of one .safetensors file.
 * An index is validated (JSON object with a "weight_map" object of string
 * values that name files inside the index's directory: no absolute paths, no
 * "..", no '/' at all) but its shards are only opened when first needed; a
 * single file is opened at once. *out is freed with hx_safetensors_index_free.
 */
hx_status hx_safetensors_index_open(const char *path, hx_safetensors_index **out,
                                    hx_err *err);

/* Frees the set and every shard opened; NULL is a no-op. */
void hx_safetensors_index_free(hx_safetensors_index *ix);

/* Number of tensor names, and the i-th (sorted by name; borrowed; NULL out of range). */
size_t hx_safetensors_index_count(const hx_safetensors_index *ix);
const char *hx_safetensors_index_name(const hx_safetensors_index *ix, size_t i);

/*
 * Finds `name` across the shards, opening its shard when needed, and copies
 * its description into *out (pointers borrowed from the set, valid until it
 * is freed). HX_ENOENT when no shard has it:
 *   model 'x': no tensor 'lm_head.weight' (in model.safetensors)
 * HX_EPARSE when the index names a shard that does not have it, or a shard
 * is malformed.
 */
hx_status hx_safetensors_index_find(hx_safetensors_index *ix, const char *name,
                                    hx_safetensors_tensor *out, hx_err *err);

/* Opens every shard now (validating them all). */
hx_status hx_safetensors_index_open_all(hx_safetensors_index *ix, hx_err *err);

/* The path the set was opened from (borrowed). */
const char *hx_safetensors_index_path(const hx_safetensors_index *ix);

/* ---- conversion ---------------------------------------------------------------- */

/*
 * Copies elements [first, first + count) of `t` (in row-major order) to
 * `out` (caller-owned, `count` floats) as fp32. F32 is copied, BF16 and F16
 * are widened exactly (subnormals, infinities and NaN included). HX_ENOTSUP
 * for other dtypes, HX_ERANGE when the range is outside the tensor.
 */
hx_status hx_safetensors_to_f32(const hx_safetensors_tensor *t, int64_t first, int64_t count,
                                float *out, hx_err *err);

/*
 * Copies rows [first_row, first_row + n_rows) of `t` to fp32, a row being
 * the product of the dimensions after the first (a 1-D tensor's rows are its
 * elements). `out` holds n_rows * row floats.
 */
hx_status hx_safetensors_rows_to_f32(const hx_safetensors_tensor *t, int64_t first_row,
                                     int64_t n_rows, float *out, hx_err *err);

/* Element conversions (exact widening; narrowing rounds to nearest even, NaN stays NaN). */
float hx_safetensors_bf16_to_f32(uint16_t h);
float hx_safetensors_f16_to_f32(uint16_t h);
uint16_t hx_safetensors_f32_to_bf16(float f);
uint16_t hx_safetensors_f32_to_f16(float f);

/* ---- writing ----------------------------------------------------------------------- */

/* One tensor to write. Plain value; `name` and `data` are borrowed. */
typedef struct hx_safetensors_entry {
    const char *name;
    hx_safetensors_dtype dtype;
    int ndim;
    int64_t shape[HX_SAFETENSORS_MAX_DIMS];
    const void *data; /* product(shape) * dtype bytes, little-endian */
} hx_safetensors_entry;

/*
 * Writes `n` tensors to `path` atomically (a temporary file beside it, fsync,
 * rename). Data is laid out in the given order, back to back; the header is
 * compact JSON padded with spaces to a multiple of 8 bytes so that the data
 * starts 8-byte aligned, as the reference implementation writes it.
 * `metadata` (borrowed, may be NULL) is n_metadata key/value pairs:
 * metadata[2i] the key, metadata[2i+1] the value. Names must be unique and
 * must not be "__metadata__" (HX_EINVAL).
 */
hx_status hx_safetensors_write(const char *path, const hx_safetensors_entry *tensors, size_t n,
                               const char *const *metadata, size_t n_metadata, hx_err *err);

#endif /* HX_SAFETENSORS_H */
