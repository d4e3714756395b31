/*
 * tiny.h - small random-weight Llama models in Hugging Face layout, for
 * tests, benchmarks and demos (`hexflow model make-tiny`).
 *
 * A model directory gets three files:
 *
 *   config.json        LlamaForCausalLM, the HF keys (hidden_size, num_hidden_layers,
 *                      num_attention_heads, num_key_value_heads, head_dim,
 *                      intermediate_size, vocab_size, rms_norm_eps, rope_theta,
 *                      max_position_embeddings, tie_word_embeddings: false,
 *                      torch_dtype, bos_token_id, eos_token_id, hidden_act "silu")
 *   model.safetensors  HF tensor names and layouts (Linear weights [out][in]):
 *                        model.embed_tokens.weight                  [vocab][hidden]
 *                        model.layers.{i}.input_layernorm.weight    [hidden]
 *                        model.layers.{i}.self_attn.q_proj.weight   [heads*head_dim][hidden]
 *                        model.layers.{i}.self_attn.k_proj.weight   [kv_heads*head_dim][hidden]
 *                        model.layers.{i}.self_attn.v_proj.weight   [kv_heads*head_dim][hidden]
 *                        model.layers.{i}.self_attn.o_proj.weight   [hidden][heads*head_dim]
 *                        model.layers.{i}.post_attention_layernorm.weight [hidden]
 *                        model.layers.{i}.mlp.gate_proj.weight      [intermediate][hidden]
 *                        model.layers.{i}.mlp.up_proj.weight        [intermediate][hidden]
 *                        model.layers.{i}.mlp.down_proj.weight      [hidden][intermediate]
 *                        model.norm.weight                          [hidden]
 *                        lm_head.weight                             [vocab][hidden]
 *   (with shards N > 1, model.safetensors is instead N files
 *   model-0000k-of-0000N.safetensors, shard k holding the layers [(k-1) L / N,
 *   k L / N), the first also the embedding, the last also the final norm and
 *   lm_head, and model.safetensors.index.json mapping every tensor to its
 *   file, as Hugging Face writes large models)
 *   tokenizer.json     a byte-level BPE tokenizer (GPT-2 byte-to-unicode mapping):
 *                      ids 0..255 are the bytes (id b is byte b), 256 is <s>,
 *                      257 is </s> (both special, in added_tokens; a TemplateProcessing
 *                      post_processor puts <s> before the text, as Llama's does), then one token
 *                      per merge, learnt by BPE from a built-in English text (most
 *                      frequent pair first), up to the vocab size or until no pair
 *                      occurs twice (about 250 merges); ids beyond that are filler
 *                      tokens "<unused_0>", "<unused_1>", ... that no merge produces,
 *                      so that every id of the model decodes.
 *
 * Weights are deterministic in (seed, tensor name): each tensor draws from
 * its own generator seeded by the seed and a hash of its name, uniformly, with
 * standard deviation 1/sqrt(fan_in) for projections and lm_head, about 0.58
 * for the embedding, and 1 +- 0.1 for norm weights, so activations and
 * logits stay of order 1. bf16 and fp16 files hold the fp32 draws rounded to
 * nearest even.
 */
#ifndef HX_TINY_H
#define HX_TINY_H

#include <stdint.h>

#include "common/status.h"
#include "planner/model.h"

#define HX_TINY_BOS_ID 256
#define HX_TINY_EOS_ID 257
/* Refuse models whose weights would exceed this. */
#define HX_TINY_MAX_WEIGHT_BYTES ((int64_t)4 << 30)

/* What to make. Plain value. */
typedef struct hx_tiny_config {
    int num_layers;        /* default 2 */
    int hidden_size;       /* default 64 */
    int num_heads;         /* default 4 */
    int num_kv_heads;      /* default 2 */
    int intermediate_size; /* default 128 */
    int vocab_size;        /* default 512; at least 258 */
    uint64_t seed;         /* default 1 */
    hx_model_dtype dtype;  /* default fp32 */
    double rope_theta;     /* default 10000 */
    double norm_eps;       /* default 1e-5 */
    int max_position_tokens; /* default 2048 */
    int shards;            /* default 1: model.safetensors; N > 1: N shard files and an index */
} hx_tiny_config;

/* Fills *c (caller-owned) with the defaults above. */
void hx_tiny_config_init(hx_tiny_config *c);

/*
 * Checks a configuration: 1 <= layers <= 256; hidden divisible by heads with
 * an even head_dim; kv_heads dividing heads; 1 <= intermediate <= 65536;
 * 258 <= vocab <= 262144; 1 <= shards <= layers; weights at most
 * HX_TINY_MAX_WEIGHT_BYTES.
 * HX_EINVAL naming the field otherwise.
 */
hx_status hx_tiny_config_check(const hx_tiny_config *c, hx_err *err);

/*
 * Writes the model into `dir` (borrowed; created, with its parents, when
 * missing). Refuses with HX_EEXIST when dir/config.json exists. Files are
 * written atomically, config.json last, so a directory with a config.json
 * holds a whole model.
 */
hx_status hx_tiny_write(const char *dir, const hx_tiny_config *c, hx_err *err);

/*
 * Writes only the tokenizer (described above) for a vocabulary of at most
 * `vocab_size` ids to `path` (borrowed), atomically.
 */
hx_status hx_tiny_write_tokenizer(const char *path, int vocab_size, hx_err *err);

/* Parameter count of the model `c` describes. */
int64_t hx_tiny_param_count(const hx_tiny_config *c);

#endif /* HX_TINY_H */
