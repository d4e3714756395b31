/*
 * file.h - whole-file reads and atomic writes.
 *
 * hx_file_write_atomic writes to a temporary file beside the target and
 * renames it into place, so a reader never sees a half-written file and a
 * failed write leaves the old file (or nothing) behind.
 */
#ifndef HX_FILE_H
#define HX_FILE_H

#include <stddef.h>

#include "status.h"

/*
 * Reads the whole of `path` into a NUL-terminated buffer the caller frees.
 * `what` names the file for messages ("inventory" -> "cannot open inventory
 * 'x.yaml': no such file"). Refuses files over `max_bytes`.
 */
hx_status hx_file_read_all(const char *path, const char *what, size_t max_bytes, char **out,
                           size_t *out_len, hx_err *err);

/* Writes `len` bytes of `data` to `path` atomically (temp file + fsync + rename). */
hx_status hx_file_write_atomic(const char *path, const void *data, size_t len, hx_err *err);

/*
 * Checks that `data` is text: no NUL bytes and valid UTF-8. On failure
 * returns the 1-based line and column of the first bad byte and its offset.
 */
int hx_file_is_text(const char *data, size_t len, int *bad_line, int *bad_col,
                    size_t *bad_offset);

/* Whether `path` names an existing directory / regular file. */
int hx_file_is_dir(const char *path);
int hx_file_is_regular(const char *path);

#endif /* HX_FILE_H */
