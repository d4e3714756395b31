/*
 * catalog.c - the built-in GPU catalog (see catalog.h for the contract).
 *
 * Conventions for the figures below:
 *
 *   - bf16_flops is the dense peak (no 2:4 structured sparsity) of the
 *     BF16 tensor/matrix units, as printed in the vendor datasheet; where a
 *     datasheet only prints the sparse figure, the dense one is half of it.
 *     Devices without BF16 (V100, T4) carry their FP16 tensor-core figure.
 *     GeForce cards carry the "FP32 accumulate" figure, which is what
 *     inference kernels use (the FP16-accumulate figure is twice as high).
 *   - memory_bytes is the vendor's capacity figure read as GiB (2^30), which
 *     is what the drivers report to within about 1% (an H100 80GB reports
 *     81559 MiB = 79.6 GiB, an A100 80GB 81920 MiB, an H200 143771 MiB =
 *     140.4 GiB). Reading "141GB" as 141e9 bytes would understate an H200
 *     by 9 GiB; the planner keeps its own headroom anyway.
 *   - hbm_bytes_per_s is decimal (1 TB/s = 1e12 bytes/s), as vendors state it.
 *   - usd_per_hour is INDICATIVE only: a typical on-demand list price per
 *     device at GPU clouds (2024-2025; Lambda, RunPod, CoreWeave class
 *     providers). Hyperscaler prices are often 2-4x higher and reserved or
 *     spot prices much lower; put real prices in the inventory's gpu_types.
 */
#define _POSIX_C_SOURCE 200809L

#include "catalog.h"

#include "common/text.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define GiB (1024.0 * 1024.0 * 1024.0)

static const hx_gpu_spec catalog[] = {
    /* NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): 80GB HBM3, 3.35 TB/s,
     * BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989 dense. */
    {"H100-SXM", 80 * GiB, 989e12, 3.35e12, 2.99, 0},
    /* NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe, 2022 edition): 80GB
     * HBM2e, 2.0 TB/s, BF16 1,513 TFLOPS with sparsity -> 756 dense. */
    {"H100-PCIe", 80 * GiB, 756e12, 2.0e12, 2.49, 0},
    /* NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): 141GB HBM3e, 4.8 TB/s,
     * BF16 1,979 TFLOPS with sparsity -> 989 dense (same GH100 die as H100). */
    {"H200", 141 * GiB, 989e12, 4.8e12, 3.79, 0},
    /* NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): HBM2e 2,039 GB/s,
     * BF16 Tensor Core 312 TFLOPS dense (624 with sparsity). */
    {"A100-80G", 80 * GiB, 312e12, 2.039e12, 1.79, 0},
    /* NVIDIA A100 Tensor Core GPU datasheet (A100 40GB SXM): HBM2 1,555 GB/s,
     * BF16 312 TFLOPS dense. */
    {"A100-40G", 40 * GiB, 312e12, 1.555e12, 1.29, 0},
    /* NVIDIA L40S datasheet: 48GB GDDR6, 864 GB/s, BF16 Tensor Core 733 TFLOPS
     * with sparsity -> 362 dense. */
    {"L40S", 48 * GiB, 362e12, 864e9, 0.99, 0},
    /* NVIDIA L40 datasheet: 48GB GDDR6, 864 GB/s, BF16 Tensor Core 181 TFLOPS
     * dense (362 with sparsity). */
    {"L40", 48 * GiB, 181e12, 864e9, 0.89, 0},
    /* NVIDIA RTX A6000 datasheet: 48GB GDDR6, 768 GB/s, Tensor performance
     * 309.7 TFLOPS with sparsity -> 154.8 dense (BF16 = FP16 rate on GA102). */
    {"A6000", 48 * GiB, 154.8e12, 768e9, 0.79, 0},
    /* NVIDIA A40 datasheet: 48GB GDDR6, 696 GB/s, BF16 Tensor Core 149.7 TFLOPS
     * dense (299.4 with sparsity). */
    {"A40", 48 * GiB, 149.7e12, 696e9, 0.69, 0},
    /* NVIDIA A10 datasheet: 24GB GDDR6, 600 GB/s, BF16 Tensor Core 125 TFLOPS
     * dense (250 with sparsity). */
    {"A10", 24 * GiB, 125e12, 600e9, 0.75, 0},
    /* NVIDIA L4 datasheet: 24GB GDDR6, 300 GB/s, BF16 Tensor Core 242.5 TFLOPS
     * with sparsity -> 121 dense. */
    {"L4", 24 * GiB, 121e12, 300e9, 0.59, 0},
    /* NVIDIA Ada GPU Architecture whitepaper (GeForce RTX 4090): 24GB GDDR6X,
     * 1,008 GB/s, peak BF16 Tensor TFLOPS with FP32 accumulate 165.2 dense. */
    {"RTX4090", 24 * GiB, 165.2e12, 1008e9, 0.69, 0},
    /* NVIDIA Ampere GA102 GPU Architecture whitepaper (GeForce RTX 3090): 24GB
     * GDDR6X, 936 GB/s, peak BF16 Tensor TFLOPS with FP32 accumulate 71 dense. */
    {"RTX3090", 24 * GiB, 71e12, 936e9, 0.44, 0},
    /* NVIDIA Tesla V100 datasheet (V100 SXM2 32GB): HBM2 900 GB/s, Tensor
     * performance 125 TFLOPS. Volta has NO BF16: this is the FP16 tensor-core
     * figure, which is what a V100 runs a BF16 model at after conversion. */
    {"V100", 32 * GiB, 125e12, 900e9, 0.55, 0},
    /* NVIDIA T4 datasheet: 16GB GDDR6, 320 GB/s, mixed-precision (FP16/FP32)
     * tensor 65 TFLOPS. Turing has NO BF16: FP16 tensor-core figure. */
    {"T4", 16 * GiB, 65e12, 320e9, 0.35, 0},
    /* AMD Instinct MI300X accelerator datasheet: 192GB HBM3, 5.3 TB/s peak,
     * peak BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity). */
    {"MI300X", 192 * GiB, 1307.4e12, 5.3e12, 2.49, 0},
    /* The `cpu` pseudo-device, so that the whole pipeline runs without a GPU.
     * PLACEHOLDER figures only (a mid-size server socket): the real figures of
     * a machine come from the inventory's gpu_types, which `hexflow discover`
     * writes with estimates for this machine. bf16_flops is fp32 here. */
    {"cpu", 64 * GiB, 1e12, 50e9, 0.50, 1},
};

