/*
 * kvcache.c - the paged KV cache, KV segments and the resharding plan.
 */
#define _POSIX_C_SOURCE 200809L
#include "runtime/kvcache.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/safetensors.h" /* hx_safetensors_bf16_to_f32: bf16 segments' widening */

/* ---- the cache ------------------------------------------------------------------------------- */

/* A sequence: a chain of blocks through next[], first to last. */
typedef struct kv_seq {
    int live;
    int tokens;   /* positions */
    int n_blocks; /* blocks in the chain */
    int first;    /* first block, -1 when none */
    int last;     /* last block, -1 when none */
} kv_seq;

struct hx_kvcache {
    int layers, kv_heads, head_dim, block_tokens, max_blocks;
    int layer_first, head_first; /* origin: model-wide indices of local layer 0, head 0 */
    size_t head_floats;          /* block_tokens * head_dim: one (layer, kv, head) of a block */
    size_t block_floats;         /* layers * 2 * kv_heads * head_floats */
    float *data;                 /* owned: [max_blocks][layers][2][kv_heads][block_tokens]
                                    [head_dim] */
    int *next;                   /* owned, [max_blocks]: next block of its chain, -1 at the end */
    int free_first;              /* the free list's first block, -1 when empty */
    int n_free;
    kv_seq *seqs;                /* owned, [n_slots] */
    int n_slots;
    int n_live;
};

hx_status hx_kvcache_new(int layers, int kv_heads, int head_dim, int block_tokens,
                         int max_blocks, hx_kvcache **out, hx_err *err)
{
    if (layers < 1 || kv_heads < 1 || head_dim < 1 || block_tokens < 1 || max_blocks < 1)
        return hx_err_set(err, HX_EINVAL,
                          "KV cache: layers %d, kv_heads %d, head_dim %d, block_tokens %d, "
                          "max_blocks %d (each must be at least 1)",
                          layers, kv_heads, head_dim, block_tokens, max_blocks);
    const size_t head_floats = (size_t)block_tokens * (size_t)head_dim;
    if (head_floats / (size_t)block_tokens != (size_t)head_dim ||
        head_floats > SIZE_MAX / 2 / (size_t)layers / (size_t)kv_heads)
        return hx_err_set(err, HX_ERANGE, "KV cache: a block of %d tokens is too large",
                          block_tokens);
    const size_t block_floats = (size_t)layers * 2 * (size_t)kv_heads * head_floats;
    if (block_floats > SIZE_MAX / sizeof(float) / (size_t)max_blocks)
        return hx_err_set(err, HX_ERANGE,
                          "KV cache: %d blocks of %zu floats exceed the address space",
                          max_blocks, block_floats);
    hx_kvcache *c = calloc(1, sizeof *c);
    if (!c)
        return hx_err_set(err, HX_ENOMEM, "KV cache: out of memory");
    *c = (hx_kvcache){.layers = layers, .kv_heads = kv_heads, .head_dim = head_dim,
                      .block_tokens = block_tokens, .max_blocks = max_blocks,
                      .head_floats = head_floats, .block_floats = block_floats};
    c->data = calloc((size_t)max_blocks * block_floats, sizeof(float));
    c->next = malloc((size_t)max_blocks * sizeof *c->next);
    if (!c->data || !c->next) {
        hx_kvcache_free(c);
        return hx_err_set(err, HX_ENOMEM,
                          "KV cache: out of memory for %d blocks of %zu bytes (%.1f MiB)",
                          max_blocks, block_floats * sizeof(float),
                          (double)max_blocks * (double)block_floats * sizeof(float) / 1048576.0);
    }
    /* the free list in ascending order: blocks are first handed out 0, 1, 2 ... */
    for (int b = 0; b < max_blocks; b++)
        c->next[b] = b + 1 < max_blocks ? b + 1 : -1;
    c->free_first = 0;
    c->n_free = max_blocks;
    *out = c;
    return HX_OK;
}

void hx_kvcache_free(hx_kvcache *c)
{
    if (!c)
        return;
    free(c->data);
    free(c->next);
    free(c->seqs);
    free(c);
}

hx_status hx_kvcache_set_origin(hx_kvcache *c, int layer_first, int head_first, hx_err *err)
{
    if (layer_first < 0 || head_first < 0 || layer_first > INT_MAX - c->layers ||
        head_first > INT_MAX - c->kv_heads)
        return hx_err_set(err, HX_EINVAL, "KV cache: origin layer %d, head %d is invalid",
                          layer_first, head_first);
    c->layer_first = layer_first;
    c->head_first = head_first;
    return HX_OK;
}

int hx_kvcache_layers(const hx_kvcache *c)
{
    return c->layers;
}

int hx_kvcache_kv_heads(const hx_kvcache *c)
{
    return c->kv_heads;
}

int hx_kvcache_head_dim(const hx_kvcache *c)
{
    return c->head_dim;
}

int hx_kvcache_block_tokens(const hx_kvcache *c)
{
    return c->block_tokens;
}

int hx_kvcache_max_blocks(const hx_kvcache *c)
{
    return c->max_blocks;
}

int hx_kvcache_layer_first(const hx_kvcache *c)
{
    return c->layer_first;
}

int hx_kvcache_head_first(const hx_kvcache *c)
{
    return c->head_first;
}

int64_t hx_kvcache_block_bytes(const hx_kvcache *c)
{
    return (int64_t)c->block_floats * (int64_t)sizeof(float);
}

/* ---- admission ------------------------------------------------------------------------------- */

int hx_kvcache_blocks_free(const hx_kvcache *c)
{
    return c->n_free;
}

int64_t hx_kvcache_tokens_free(const hx_kvcache *c)
{
    return (int64_t)c->n_free * c->block_tokens;
}

int hx_kvcache_blocks_for(const hx_kvcache *c, int64_t tokens)
{
    if (tokens <= 0)
        return 0;
    int64_t b = (tokens + c->block_tokens - 1) / c->block_tokens;
    return b > INT_MAX ? INT_MAX : (int)b;
}

