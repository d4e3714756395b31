/*
 * kvcache.h - a paged KV cache for one pipeline stage / tensor-parallel rank,
 * the KV segments that carry a request's cache from a prefill group to a
 * decode group, and the resharding plan between two layouts.
 *
 * ---- the cache ----
 *
 * A cache holds the keys and values of `layers` consecutive layers and
 * `kv_heads` consecutive KV heads (the rank's share; see "Heads across TP
 * ranks" below) in max_blocks fixed-size blocks of block_tokens positions:
 *
 *   storage: [max_blocks][layers][2][kv_heads][block_tokens][head_dim] fp32
 *            (index 0 of [2] is K, 1 is V)
 *
 * A block holds every layer of its positions, so one block table per
 * sequence serves all layers, and the keys of one (layer, head) in one block
 * are block_tokens * head_dim contiguous floats: attention reads a sequence's
 * keys as a few long runs, and packing a segment copies runs of the same
 * length. Blocks are handed out by a free list (LIFO: a freed block is the
 * next one reused) and chained per sequence; a sequence's block table is
 * read out with hx_kvcache_seq_blocks. Appending never allocates memory: the
 * cache's memory is all allocated by hx_kvcache_new (the sequence slot array
 * grows, by doubling, in hx_kvcache_alloc_seq only).
 *
 * Indices: a cache has an origin (layer_first, head_first), the model-wide
 * index of its first layer and first KV head, (0, 0) unless set with
 * hx_kvcache_set_origin. Segment functions (pack, unpack) take and write
 * model-wide indices, so a segment names the same layers and heads on the
 * sending and the receiving side whatever their layouts; every other
 * function takes cache-local indices (0 .. layers-1, 0 .. kv_heads-1).
 *
 * Admission control is the caller's: hx_kvcache_append fails cleanly (with
 * HX_ENOMEM and nothing changed) when the free blocks do not suffice;
 * hx_kvcache_blocks_free, hx_kvcache_tokens_free and hx_kvcache_blocks_needed
 * say beforehand whether it would.
 *
 * ---- KV segments ----
 *
 * A segment is one contiguous buffer holding one sequence's K and V for a
 * range of positions (all of them, 0 .. tokens-1, as hx_kvcache_pack writes
 * it), a layer range and a KV-head range: the unit the KV transfer sends,
 * one per request and per (source stage, source rank, destination stage,
 * destination rank). Layout, all integers little-endian:
 *
 *   offset  size  field
 *        0     4  magic "HXKV"
 *        4     4  version (1)
 *        8     4  header_bytes (64)
 *       12     4  dtype (0: fp32, 2: bf16; the numbering of hx_proto_dtype)
 *       16     4  layer_first     model-wide index of the first layer
 *       20     4  num_layers      >= 1
 *       24     4  head_first      model-wide index of the first KV head
 *       28     4  num_heads       >= 1
 *       32     4  tokens          positions token_first .. token_first+tokens-1, >= 1
 *       36     4  head_dim        >= 1
 *       40     8  payload_bytes   num_layers * 2 * num_heads * tokens * head_dim * (4 or 2)
 *       48     4  token_first     0 from hx_kvcache_pack
 *       52     4  reserved (0)
 *       56     8  checksum        CRC-32C of header bytes 0..55, then the payload (low
 *                                 32 bits; the high 32 are 0)
 *       64     -  payload: [num_layers][2][num_heads][tokens][head_dim] fp32
 *                 (IEEE-754 binary32) or bf16 (the high half of a binary32),
 *                 little-endian; [2] is K then V
 *
 * A segment carries the sender's cache in its own precision, so nothing is
 * lost and nothing is sent twice over: fp32 from a CPU engine's cache
 * (hx_kvcache_pack), bf16 from a GPU engine's, which is half the bytes (and
 * the KV bytes per token the planner's KV links are sized by). A receiver
 * takes either: a fp32 cache widens bf16 exactly, a bf16 cache rounds fp32
 * to nearest even.
 *
 * A reader never trusts a segment: hx_kv_segment_parse checks the magic, the
 * version, the header size, the dtype, that every count is positive and
 * every range fits in an int, that payload_bytes matches the counts, that
 * the buffer is exactly header + payload bytes (shorter: truncated; longer:
 * trailing bytes) and the checksum; hx_kvcache_unpack adds that the head_dim
 * is the cache's and the layer and head ranges lie within the cache's.
 *
 * The payload's layout is that of runtime/proto.h's KV_SEGMENT data, so a
 * transport may send the payload alone with the header's fields in its own
 * message, and the receiver hand those to hx_kvcache_unpack_parsed.
 *
 * ---- heads across TP ranks ----
 *
 * A stage with tensor-parallel degree tp over a model with kv_heads KV heads
 * gives rank r (0 <= r < tp) the contiguous KV heads
 *
 *   first = r * kv_heads / tp  (integer division)
 *   count = (r + 1) * kv_heads / tp - first, or 1 when that is 0
 *
 * which is kv_heads / tp heads each when tp divides kv_heads, and, when
 * tp > kv_heads (kv_heads divides tp), the single head r * kv_heads / tp: a
 * head is then replicated on tp / kv_heads consecutive ranks. Query heads
 * split the same way (rank r's query heads use exactly rank r's KV heads).
 * Other combinations (tp neither dividing nor a multiple of kv_heads) are
 * refused with HX_EINVAL, as query heads would then need KV heads of two
 * ranks.
 *
 * ---- resharding ----
 *
 * When a decode group's layout (stage split, TP degrees) differs from the
 * prefill group's, each destination (stage, rank) assembles its cache from
 * the pieces hx_kv_plan_segments lists: for every source (stage, rank) whose
 * layers and heads overlap its own, one segment holding exactly the overlap.
 * A replicated source head is taken from one of its replicas (spread over
 * destination ranks); a replicated destination head is sent to every rank
 * that holds it. hx_kvcache_unpack writes any such sub-range segment into
 * the sequence's blocks.
 *
 * Threads: a cache is used from one thread at a time.
 *
 * Pointers: the cache is opaque and owned by its creator (hx_kvcache_free);
 * every buffer passed in is borrowed; pointers returned into the cache are
 * valid while the cache lives.
 */