#define CATALOG_COUNT (sizeof catalog / sizeof catalog[0])

/* Other spellings people and tools use, mapped to canonical names. */
static const struct alias {
    const char *alias;
    const char *name;
} aliases[] = {
    {"H100", "H100-SXM"},
    {"H100-SXM5", "H100-SXM"},
    {"H100-80G", "H100-SXM"},
    {"H100-SXM-80GB", "H100-SXM"},
    {"H100-SXM5-80GB", "H100-SXM"},
    {"H100-PCIe-80GB", "H100-PCIe"},
    {"H200-SXM", "H200"},
    {"H200-141G", "H200"},
    {"A100", "A100-80G"},
    {"A100-80GB", "A100-80G"},
    {"A100-SXM-80GB", "A100-80G"},
    {"A100-SXM4-80GB", "A100-80G"},
    {"A100-40GB", "A100-40G"},
    {"A100-SXM-40GB", "A100-40G"},
    {"A100-SXM4-40GB", "A100-40G"},
    {"RTX-A6000", "A6000"},
    {"RTXA6000", "A6000"},
    {"RTX-4090", "RTX4090"},
    {"GeForce-RTX-4090", "RTX4090"},
    {"4090", "RTX4090"},
    {"RTX-3090", "RTX3090"},
    {"GeForce-RTX-3090", "RTX3090"},
    {"3090", "RTX3090"},
    {"V100-32G", "V100"},
    {"V100-SXM2", "V100"},
    {"V100-SXM2-32GB", "V100"},
    {"Tesla-V100", "V100"},
    {"Tesla-T4", "T4"},
    {"Instinct-MI300X", "MI300X"},
    {"CPU", "cpu"},
};

#define ALIAS_COUNT (sizeof aliases / sizeof aliases[0])

size_t hx_catalog_count(void)
{
    return CATALOG_COUNT;
}

const hx_gpu_spec *hx_catalog_at(size_t i)
{
    return i < CATALOG_COUNT ? &catalog[i] : NULL;
}

static const hx_gpu_spec *find_canonical(const char *name)
{
    for (size_t i = 0; i < CATALOG_COUNT; i++)
        if (!strcasecmp(catalog[i].name, name))
            return &catalog[i];
    return NULL;
}