static kv_seq *get_seq(const hx_kvcache *c, int seq)
{
    if (seq < 0 || seq >= c->n_slots || !c->seqs[seq].live)
        return NULL;
    return &c->seqs[seq];
}

int hx_kvcache_blocks_needed(const hx_kvcache *c, int seq, int more_tokens)
{
    const kv_seq *s = get_seq(c, seq);
    if (!s)
        return -1;
    if (more_tokens <= 0)
        return 0;
    return hx_kvcache_blocks_for(c, (int64_t)s->tokens + more_tokens) - s->n_blocks;
}

/* ---- sequences ------------------------------------------------------------------------------- */

hx_status hx_kvcache_alloc_seq(hx_kvcache *c, int *seq, hx_err *err)
{
    int slot = -1;
    for (int i = 0; i < c->n_slots; i++)
        if (!c->seqs[i].live) {
            slot = i;
            break;
        }
    if (slot < 0) {
        if (c->n_slots > INT_MAX / 2)
            return hx_err_set(err, HX_ERANGE, "KV cache: too many sequences (%d)", c->n_slots);
        int n = c->n_slots ? 2 * c->n_slots : 16;
        kv_seq *s = realloc(c->seqs, (size_t)n * sizeof *s);
        if (!s)
            return hx_err_set(err, HX_ENOMEM, "KV cache: out of memory for %d sequences", n);
        memset(s + c->n_slots, 0, (size_t)(n - c->n_slots) * sizeof *s);
        slot = c->n_slots;
        c->seqs = s;
        c->n_slots = n;
    }
    c->seqs[slot] = (kv_seq){1, 0, 0, -1, -1};
    c->n_live++;
    *seq = slot;
    return HX_OK;
}

void hx_kvcache_free_seq(hx_kvcache *c, int seq)
{
    kv_seq *s = get_seq(c, seq);
    if (!s)
        return;
    /* push the chain, first to last, on the free list (LIFO: the last block is reused first) */
    for (int b = s->first; b >= 0;) {
        int nb = c->next[b];
        c->next[b] = c->free_first;
        c->free_first = b;
        c->n_free++;
        b = nb;
    }
    *s = (kv_seq){0, 0, 0, -1, -1};
    c->n_live--;
}

hx_status hx_kvcache_append(hx_kvcache *c, int seq, int n, hx_err *err)
{
    kv_seq *s = get_seq(c, seq);
    if (!s)
        return hx_err_set(err, HX_EINVAL, "KV cache: no sequence %d", seq);
    if (n < 0)
        return hx_err_set(err, HX_EINVAL, "KV cache: sequence %d: appending %d positions", seq,
                          n);
    if (n > INT_MAX - s->tokens)
        return hx_err_set(err, HX_ERANGE,
                          "KV cache: sequence %d: %d + %d positions do not fit in an int", seq,
                          s->tokens, n);
    int need = hx_kvcache_blocks_for(c, (int64_t)s->tokens + n) - s->n_blocks;
    if (need > c->n_free)
        return hx_err_set(err, HX_ENOMEM,
                          "KV cache: sequence %d: %d more positions need %d blocks of %d "
                          "tokens; %d of %d are free",
                          seq, n, need, c->block_tokens, c->n_free, c->max_blocks);
    for (int i = 0; i < need; i++) {
        int b = c->free_first;
        c->free_first = c->next[b];
        c->next[b] = -1;
        if (s->last >= 0)
            c->next[s->last] = b;
        else
            s->first = b;
        s->last = b;
    }
    c->n_free -= need;
    s->n_blocks += need;
    s->tokens += n;
    return HX_OK;
}

int hx_kvcache_seq_tokens(const hx_kvcache *c, int seq)
{
    const kv_seq *s = get_seq(c, seq);
    return s ? s->tokens : 0;
}

int hx_kvcache_seq_blocks(const hx_kvcache *c, int seq, int *blocks, int cap)
{
    const kv_seq *s = get_seq(c, seq);
    if (!s)
        return -1;
    int i = 0;
    for (int b = s->first; b >= 0 && i < cap; b = c->next[b])
        blocks[i++] = b;
    return s->n_blocks;
}

int hx_kvcache_seq_count(const hx_kvcache *c)
{
    return c->n_live;
}

hx_status hx_kvcache_check(const hx_kvcache *c, hx_err *err)
{
    hx_status st = HX_OK;
    /* owner[b]: -2 unseen, -1 free, else the sequence */
    int *owner = malloc((size_t)c->max_blocks * sizeof *owner);
    if (!owner)
        return hx_err_set(err, HX_ENOMEM, "KV cache check: out of memory");
    for (int b = 0; b < c->max_blocks; b++)
        owner[b] = -2;
    int n = 0;
    for (int b = c->free_first; b >= 0; b = c->next[b]) {
        if (b >= c->max_blocks || owner[b] != -2) {
            st = hx_err_set(err, HX_EINTERNAL, "KV cache: free list revisits block %d", b);
            goto out;
        }
        owner[b] = -1;
        n++;
    }
    if (n != c->n_free) {
        st = hx_err_set(err, HX_EINTERNAL, "KV cache: %d blocks on the free list, count says %d",
                        n, c->n_free);
        goto out;
    }
    int live = 0, used = 0;
    for (int i = 0; i < c->n_slots; i++) {
        const kv_seq *s = &c->seqs[i];
        if (!s->live)
            continue;
        live++;
        int k = 0, last = -1;
        for (int b = s->first; b >= 0; b = c->next[b]) {
            if (b >= c->max_blocks || owner[b] != -2) {
                st = hx_err_set(err, HX_EINTERNAL,
                                "KV cache: block %d of sequence %d is %s", b, i,
                                b >= c->max_blocks ? "out of range"
                                : owner[b] == -1   ? "also free"
                                                   : "also in another chain");
                goto out;
            }
            owner[b] = i;
            last = b;
            k++;
        }
        if (k != s->n_blocks || last != s->last ||
            k != hx_kvcache_blocks_for(c, s->tokens)) {
            st = hx_err_set(err, HX_EINTERNAL,
                            "KV cache: sequence %d: %d blocks in its chain, %d counted, %d "
                            "positions",
                            i, k, s->n_blocks, s->tokens);
            goto out;
        }
        used += k;
    }
    if (live != c->n_live || used + c->n_free != c->max_blocks) {
        st = hx_err_set(err, HX_EINTERNAL,
                        "KV cache: %d live sequences (count %d), %d blocks used + %d free of %d",
                        live, c->n_live, used, c->n_free, c->max_blocks);
        goto out;
    }
out:
    free(owner);
    return st;
}