#ifndef HX_KVCACHE_H
#define HX_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "kernels/cpu/paged.h"

typedef struct hx_kvcache hx_kvcache; /* opaque */

/* ---- the cache ------------------------------------------------------------------------------- */

/*
 * A cache of max_blocks blocks of block_tokens positions for `layers`
 * layers, kv_heads KV heads of head_dim floats: max_blocks * layers * 2 *
 * kv_heads * block_tokens * head_dim floats, allocated (and zeroed) here,
 * once. HX_EINVAL for a count below 1, HX_ERANGE when the storage would
 * exceed SIZE_MAX or a block index int, HX_ENOMEM when it cannot be had.
 * *out is freed with hx_kvcache_free.
 */
hx_status hx_kvcache_new(int layers, int kv_heads, int head_dim, int block_tokens,
                         int max_blocks, hx_kvcache **out, hx_err *err);

/* Frees the cache and every sequence in it; NULL is a no-op. */
void hx_kvcache_free(hx_kvcache *c);

/*
 * Sets the model-wide index of the cache's first layer and first KV head
 * (both >= 0; HX_EINVAL otherwise), which segments use. Default (0, 0).
 */
hx_status hx_kvcache_set_origin(hx_kvcache *c, int layer_first, int head_first, hx_err *err);

int hx_kvcache_layers(const hx_kvcache *c);
int hx_kvcache_kv_heads(const hx_kvcache *c);
int hx_kvcache_head_dim(const hx_kvcache *c);
int hx_kvcache_block_tokens(const hx_kvcache *c);
int hx_kvcache_max_blocks(const hx_kvcache *c);
int hx_kvcache_layer_first(const hx_kvcache *c); /* origin */
int hx_kvcache_head_first(const hx_kvcache *c);  /* origin */
int64_t hx_kvcache_block_bytes(const hx_kvcache *c); /* one block, all layers, K and V */

/* ---- admission ------------------------------------------------------------------------------- */

