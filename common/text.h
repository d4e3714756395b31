/*
 * text.h - small string helpers shared by the readers: "did you mean" suggestions.
 */
#ifndef HX_TEXT_H
#define HX_TEXT_H

#include <stddef.h>

/*
 * Case-insensitive Levenshtein distance between a and b, comparing at most
 * HX_TEXT_CMP_MAX characters of each (longer strings compare on their start).
 */
#define HX_TEXT_CMP_MAX 128
size_t hx_text_edit_distance(const char *a, const char *b);

/*
 * The entry of names[0..n) closest to s within `max_distance` edits (NULL
 * entries are skipped; ties go to the first), or NULL. Borrowed pointers.
 */
const char *hx_text_closest(const char *s, const char *const *names, size_t n,
                            size_t max_distance);

#endif /* HX_TEXT_H */