/* ---- access ---------------------------------------------------------------------------------- */

/* Offset in floats of the rows of (layer, kv, head) in block `block`. */
static size_t rows_at(const hx_kvcache *c, int block, int layer, int kv, int head)
{
    return (size_t)block * c->block_floats +
           ((size_t)(layer * 2 + kv) * (size_t)c->kv_heads + (size_t)head) * c->head_floats;
}

float *hx_kvcache_block_data(hx_kvcache *c, int block, int layer, int kv, int head)
{
    return c->data + rows_at(c, block, layer, kv, head);
}

float *hx_kvcache_row(hx_kvcache *c, int seq, int layer, int kv, int head, int pos)
{
    const kv_seq *s = get_seq(c, seq);
    if (!s || layer < 0 || layer >= c->layers || kv < 0 || kv > 1 || head < 0 ||
        head >= c->kv_heads || pos < 0 || pos >= s->tokens)
        return NULL;
    int b = s->first;
    for (int i = 0; i < pos / c->block_tokens; i++)
        b = c->next[b];
    return hx_kvcache_block_data(c, b, layer, kv, head) +
           (size_t)(pos % c->block_tokens) * (size_t)c->head_dim;
}

void hx_kvcache_layer_view(const hx_kvcache *c, int layer, hx_cpu_paged_kv *out)
{
    out->k = c->data + rows_at(c, 0, layer, 0, 0);
    out->v = c->data + rows_at(c, 0, layer, 1, 0);
    out->block_stride = c->block_floats;
    out->head_stride = c->head_floats;
    out->block_tokens = c->block_tokens;
}

/*
 * Positions pos .. pos + tokens - 1 of (layer, kv, head) of the chain from
 * `first`, which must hold them: copied into out ([tokens][head_dim]) when
 * in is NULL, else copied from in ([tokens][head_dim]) into the cache.
 */
static void copy_rows(const hx_kvcache *c, int first, int pos, int tokens, int layer, int kv,
                      int head, float *out, const float *in)
{
    const size_t d = (size_t)c->head_dim;
    int b = first;
    for (int i = 0; i < pos / c->block_tokens; i++)
        b = c->next[b];
    int off = pos % c->block_tokens, done = 0;
    for (; b >= 0 && done < tokens; b = c->next[b], off = 0) {
        int n = c->block_tokens - off < tokens - done ? c->block_tokens - off : tokens - done;
        float *rows = c->data + rows_at(c, b, layer, kv, head) + (size_t)off * d;
        if (in)
            memcpy(rows, in + (size_t)done * d, (size_t)n * d * sizeof(float));
        else
            memcpy(out + (size_t)done * d, rows, (size_t)n * d * sizeof(float));
        done += n;
    }
}

hx_status hx_kvcache_gather(const hx_kvcache *c, int seq, int layer, int head, float *k,
                            float *v, hx_err *err)
{
    const kv_seq *s = get_seq(c, seq);
    if (!s)
        return hx_err_set(err, HX_EINVAL, "KV cache: no sequence %d", seq);
    if (layer < 0 || layer >= c->layers || head < 0 || head >= c->kv_heads)
        return hx_err_set(err, HX_EINVAL,
                          "KV cache: layer %d, head %d outside the cache's %d layers, %d heads",
                          layer, head, c->layers, c->kv_heads);
    if (k)
        copy_rows(c, s->first, 0, s->tokens, layer, 0, head, k, NULL);
    if (v)
        copy_rows(c, s->first, 0, s->tokens, layer, 1, head, v, NULL);
    return HX_OK;
}

/* ---- KV segments ----------------------------------------------------------------------------- */

#define CHECKSUM_AT 56 /* the header bytes before the checksum field */

/* ---- CRC-32C (Castagnoli, reflected polynomial 0x82f63b78) ----------------------------------- */