int hx_kvcache_blocks_free(const hx_kvcache *c);
/* Positions the free blocks hold: blocks_free * block_tokens. */
int64_t hx_kvcache_tokens_free(const hx_kvcache *c);
/* Blocks that `tokens` positions take: ceil(tokens / block_tokens) (0 for tokens <= 0). */
int hx_kvcache_blocks_for(const hx_kvcache *c, int64_t tokens);
/*
 * Blocks hx_kvcache_append(c, seq, more_tokens) would take from the free
 * list (the sequence's last block may have room); -1 for an unknown seq.
 */
int hx_kvcache_blocks_needed(const hx_kvcache *c, int seq, int more_tokens);

/* ---- sequences ------------------------------------------------------------------------------- */

/*
 * A new, empty sequence (no blocks); *seq is its id, >= 0, reused after
 * hx_kvcache_free_seq. HX_ENOMEM when the slot array cannot grow.
 */
hx_status hx_kvcache_alloc_seq(hx_kvcache *c, int *seq, hx_err *err);

/* Returns every block of seq to the free list and ends it; an unknown id is a no-op. */
void hx_kvcache_free_seq(hx_kvcache *c, int seq);

/*
 * Makes room for n more positions (n >= 0) at the end of seq: its length
 * becomes tokens + n, taking blocks from the free list as needed. All or
 * nothing: HX_ENOMEM (out of blocks; the message says how many are needed
 * and free) leaves the sequence and the free list as they were. The new
 * positions hold whatever their blocks last held until written.
 * HX_EINVAL for an unknown seq or n < 0, HX_ERANGE when the length would
 * pass INT_MAX.
 */
hx_status hx_kvcache_append(hx_kvcache *c, int seq, int n, hx_err *err);

/* Positions in seq (0 for an unknown seq). */
int hx_kvcache_seq_tokens(const hx_kvcache *c, int seq);

/*
 * seq's block table: writes its block ids, in position order, to blocks
 * (caller-owned, [cap]; may be NULL when cap is 0) and returns how many it
 * has (which may exceed cap: then only cap are written); -1 for an unknown
 * seq. Position p lives in blocks[p / block_tokens] at offset p % block_tokens.
 */
int hx_kvcache_seq_blocks(const hx_kvcache *c, int seq, int *blocks, int cap);

/* Live sequences. */
int hx_kvcache_seq_count(const hx_kvcache *c);

/*
 * Checks the allocator's invariants: every block is either on the free list
 * or in exactly one sequence's chain, chain lengths match the sequences'
 * lengths, and the free count matches the free list. HX_EINTERNAL naming the
 * first violation. For tests; O(max_blocks).
 */
hx_status hx_kvcache_check(const hx_kvcache *c, hx_err *err);

/* ---- access ---------------------------------------------------------------------------------- */

/*
 * The [block_tokens][head_dim] keys (kv 0) or values (kv 1) of local layer
 * `layer` and local KV head `head` in block `block`. No bounds checks (hot
 * path): the caller passes indices within the cache.
 */
float *hx_kvcache_block_data(hx_kvcache *c, int block, int layer, int kv, int head);

/*
 * The [head_dim] keys (kv 0) or values (kv 1) of position pos of seq; NULL
 * when seq, layer, kv, head or pos is out of range. Walks the block chain
 * (O(pos / block_tokens)): for tests and tools, not for hot paths, which
 * read the block table once.
 */
float *hx_kvcache_row(hx_kvcache *c, int seq, int layer, int kv, int head, int pos);

/* Local layer `layer`'s K and V as the paged attention kernel reads them. */
void hx_kvcache_layer_view(const hx_kvcache *c, int layer, hx_cpu_paged_kv *out);

/*
 * Copies positions 0 .. tokens-1 of local (layer, head) of seq into k and v
 * (caller-owned, [tokens][head_dim] each; either may be NULL), tokens being
 * the sequence's length. HX_EINVAL for an unknown seq or out-of-range index.
 */
hx_status hx_kvcache_gather(const hx_kvcache *c, int seq, int layer, int head, float *k,
                            float *v, hx_err *err);

/* ---- KV segments ----------------------------------------------------------------------------- */

