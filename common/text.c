#include "text.h"

#include <ctype.h>
#include <string.h>

size_t hx_text_edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > HX_TEXT_CMP_MAX)
        la = HX_TEXT_CMP_MAX;
    if (lb > HX_TEXT_CMP_MAX)
        lb = HX_TEXT_CMP_MAX;
    size_t row[HX_TEXT_CMP_MAX + 1];
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            int same = tolower((unsigned char)a[i - 1]) == tolower((unsigned char)b[j - 1]);
            size_t best = diag + (same ? 0 : 1);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

const char *hx_text_closest(const char *s, const char *const *names, size_t n,
                            size_t max_distance)
{
    const char *best = NULL;
    size_t bestd = max_distance + 1;
    for (size_t i = 0; i < n && s; i++) {
        if (!names[i])
            continue;
        size_t d = hx_text_edit_distance(s, names[i]);
        if (d < bestd) {
            bestd = d;
            best = names[i];
        }
    }
    return best;
}