/* crc_table[b]: the CRC register after shifting byte b through it. */
static const uint32_t crc_table[256] = {
    0x00000000u, 0xf26b8303u, 0xe13b70f7u, 0x1350f3f4u, 0xc79a971fu, 0x35f1141cu,
    0x26a1e7e8u, 0xd4ca64ebu, 0x8ad958cfu, 0x78b2dbccu, 0x6be22838u, 0x9989ab3bu,
    0x4d43cfd0u, 0xbf284cd3u, 0xac78bf27u, 0x5e133c24u, 0x105ec76fu, 0xe235446cu,
    0xf165b798u, 0x030e349bu, 0xd7c45070u, 0x25afd373u, 0x36ff2087u, 0xc494a384u,
    0x9a879fa0u, 0x68ec1ca3u, 0x7bbcef57u, 0x89d76c54u, 0x5d1d08bfu, 0xaf768bbcu,
    0xbc267848u, 0x4e4dfb4bu, 0x20bd8edeu, 0xd2d60dddu, 0xc186fe29u, 0x33ed7d2au,
    0xe72719c1u, 0x154c9ac2u, 0x061c6936u, 0xf477ea35u, 0xaa64d611u, 0x580f5512u,
    0x4b5fa6e6u, 0xb93425e5u, 0x6dfe410eu, 0x9f95c20du, 0x8cc531f9u, 0x7eaeb2fau,
    0x30e349b1u, 0xc288cab2u, 0xd1d83946u, 0x23b3ba45u, 0xf779deaeu, 0x05125dadu,
    0x1642ae59u, 0xe4292d5au, 0xba3a117eu, 0x4851927du, 0x5b016189u, 0xa96ae28au,
    0x7da08661u, 0x8fcb0562u, 0x9c9bf696u, 0x6ef07595u, 0x417b1dbcu, 0xb3109ebfu,
    0xa0406d4bu, 0x522bee48u, 0x86e18aa3u, 0x748a09a0u, 0x67dafa54u, 0x95b17957u,
    0xcba24573u, 0x39c9c670u, 0x2a993584u, 0xd8f2b687u, 0x0c38d26cu, 0xfe53516fu,
    0xed03a29bu, 0x1f682198u, 0x5125dad3u, 0xa34e59d0u, 0xb01eaa24u, 0x42752927u,
    0x96bf4dccu, 0x64d4cecfu, 0x77843d3bu, 0x85efbe38u, 0xdbfc821cu, 0x2997011fu,
    0x3ac7f2ebu, 0xc8ac71e8u, 0x1c661503u, 0xee0d9600u, 0xfd5d65f4u, 0x0f36e6f7u,
    0x61c69362u, 0x93ad1061u, 0x80fde395u, 0x72966096u, 0xa65c047du, 0x5437877eu,
    0x4767748au, 0xb50cf789u, 0xeb1fcbadu, 0x197448aeu, 0x0a24bb5au, 0xf84f3859u,
    0x2c855cb2u, 0xdeeedfb1u, 0xcdbe2c45u, 0x3fd5af46u, 0x7198540du, 0x83f3d70eu,
    0x90a324fau, 0x62c8a7f9u, 0xb602c312u, 0x44694011u, 0x5739b3e5u, 0xa55230e6u,
    0xfb410cc2u, 0x092a8fc1u, 0x1a7a7c35u, 0xe811ff36u, 0x3cdb9bddu, 0xceb018deu,
    0xdde0eb2au, 0x2f8b6829u, 0x82f63b78u, 0x709db87bu, 0x63cd4b8fu, 0x91a6c88cu,
    0x456cac67u, 0xb7072f64u, 0xa457dc90u, 0x563c5f93u, 0x082f63b7u, 0xfa44e0b4u,
    0xe9141340u, 0x1b7f9043u, 0xcfb5f4a8u, 0x3dde77abu, 0x2e8e845fu, 0xdce5075cu,
    0x92a8fc17u, 0x60c37f14u, 0x73938ce0u, 0x81f80fe3u, 0x55326b08u, 0xa759e80bu,
    0xb4091bffu, 0x466298fcu, 0x1871a4d8u, 0xea1a27dbu, 0xf94ad42fu, 0x0b21572cu,
    0xdfeb33c7u, 0x2d80b0c4u, 0x3ed04330u, 0xccbbc033u, 0xa24bb5a6u, 0x502036a5u,
    0x4370c551u, 0xb11b4652u, 0x65d122b9u, 0x97baa1bau, 0x84ea524eu, 0x7681d14du,
    0x2892ed69u, 0xdaf96e6au, 0xc9a99d9eu, 0x3bc21e9du, 0xef087a76u, 0x1d63f975u,
    0x0e330a81u, 0xfc588982u, 0xb21572c9u, 0x407ef1cau, 0x532e023eu, 0xa145813du,
    0x758fe5d6u, 0x87e466d5u, 0x94b49521u, 0x66df1622u, 0x38cc2a06u, 0xcaa7a905u,
    0xd9f75af1u, 0x2b9cd9f2u, 0xff56bd19u, 0x0d3d3e1au, 0x1e6dcdeeu, 0xec064eedu,
    0xc38d26c4u, 0x31e6a5c7u, 0x22b65633u, 0xd0ddd530u, 0x0417b1dbu, 0xf67c32d8u,
    0xe52cc12cu, 0x1747422fu, 0x49547e0bu, 0xbb3ffd08u, 0xa86f0efcu, 0x5a048dffu,
    0x8ecee914u, 0x7ca56a17u, 0x6ff599e3u, 0x9d9e1ae0u, 0xd3d3e1abu, 0x21b862a8u,
    0x32e8915cu, 0xc083125fu, 0x144976b4u, 0xe622f5b7u, 0xf5720643u, 0x07198540u,
    0x590ab964u, 0xab613a67u, 0xb831c993u, 0x4a5a4a90u, 0x9e902e7bu, 0x6cfbad78u,
    0x7fab5e8cu, 0x8dc0dd8fu, 0xe330a81au, 0x115b2b19u, 0x020bd8edu, 0xf0605beeu,
    0x24aa3f05u, 0xd6c1bc06u, 0xc5914ff2u, 0x37faccf1u, 0x69e9f0d5u, 0x9b8273d6u,
    0x88d28022u, 0x7ab90321u, 0xae7367cau, 0x5c18e4c9u, 0x4f48173du, 0xbd23943eu,
    0xf36e6f75u, 0x0105ec76u, 0x12551f82u, 0xe03e9c81u, 0x34f4f86au, 0xc69f7b69u,
    0xd5cf889du, 0x27a40b9eu, 0x79b737bau, 0x8bdcb4b9u, 0x988c474du, 0x6ae7c44eu,
    0xbe2da0a5u, 0x4c4623a6u, 0x5f16d052u, 0xad7d5351u,
};

static uint32_t crc32c_table(uint32_t r, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        r = crc_table[(r ^ p[i]) & 0xff] ^ (r >> 8);
    return r;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <nmmintrin.h>
/* The SSE4.2 crc32 instruction computes the same register, 8 bytes at a time. */
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t r,
                                                               const unsigned char *p, size_t n)
{
    uint64_t c = r;
    for (; n > 0 && ((uintptr_t)p & 7) != 0; n--, p++)
        c = _mm_crc32_u8((uint32_t)c, *p);
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
    }
    for (; n > 0; n--, p++)
        c = _mm_crc32_u8((uint32_t)c, *p);
    return (uint32_t)c;
}