#define HX_KV_SEGMENT_MAGIC "HXKV"
#define HX_KV_SEGMENT_VERSION 1
#define HX_KV_SEGMENT_HEADER_BYTES 64
#define HX_KV_DTYPE_F32 0  /* as HX_PROTO_DTYPE_F32 */
#define HX_KV_DTYPE_BF16 2 /* as HX_PROTO_DTYPE_BF16 */

/* Bytes of one element of a segment of this dtype: 4, 2, or 0 for a dtype segments do not use. */
int hx_kv_dtype_bytes(int dtype);

/* A segment's decoded header. Plain value; payload is borrowed from the buffer. */
typedef struct hx_kv_segment {
    int version;
    int dtype;              /* HX_KV_DTYPE_F32 or HX_KV_DTYPE_BF16 */
    int layer_first;        /* model-wide */
    int num_layers;
    int head_first;         /* model-wide */
    int num_heads;
    int token_first;        /* first position */
    int tokens;             /* positions token_first .. token_first + tokens - 1 */
    int head_dim;
    uint64_t payload_bytes;
    uint64_t checksum;      /* the stored field: CRC-32C in the low 32 bits */
    const void *payload;    /* [num_layers][2][num_heads][tokens][head_dim] of dtype, borrowed */
} hx_kv_segment;

/*
 * CRC-32C (Castagnoli; iSCSI, ext4; check value 0xe3069283 for "123456789")
 * of data[0..n) (borrowed), continuing from crc (0 to start; pass a previous
 * result to checksum data in pieces, as zlib's crc32). Uses the SSE4.2
 * instruction where the CPU has it (about 10 GB/s), a table otherwise.
 */
uint32_t hx_kv_crc32c(uint32_t crc, const void *data, size_t n);

/*
 * Bytes of a segment (header and payload) of dtype with these counts; 0 for
 * an unknown dtype, a count below 1, or a size that would overflow size_t.
 */
size_t hx_kv_segment_bytes(int dtype, int num_layers, int num_heads, int tokens, int head_dim);

/*
 * A segment written in pieces, by an engine that fills the payload itself
 * (a GPU copying it out): hx_kv_segment_begin writes the header of a
 * segment of these counts (checksum 0) into seg (hx_kv_segment_bytes of
 * room); once the payload is there, hx_kv_segment_seal stores the checksum
 * crc, which is hx_kv_crc32c over the payload continued from
 * hx_kv_segment_header_crc(seg) (so the payload may be checksummed in
 * pieces, on several threads).
 */
void hx_kv_segment_begin(void *seg, int dtype, int layer_first, int num_layers, int head_first,
                         int num_heads, int tokens, int head_dim);
uint32_t hx_kv_segment_header_crc(const void *seg);
void hx_kv_segment_seal(void *seg, uint32_t crc);

/*
 * Decodes and validates the segment in seg[0..size) (borrowed) as described
 * above, into *out. HX_EPARSE for a bad magic, header size, dtype, count,
 * size or checksum; HX_ENOTSUP for another version or a big-endian host.
 * A payload not aligned to its element size is refused (HX_EINVAL):
 * buffers from malloc always are.
 */
hx_status hx_kv_segment_parse(const void *seg, size_t size, hx_kv_segment *out, hx_err *err);

/*
 * Packs positions 0 .. tokens-1 (all of seq's) of the model-wide layers
 * [layer_first, layer_first + num_layers) and KV heads [head_first,
 * head_first + num_heads) of seq into out[0..out_size) (caller-owned) as a
 * fp32 segment, which must hold hx_kv_segment_bytes(HX_KV_DTYPE_F32,
 * num_layers, num_heads, tokens, head_dim) bytes and be 4-byte aligned;
 * *out_bytes (may be NULL) gets that size. HX_EINVAL for an unknown or empty seq or a range outside the cache,
 * HX_ERANGE for a buffer too small.
 */
hx_status hx_kvcache_pack(const hx_kvcache *c, int seq, int layer_first, int num_layers,
                          int head_first, int num_heads, void *out, size_t out_size,
                          size_t *out_bytes, hx_err *err);

/*
 * Validates the segment seg[0..size) (borrowed) with hx_kv_segment_parse and
 * writes it into seq with hx_kvcache_unpack_parsed.
 */
hx_status hx_kvcache_unpack(hx_kvcache *c, int seq, const void *seg, size_t size, hx_err *err);

