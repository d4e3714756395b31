/*
 * catalog.h - the built-in GPU catalog: public figures per device type.
 *
 * Each entry gives dense BF16 peak compute (no sparsity), HBM bandwidth,
 * memory and an indicative on-demand price, with the source of each figure
 * in a comment in catalog.c. An inventory's `gpu_types` add to or override
 * these (see inventory.h); the planner only ever sees hx_gpu_spec values.
 *
 * Names are matched case-insensitively, and a few common spellings are
 * accepted as aliases ("H100" -> H100-SXM, "A100" -> A100-80G, "RTX-4090").
 */
#ifndef HX_CATALOG_H
#define HX_CATALOG_H

#include <stddef.h>

#define HX_GPU_NAME_MAX 48

typedef struct hx_gpu_spec {
    char name[HX_GPU_NAME_MAX]; /* canonical name, e.g. "H100-SXM" */
    double memory_bytes;        /* device memory */
    double bf16_flops;          /* dense BF16 peak, FLOP/s (fp32 for `cpu`) */
    double hbm_bytes_per_s;     /* memory bandwidth, bytes/s */
    double usd_per_hour;        /* indicative on-demand price per device */
    int is_cpu;                 /* 1 for the `cpu` pseudo-device */
} hx_gpu_spec;

/* Number of built-in entries, and entry i (0 <= i < count). */
size_t hx_catalog_count(void);
const hx_gpu_spec *hx_catalog_at(size_t i);

/* The entry named `name` (case-insensitive, aliases accepted), or NULL. */
const hx_gpu_spec *hx_catalog_find(const char *name);

/*
 * Writes into buf up to three close catalog names for a misspelt `name`
 * (edit distance, prefix and substring matches), as "H100-SXM, H100-PCIe";
 * buf is "" when nothing is close. Returns buf.
 */
const char *hx_catalog_suggest(const char *name, char *buf, size_t size);

/*
 * Suggests among caller-supplied names too (the inventory's own gpu_types):
 * `extra` is an array of `nextra` names checked along with the catalog.
 */
const char *hx_catalog_suggest_among(const char *name, const char *const *extra, size_t nextra,
                                     char *buf, size_t size);

/*
 * The catalog name for a device model string as drivers report it
 * ("NVIDIA H100 80GB HBM3" -> "H100-SXM", "NVIDIA L40S" -> "L40S",
 * "NVIDIA RTX A6000" -> "A6000"), or NULL when unknown. `memory_bytes`
 * (0 if unknown) disambiguates A100 40/80 GB.
 */
const char *hx_catalog_match_device_name(const char *device_name, double memory_bytes);

#endif /* HX_CATALOG_H */