static int have_sse42(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2");
}
#endif

uint32_t hx_kv_crc32c(uint32_t crc, const void *data, size_t n)
{
    uint32_t r = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_sse42())
        return ~crc32c_sse42(r, data, n);
#endif
    return ~crc32c_table(r, data, n);
}

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static int host_little_endian(void)
{
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* Payload bytes for these counts, 0 when one is below 1 or the size overflows. */
int hx_kv_dtype_bytes(int dtype)
{
    return dtype == HX_KV_DTYPE_F32 ? 4 : dtype == HX_KV_DTYPE_BF16 ? 2 : 0;
}

static uint64_t payload_bytes_for(int dtype, int64_t layers, int64_t heads, int64_t tokens,
                                  int64_t d)
{
    const int eb = hx_kv_dtype_bytes(dtype);
    if (eb == 0 || layers < 1 || heads < 1 || tokens < 1 || d < 1)
        return 0;
    uint64_t n = 2 * (uint64_t)eb;
    const int64_t f[4] = {layers, heads, tokens, d};
    for (int i = 0; i < 4; i++) {
        if ((uint64_t)f[i] > UINT64_MAX / n)
            return 0;
        n *= (uint64_t)f[i];
    }
    return n;
}

size_t hx_kv_segment_bytes(int dtype, int num_layers, int num_heads, int tokens, int head_dim)
{
    uint64_t p = payload_bytes_for(dtype, num_layers, num_heads, tokens, head_dim);
    if (p == 0 || p > (uint64_t)SIZE_MAX - HX_KV_SEGMENT_HEADER_BYTES)
        return 0;
    return (size_t)p + HX_KV_SEGMENT_HEADER_BYTES;
}

void hx_kv_segment_begin(void *seg, int dtype, int layer_first, int num_layers, int head_first,
                         int num_heads, int tokens, int head_dim)
{
    unsigned char *h = seg;
    const size_t bytes = hx_kv_segment_bytes(dtype, num_layers, num_heads, tokens, head_dim);
    memset(h, 0, HX_KV_SEGMENT_HEADER_BYTES);
    memcpy(h, HX_KV_SEGMENT_MAGIC, 4);
    put_u32(h + 4, HX_KV_SEGMENT_VERSION);
    put_u32(h + 8, HX_KV_SEGMENT_HEADER_BYTES);
    put_u32(h + 12, (uint32_t)dtype);
    put_u32(h + 16, (uint32_t)layer_first);
    put_u32(h + 20, (uint32_t)num_layers);
    put_u32(h + 24, (uint32_t)head_first);
    put_u32(h + 28, (uint32_t)num_heads);
    put_u32(h + 32, (uint32_t)tokens);
    put_u32(h + 36, (uint32_t)head_dim);
    put_u64(h + 40, bytes ? (uint64_t)(bytes - HX_KV_SEGMENT_HEADER_BYTES) : 0);
    put_u32(h + 48, 0); /* token_first */
}

uint32_t hx_kv_segment_header_crc(const void *seg)
{
    return hx_kv_crc32c(0, seg, CHECKSUM_AT);
}

void hx_kv_segment_seal(void *seg, uint32_t crc)
{
    put_u64((unsigned char *)seg + CHECKSUM_AT, crc);
}

/* The checksum of a segment: CRC-32C of header bytes 0..55, then the payload. */
static uint32_t segment_crc(const unsigned char *seg, uint64_t p)
{
    return hx_kv_crc32c(hx_kv_segment_header_crc(seg), seg + HX_KV_SEGMENT_HEADER_BYTES,
                        (size_t)p);
}

static void seal(unsigned char *seg, uint64_t p)
{
    hx_kv_segment_seal(seg, segment_crc(seg, p));
}

/* [first, first + n) within [lo, lo + count)? (int64 arithmetic: no overflow) */
static int range_within(int64_t first, int64_t n, int64_t lo, int64_t count)
{
    return n >= 1 && first >= lo && first + n <= lo + count;
}

/* Whether the layers and heads to pack lie within a cache's; err says why not. */
static int pack_ranges(int layer_first, int num_layers, int head_first, int num_heads,
                       int c_layer_first, int c_layers, int c_head_first, int c_heads,
                       hx_err *err)
{
    if (range_within(layer_first, num_layers, c_layer_first, c_layers) &&
        range_within(head_first, num_heads, c_head_first, c_heads))
        return 1;
    hx_err_set(err, HX_EINVAL,
               "KV pack: layers [%d, %lld), heads [%d, %lld) are not within the cache's layers "
               "[%d, %d), heads [%d, %d)",
               layer_first, (long long)layer_first + num_layers, head_first,
               (long long)head_first + num_heads, c_layer_first, c_layer_first + c_layers,
               c_head_first, c_head_first + c_heads);
    return 0;
}

/* Checks an output buffer; returns the segment size in *need. */
static hx_status check_out(const char *what, int num_layers, int num_heads, int tokens,
                           int head_dim, const void *out, size_t out_size, size_t *need,
                           hx_err *err)
{
    if (!host_little_endian())
        return hx_err_set(err, HX_ENOTSUP, "%s: KV segments need a little-endian host", what);
    *need = hx_kv_segment_bytes(HX_KV_DTYPE_F32, num_layers, num_heads, tokens, head_dim);
    if (*need == 0)
        return hx_err_set(err, HX_ERANGE,
                          "%s: a segment of %d layers, %d heads, %d tokens of %d floats is "
                          "too large",
                          what, num_layers, num_heads, tokens, head_dim);
    if (!out || out_size < *need)
        return hx_err_set(err, HX_ERANGE, "%s: the buffer holds %zu bytes; the segment takes %zu",
                          what, out_size, *need);
    if ((uintptr_t)out % sizeof(float) != 0)
        return hx_err_set(err, HX_EINVAL, "%s: the buffer is not 4-byte aligned", what);
    return HX_OK;
}

hx_status hx_kvcache_pack(const hx_kvcache *c, int seq, int layer_first, int num_layers,
                          int head_first, int num_heads, void *out, size_t out_size,
                          size_t *out_bytes, hx_err *err)
{
    const kv_seq *s = get_seq(c, seq);
    if (!s)
        return hx_err_set(err, HX_EINVAL, "KV pack: no sequence %d", seq);
    if (s->tokens < 1)
        return hx_err_set(err, HX_EINVAL, "KV pack: sequence %d holds no positions", seq);
    if (!pack_ranges(layer_first, num_layers, head_first, num_heads, c->layer_first, c->layers,
                     c->head_first, c->kv_heads, err))
        return HX_EINVAL;
    size_t need;
    hx_status st = check_out("KV pack", num_layers, num_heads, s->tokens, c->head_dim, out,
                             out_size, &need, err);
    if (st != HX_OK)
        return st;
    const uint64_t p = need - HX_KV_SEGMENT_HEADER_BYTES;
    unsigned char *seg = out;
    hx_kv_segment_begin(seg, HX_KV_DTYPE_F32, layer_first, num_layers, head_first, num_heads,
                        s->tokens, c->head_dim);
    float *dst = (float *)(void *)(seg + HX_KV_SEGMENT_HEADER_BYTES);
    const size_t run = (size_t)s->tokens * (size_t)c->head_dim; /* one (layer, kv, head) */
    for (int l = 0; l < num_layers; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < num_heads; h++, dst += run)
                copy_rows(c, s->first, 0, s->tokens, layer_first - c->layer_first + l, kv,
                          head_first - c->head_first + h, dst, NULL);
    seal(seg, p);
    if (out_bytes)
        *out_bytes = need;
    return HX_OK;
}

hx_status hx_kv_pack_contiguous(const hx_kv_contiguous *src, int tokens, int layer_first,
                                int num_layers, int head_first, int num_heads, void *out,
                                size_t out_size, size_t *out_bytes, hx_err *err)
{
    if (tokens < 1 || tokens > src->max_tokens)
        return hx_err_set(err, HX_EINVAL, "KV pack: %d tokens of a cache of %d", tokens,
                          src->max_tokens);
    if (!pack_ranges(layer_first, num_layers, head_first, num_heads, src->layer_first,
                     src->layers, src->head_first, src->kv_heads, err))
        return HX_EINVAL;
    size_t need;
    hx_status st = check_out("KV pack", num_layers, num_heads, tokens, src->head_dim, out,
                             out_size, &need, err);
    if (st != HX_OK)
        return st;
    const uint64_t p = need - HX_KV_SEGMENT_HEADER_BYTES;
    unsigned char *seg = out;
    hx_kv_segment_begin(seg, HX_KV_DTYPE_F32, layer_first, num_layers, head_first, num_heads,
                        tokens, src->head_dim);
    float *dst = (float *)(void *)(seg + HX_KV_SEGMENT_HEADER_BYTES);
    const size_t d = (size_t)src->head_dim, run = (size_t)tokens * d;
    for (int l = 0; l < num_layers; l++) {
        const size_t ll = (size_t)(layer_first - src->layer_first + l);
        for (int kv = 0; kv < 2; kv++) {
            const float *base = kv ? src->v : src->k;
            for (int h = 0; h < num_heads; h++, dst += run) {
                const size_t hh = (size_t)(head_first - src->head_first + h);
                const float *from =
                    base + ((ll * (size_t)src->kv_heads + hh) * (size_t)src->max_tokens) * d;
                memcpy(dst, from, run * sizeof(float));
            }
        }
    }
    seal(seg, p);
    if (out_bytes)
        *out_bytes = need;
    return HX_OK;
}

hx_status hx_kv_segment_parse(const void *seg, size_t size, hx_kv_segment *out, hx_err *err)
{
    const unsigned char *h = seg;
    if (!host_little_endian())
        return hx_err_set(err, HX_ENOTSUP, "KV segment: needs a little-endian host");
    if (!seg || size < HX_KV_SEGMENT_HEADER_BYTES)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: %zu bytes, shorter than its %d-byte header (truncated)",
                          seg ? size : 0, HX_KV_SEGMENT_HEADER_BYTES);
    if (memcmp(h, HX_KV_SEGMENT_MAGIC, 4) != 0)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: bad magic %02x %02x %02x %02x at offset 0 (expected "
                          "'" HX_KV_SEGMENT_MAGIC "')",
                          h[0], h[1], h[2], h[3]);
    const uint32_t version = get_u32(h + 4), header = get_u32(h + 8), dtype = get_u32(h + 12);
    if (version != HX_KV_SEGMENT_VERSION)
        return hx_err_set(err, HX_ENOTSUP,
                          "KV segment: version %u at offset 4 (this build reads version %d)",
                          version, HX_KV_SEGMENT_VERSION);
    if (header != HX_KV_SEGMENT_HEADER_BYTES)
        return hx_err_set(err, HX_EPARSE, "KV segment: header_bytes %u at offset 8 (expected %d)",
                          header, HX_KV_SEGMENT_HEADER_BYTES);
    const int eb = dtype <= INT_MAX ? hx_kv_dtype_bytes((int)dtype) : 0;
    if (eb == 0)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: dtype %u at offset 12 (known: %d fp32, %d bf16)", dtype,
                          HX_KV_DTYPE_F32, HX_KV_DTYPE_BF16);
    /* u32 fields: every one fits an int; the counts are at least 1 */
    static const struct {
        const char *name;
        int offset, is_count;
    } fields[7] = {{"layer_first", 16, 0}, {"num_layers", 20, 1}, {"head_first", 24, 0},
                   {"num_heads", 28, 1},   {"tokens", 32, 1},     {"head_dim", 36, 1},
                   {"token_first", 48, 0}};
    uint32_t f[7];
    for (int i = 0; i < 7; i++) {
        f[i] = get_u32(h + fields[i].offset);
        if (f[i] > INT_MAX || (fields[i].is_count && f[i] < 1))
            return hx_err_set(err, HX_EPARSE, "KV segment: %s %u at offset %d is out of range",
                              fields[i].name, f[i], fields[i].offset);
    }
    if ((uint64_t)f[0] + f[1] > INT_MAX || (uint64_t)f[2] + f[3] > INT_MAX ||
        (uint64_t)f[6] + f[4] > INT_MAX)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: a layer, head or position range passes INT_MAX");
    const uint64_t payload = get_u64(h + 40);
    const uint64_t want = payload_bytes_for((int)dtype, f[1], f[3], f[4], f[5]);
    if (want == 0 || payload != want)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: payload_bytes %llu at offset 40, but %u layers x 2 x %u "
                          "heads x %u tokens x %u values of %d bytes take %llu",
                          (unsigned long long)payload, f[1], f[3], f[4], f[5], eb,
                          (unsigned long long)want);
    if (get_u32(h + 52) != 0)
        return hx_err_set(err, HX_EPARSE, "KV segment: reserved field at offset 52 is not 0");
    const uint64_t have = size - HX_KV_SEGMENT_HEADER_BYTES;
    if (have < payload)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: %zu bytes, but header + payload take %llu (truncated)",
                          size, (unsigned long long)payload + HX_KV_SEGMENT_HEADER_BYTES);
    if (have > payload)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: %zu bytes, but header + payload take %llu (%llu "
                          "trailing bytes)",
                          size, (unsigned long long)payload + HX_KV_SEGMENT_HEADER_BYTES,
                          (unsigned long long)(have - payload));
    if ((uintptr_t)(h + HX_KV_SEGMENT_HEADER_BYTES) % (unsigned)eb != 0)
        return hx_err_set(err, HX_EINVAL, "KV segment: the payload is not %d-byte aligned", eb);
    const uint64_t stored = get_u64(h + CHECKSUM_AT);
    const uint32_t sum = segment_crc(h, payload);
    if (sum != stored)
        return hx_err_set(err, HX_EPARSE,
                          "KV segment: checksum mismatch (stored %016llx, computed CRC-32C "
                          "%08x): the segment is corrupt",
                          (unsigned long long)stored, sum);
    *out = (hx_kv_segment){
        .version = (int)version,
        .dtype = (int)dtype,
        .layer_first = (int)f[0],
        .num_layers = (int)f[1],
        .head_first = (int)f[2],
        .num_heads = (int)f[3],
        .token_first = (int)f[6],
        .tokens = (int)f[4],
        .head_dim = (int)f[5],
        .payload_bytes = payload,
        .checksum = stored,
        .payload = h + HX_KV_SEGMENT_HEADER_BYTES};
    return HX_OK;
}