const hx_gpu_spec *hx_catalog_find(const char *name)
{
    if (!name)
        return NULL;
    const hx_gpu_spec *s = find_canonical(name);
    if (s)
        return s;
    for (size_t i = 0; i < ALIAS_COUNT; i++)
        if (!strcasecmp(aliases[i].alias, name))
            return find_canonical(aliases[i].name);
    return NULL;
}

/* ---- suggestions ------------------------------------------------------- */

#define NAME_CMP_MAX 64 /* longer names are compared on their first 64 chars */


/* Whether `needle` occurs in `hay`, ignoring case. */
static int contains_ci(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    if (n == 0)
        return 0;
    for (; *hay; hay++)
        if (!strncasecmp(hay, needle, n))
            return 1;
    return 0;
}

/*
 * Closeness of `query` to `candidate` as a score (lower is closer), or -1
 * when not close:
 *   - an edit distance d counts when d <= 3 and d <= half the longer name
 *     (so that "xyz" is not "close" to "cpu"); it scores 4*d;
 *   - one name containing the other (at least 2 characters) scores 6, which
 *     ranks between distances 1 and 2;
 *   - when one name is a prefix of the other, the score is one lower, so
 *     that "H10" suggests H100-SXM before A10.
 */
static int closeness(const char *query, const char *candidate)
{
    size_t lq = strlen(query), lc = strlen(candidate);
    size_t longer = lq > lc ? lq : lc, shorter = lq < lc ? lq : lc;
    int prefix = shorter >= 2 && !strncasecmp(query, candidate, shorter);
    size_t d = hx_text_edit_distance(query, candidate);
    int score = -1;
    if (d == 0)
        return 0;
    if (d <= 3 && d <= longer / 2)
        score = (int)(4 * d) - prefix;
    int partial = (lq >= 2 && lq <= lc && contains_ci(candidate, query)) ||
                  (lc >= 2 && lc < lq && contains_ci(query, candidate));
    if (partial && (score < 0 || score > 6 - prefix))
        score = 6 - prefix;
    return score;
}

#define MAX_SUGGESTIONS 3

typedef struct suggestion {
    const char *name; /* canonical name shown to the user */
    int score;
} suggestion;

/* Keeps the best MAX_SUGGESTIONS distinct names, first-come first on ties. */
static void offer(suggestion *best, size_t *nbest, const char *name, int score)
{
    if (score < 0)
        return;
    for (size_t i = 0; i < *nbest; i++) {
        if (!strcasecmp(best[i].name, name)) {
            if (score < best[i].score) {
                /* improve, then bubble up to keep the order */
                best[i].score = score;
                for (size_t k = i; k > 0 && best[k].score < best[k - 1].score; k--) {
                    suggestion t = best[k];
                    best[k] = best[k - 1];
                    best[k - 1] = t;
                }
            }
            return;
        }
    }
    size_t pos = *nbest;
    while (pos > 0 && best[pos - 1].score > score)
        pos--;
    if (pos >= MAX_SUGGESTIONS)
        return;
    size_t last = *nbest < MAX_SUGGESTIONS ? *nbest : MAX_SUGGESTIONS - 1;
    for (size_t k = last; k > pos; k--)
        best[k] = best[k - 1];
    best[pos].name = name;
    best[pos].score = score;
    if (*nbest < MAX_SUGGESTIONS)
        (*nbest)++;
}

const char *hx_catalog_suggest_among(const char *name, const char *const *extra, size_t nextra,
                                     char *buf, size_t size)
{
    if (!buf || size == 0)
        return buf;
    buf[0] = '\0';
    if (!name || !name[0])
        return buf;

    suggestion best[MAX_SUGGESTIONS];
    size_t nbest = 0;
    for (size_t i = 0; i < nextra; i++)
        if (extra && extra[i])
            offer(best, &nbest, extra[i], closeness(name, extra[i]));
    for (size_t i = 0; i < CATALOG_COUNT; i++)
        offer(best, &nbest, catalog[i].name, closeness(name, catalog[i].name));
    for (size_t i = 0; i < ALIAS_COUNT; i++)
        offer(best, &nbest, aliases[i].name, closeness(name, aliases[i].alias));

    size_t used = 0;
    for (size_t i = 0; i < nbest; i++) {
        int k = snprintf(buf + used, size - used, "%s%s", i ? ", " : "", best[i].name);
        if (k < 0 || (size_t)k >= size - used) {
            /* does not fit: keep only whole names */
            buf[used] = '\0';
            break;
        }
        used += (size_t)k;
    }
    return buf;
}