/*
 * Writes a decoded segment (*g and its payload borrowed; from
 * hx_kv_segment_parse, or filled from a transport's message) into positions
 * token_first .. token_first + tokens - 1 of seq. Checks, whatever filled
 * *g: dtype fp32 or bf16 (widened exactly), counts >= 1, token_first >= 0,
 * payload_bytes matching the counts, a non-NULL payload aligned to its
 * element size, head_dim the cache's, and the
 * layers and heads (model-wide) within the cache's: HX_EINVAL naming the
 * field otherwise. When seq holds fewer than token_first + tokens positions
 * it is first extended to that many (HX_ENOMEM, nothing changed, when the
 * blocks do not suffice); positions no segment has written hold whatever
 * their blocks last held. Unpacking the segments of one request in any order
 * assembles the cache.
 */
hx_status hx_kvcache_unpack_parsed(hx_kvcache *c, int seq, const hx_kv_segment *g,
                                   hx_err *err);

/*
 * A contiguous KV cache such as hx_llama_state's (see runtime/llama_weights.h):
 *   k, v: [layers][kv_heads][max_tokens][head_dim] (borrowed)
 * holding model-wide layers layer_first .. and KV heads head_first ...
 */
typedef struct hx_kv_contiguous {
    const float *k;
    const float *v;
    int layer_first, layers;
    int head_first, kv_heads;
    int max_tokens, head_dim;
} hx_kv_contiguous;

/*
 * Packs positions 0 .. tokens-1 of the model-wide layer and head ranges of a
 * contiguous cache, as hx_kvcache_pack does from a paged one (the same
 * bytes for the same contents). HX_EINVAL for ranges outside src or tokens
 * outside [1, max_tokens], HX_ERANGE for a buffer too small.
 */
hx_status hx_kv_pack_contiguous(const hx_kv_contiguous *src, int tokens, int layer_first,
                                int num_layers, int head_first, int num_heads, void *out,
                                size_t out_size, size_t *out_bytes, hx_err *err);

/* ---- heads across TP ranks, and resharding --------------------------------------------------- */

/*
 * The KV heads [*head_first, *head_first + *num_heads) of rank `rank` of a
 * stage of degree tp over kv_heads heads (rule above). HX_EINVAL for
 * kv_heads < 1, tp < 1, rank outside [0, tp), or tp neither dividing nor a
 * multiple of kv_heads.
 */
hx_status hx_kv_rank_heads(int kv_heads, int tp, int rank, int *head_first, int *num_heads,
                           hx_err *err);

/* One pipeline stage of a layout. Plain value. */
typedef struct hx_kv_stage {
    int layer_first;
    int num_layers;
    int tp; /* tensor-parallel degree: ranks 0 .. tp-1 */
} hx_kv_stage;

/* One segment to send: the overlap of a source and a destination (stage, rank). */
typedef struct hx_kv_piece {
    int src_stage, src_rank;
    int dst_stage, dst_rank;
    int layer_first, num_layers; /* model-wide */
    int head_first, num_heads;   /* model-wide */
} hx_kv_piece;

/*
 * Lists the segments that move a request's KV from the source layout
 * src[0..n_src) to the destination layout dst[0..n_dst) of a model of
 * num_layers layers and kv_heads KV heads. Each layout's stages must cover
 * layers 0 .. num_layers-1 in order without gaps or overlaps, and each
 * stage's tp must suit kv_heads (see hx_kv_rank_heads); HX_EINVAL naming the
 * layout and stage otherwise.
 *
 * Pieces come ordered by destination stage, destination rank, source stage,
 * source rank; every (layer, head) of every destination rank is covered by
 * exactly one piece. Writes up to cap pieces to out (caller-owned, may be
 * NULL when cap is 0) and sets *n_out to the number there are; HX_ERANGE when
 * that exceeds cap (call with cap 0 to size the array).
 */
hx_status hx_kv_plan_segments(int num_layers, int kv_heads, const hx_kv_stage *src, int n_src,
                              const hx_kv_stage *dst, int n_dst, hx_kv_piece *out, int cap,
                              int *n_out, hx_err *err);

#endif /* HX_KVCACHE_H */