hx_status hx_kvcache_unpack_parsed(hx_kvcache *c, int seq, const hx_kv_segment *g,
                                   hx_err *err)
{
    kv_seq *s = get_seq(c, seq);
    if (!s)
        return hx_err_set(err, HX_EINVAL, "KV unpack: no sequence %d", seq);
    const int eb = hx_kv_dtype_bytes(g->dtype);
    if (eb == 0)
        return hx_err_set(err, HX_EINVAL, "KV unpack: dtype %d (known: %d fp32, %d bf16)",
                          g->dtype, HX_KV_DTYPE_F32, HX_KV_DTYPE_BF16);
    if (g->num_layers < 1 || g->num_heads < 1 || g->tokens < 1 || g->token_first < 0 ||
        g->token_first > INT_MAX - g->tokens)
        return hx_err_set(err, HX_EINVAL,
                          "KV unpack: %d layers, %d heads, positions %d + %d are not valid",
                          g->num_layers, g->num_heads, g->token_first, g->tokens);
    if (g->head_dim != c->head_dim)
        return hx_err_set(err, HX_EINVAL, "KV unpack: segment head_dim %d, the cache's is %d",
                          g->head_dim, c->head_dim);
    const uint64_t want =
        payload_bytes_for(g->dtype, g->num_layers, g->num_heads, g->tokens, g->head_dim);
    if (g->payload_bytes != want)
        return hx_err_set(err, HX_EINVAL,
                          "KV unpack: payload_bytes %llu, but the counts take %llu",
                          (unsigned long long)g->payload_bytes, (unsigned long long)want);
    if (!g->payload || (uintptr_t)g->payload % (unsigned)eb != 0)
        return hx_err_set(err, HX_EINVAL, "KV unpack: the payload is NULL or not %d-byte aligned",
                          eb);
    if (!range_within(g->layer_first, g->num_layers, c->layer_first, c->layers) ||
        !range_within(g->head_first, g->num_heads, c->head_first, c->kv_heads))
        return hx_err_set(err, HX_EINVAL,
                          "KV unpack: segment layers [%d, %lld), heads [%d, %lld) are not "
                          "within the cache's layers [%d, %d), heads [%d, %d)",
                          g->layer_first, (long long)g->layer_first + g->num_layers,
                          g->head_first, (long long)g->head_first + g->num_heads,
                          c->layer_first, c->layer_first + c->layers, c->head_first,
                          c->head_first + c->kv_heads);
    const int end = g->token_first + g->tokens;
    hx_status st;
    if (s->tokens < end && (st = hx_kvcache_append(c, seq, end - s->tokens, err)) != HX_OK)
        return st;
    const size_t run = (size_t)g->tokens * (size_t)c->head_dim; /* one (layer, kv, head) */
    float *wide = NULL; /* a bf16 run widened (exactly) */
    if (g->dtype == HX_KV_DTYPE_BF16 && !(wide = malloc(run * sizeof *wide)))
        return hx_err_set(err, HX_ENOMEM, "KV unpack: out of memory");
    const unsigned char *src = g->payload;
    for (int l = 0; l < g->num_layers; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int h = 0; h < g->num_heads; h++, src += run * (size_t)eb) {
                if (wide) {
                    const uint16_t *b = (const uint16_t *)(const void *)src;
                    for (size_t i = 0; i < run; i++)
                        wide[i] = hx_safetensors_bf16_to_f32(b[i]);
                }
                copy_rows(c, s->first, g->token_first, g->tokens,
                          g->layer_first - c->layer_first + l, kv,
                          g->head_first - c->head_first + h, NULL,
                          wide ? wide : (const float *)(const void *)src);
            }
    free(wide);
    return HX_OK;
}