const char *hx_catalog_suggest(const char *name, char *buf, size_t size)
{
    return hx_catalog_suggest_among(name, NULL, 0, buf, size);
}

/* ---- driver model strings ---------------------------------------------- */

#define MAX_TOKENS 16
#define TOKEN_MAX 24

/*
 * Splits a model string into upper-case tokens at spaces and punctuation:
 * "NVIDIA A100-SXM4-80GB" -> NVIDIA A100 SXM4 80GB,
 * "GH100 [H100 SXM5 80GB]" (a PCI database name) -> GH100 H100 SXM5 80GB.
 */
static size_t tokenize(const char *s, char tok[MAX_TOKENS][TOKEN_MAX])
{
    size_t n = 0;
    while (*s && n < MAX_TOKENS) {
        while (*s && !isalnum((unsigned char)*s))
            s++;
        if (!*s)
            break;
        size_t len = 0;
        while (isalnum((unsigned char)*s)) {
            if (len + 1 < TOKEN_MAX)
                tok[n][len++] = (char)toupper((unsigned char)*s);
            s++;
        }
        tok[n][len] = '\0';
        n++;
    }
    return n;
}

static int has_token(char tok[MAX_TOKENS][TOKEN_MAX], size_t n, const char *t)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(tok[i], t))
            return 1;
    return 0;
}

/* A capacity token such as "80GB" or "80G": its number of GB, else 0. */
static int memory_token_gb(char tok[MAX_TOKENS][TOKEN_MAX], size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char *end;
        long v = strtol(tok[i], &end, 10);
        if (end != tok[i] && v > 0 && v < 100000 && (!strcmp(end, "GB") || !strcmp(end, "G")))
            return (int)v;
    }
    return 0;
}

const char *hx_catalog_match_device_name(const char *device_name, double memory_bytes)
{
    if (!device_name || !device_name[0])
        return NULL;
    const hx_gpu_spec *direct = hx_catalog_find(device_name);
    if (direct)
        return direct->name;

    char tok[MAX_TOKENS][TOKEN_MAX];
    size_t n = tokenize(device_name, tok);
    int gb = memory_token_gb(tok, n);
#define HAS(t) has_token(tok, n, (t))

    /* Variants with other figures than the catalog entry (H100 NVL, H200
     * NVL: other clocks and memory; GH200 is its own token) are unknown. */
    if (HAS("H100"))
        return HAS("NVL") ? NULL : HAS("PCIE") ? "H100-PCIe" : "H100-SXM";
    if (HAS("H200"))
        return HAS("NVL") ? NULL : "H200";
    if (HAS("A100")) {
        /* PCIe and SXM parts map to the SXM entry (the 80GB PCIe part has
         * 1.94 instead of 2.04 TB/s). Capacity from the name, else memory. */
        if (gb >= 60)
            return "A100-80G";
        if (gb > 0)
            return "A100-40G";
        if (memory_bytes > 0)
            return memory_bytes > 60 * GiB ? "A100-80G" : "A100-40G";
        return "A100-80G";
    }
    if (HAS("L40S"))
        return "L40S";
    if (HAS("L40"))
        return "L40";
    if (HAS("L4"))
        return "L4";
    /* "RTX A6000" but not "RTX 6000 Ada Generation" (a different card). */
    if (HAS("A6000") || HAS("RTXA6000"))
        return "A6000";
    if (HAS("A40"))
        return "A40";
    if (HAS("A10")) /* not A10G (AWS), which has other figures */
        return "A10";
    /* "GeForce RTX 4090" but not "4090 D" or "3090 Ti" (other figures). */
    if ((HAS("4090") && (HAS("RTX") || HAS("GEFORCE")) && !HAS("D")) || HAS("RTX4090"))
        return "RTX4090";
    if ((HAS("3090") && (HAS("RTX") || HAS("GEFORCE")) && !HAS("TI")) || HAS("RTX3090"))
        return "RTX3090";
    if (HAS("V100")) {
        /* The catalog entry is the 32GB part; the 16GB one is another type. */
        if ((gb > 0 && gb < 24) || (gb == 0 && memory_bytes > 0 && memory_bytes < 24 * GiB))
            return NULL;
        return "V100";
    }
    if (HAS("T4"))
        return "T4";
    if (HAS("MI300X"))
        return "MI300X";
#undef HAS
    return NULL;
}