hx_status hx_kvcache_unpack(hx_kvcache *c, int seq, const void *seg, size_t size, hx_err *err)
{
    hx_kv_segment g;
    hx_status st = hx_kv_segment_parse(seg, size, &g, err);
    if (st != HX_OK)
        return st;
    return hx_kvcache_unpack_parsed(c, seq, &g, err);
}

/* ---- heads across TP ranks, and resharding --------------------------------------------------- */

hx_status hx_kv_rank_heads(int kv_heads, int tp, int rank, int *head_first, int *num_heads,
                           hx_err *err)
{
    if (kv_heads < 1 || tp < 1 || rank < 0 || rank >= tp)
        return hx_err_set(err, HX_EINVAL, "KV heads: rank %d of tp %d over %d KV heads", rank,
                          tp, kv_heads);
    if (kv_heads % tp != 0 && tp % kv_heads != 0)
        return hx_err_set(err, HX_EINVAL,
                          "KV heads: tp %d neither divides nor is a multiple of the %d KV heads",
                          tp, kv_heads);
    int first = (int)((int64_t)rank * kv_heads / tp);
    int end = (int)((int64_t)(rank + 1) * kv_heads / tp);
    *head_first = first;
    *num_heads = end - first > 0 ? end - first : 1;
    return HX_OK;
}

static hx_status check_layout(const char *name, int num_layers, int kv_heads,
                              const hx_kv_stage *st, int n, hx_err *err)
{
    if (n < 1 || !st)
        return hx_err_set(err, HX_EINVAL, "KV plan: the %s layout has no stages", name);
    int64_t next = 0;
    for (int i = 0; i < n; i++) {
        if (st[i].layer_first != next || st[i].num_layers < 1)
            return hx_err_set(err, HX_EINVAL,
                              "KV plan: %s stage %d holds layers [%d, %lld); expected a "
                              "non-empty range from layer %lld",
                              name, i, st[i].layer_first,
                              (long long)st[i].layer_first + st[i].num_layers, (long long)next);
        int f, k;
        hx_status s = hx_kv_rank_heads(kv_heads, st[i].tp, 0, &f, &k, err);
        if (s != HX_OK)
            return hx_err_set(err, s, "KV plan: %s stage %d: tp %d does not suit %d KV heads",
                              name, i, st[i].tp, kv_heads);
        next += st[i].num_layers;
    }
    if (next != num_layers)
        return hx_err_set(err, HX_EINVAL,
                          "KV plan: the %s layout's stages cover %lld layers; the model has %d",
                          name, (long long)next, num_layers);
    return HX_OK;
}

hx_status hx_kv_plan_segments(int num_layers, int kv_heads, const hx_kv_stage *src, int n_src,
                              const hx_kv_stage *dst, int n_dst, hx_kv_piece *out, int cap,
                              int *n_out, hx_err *err)
{
    *n_out = 0;
    if (num_layers < 1 || kv_heads < 1)
        return hx_err_set(err, HX_EINVAL, "KV plan: %d layers, %d KV heads", num_layers,
                          kv_heads);
    hx_status st;
    if ((st = check_layout("source", num_layers, kv_heads, src, n_src, err)) != HX_OK ||
        (st = check_layout("destination", num_layers, kv_heads, dst, n_dst, err)) != HX_OK)
        return st;
    int n = 0;
#define EMIT(ss, sr, ds, dr, l0, nl, h0, nh)                                                 \
    do {                                                                                     \
        if (n < cap)                                                                         \
            out[n] = (hx_kv_piece){ss, sr, ds, dr, l0, nl, h0, nh};                          \
        n++;                                                                                 \
    } while (0)
    for (int ds = 0; ds < n_dst; ds++) {
        const hx_kv_stage *D = &dst[ds];
        for (int dr = 0; dr < D->tp; dr++) {
            int dh0 = 0, dhn = 0;
            hx_kv_rank_heads(kv_heads, D->tp, dr, &dh0, &dhn, NULL);
            for (int ss = 0; ss < n_src; ss++) {
                const hx_kv_stage *S = &src[ss];
                int l0 = S->layer_first > D->layer_first ? S->layer_first : D->layer_first;
                int l1 = S->layer_first + S->num_layers < D->layer_first + D->num_layers
                             ? S->layer_first + S->num_layers
                             : D->layer_first + D->num_layers;
                if (l0 >= l1)
                    continue;
                if (S->tp > kv_heads) {
                    /* each source rank holds one head, replicated on rep ranks: spread */
                    const int rep = S->tp / kv_heads;
                    for (int h = dh0; h < dh0 + dhn; h++)
                        EMIT(ss, h * rep + dr % rep, ds, dr, l0, l1 - l0, h, 1);
                } else {
                    for (int sr = 0; sr < S->tp; sr++) {
                        int sh0 = 0, shn = 0;
                        hx_kv_rank_heads(kv_heads, S->tp, sr, &sh0, &shn, NULL);
                        int h0 = sh0 > dh0 ? sh0 : dh0;
                        int h1 = sh0 + shn < dh0 + dhn ? sh0 + shn : dh0 + dhn;
                        if (h0 < h1)
                            EMIT(ss, sr, ds, dr, l0, l1 - l0, h0, h1 - h0);
                    }
                }
            }
        }
    }
#undef EMIT
    *n_out = n;
    if (n > cap)
        return hx_err_set(err, HX_ERANGE, "KV plan: %d pieces; the array holds %d", n, cap);
    return HX_OK;
}
