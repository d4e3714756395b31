/*
 * model.h - model descriptors: a Hugging Face config.json read into a plain
 * value struct, and the arithmetic the planner needs from it (parameters,
 * weight bytes, KV-cache bytes, FLOPs), all exact and closed-form.
 *
 * Supported families (config.json `model_type`):
 *
 *   llama    RMSNorm, rotary positions, SwiGLU MLP (gate/up/down), no biases
 *            unless `attention_bias` (q/k/v/o) or `mlp_bias` (gate/up/down).
 *   mistral  as llama; `sliding_window` limits attention to the last W keys.
 *   qwen2    as llama, with biases on q/k/v (not o). Qwen2's per-layer
 *            sliding window (`use_sliding_window`, off in every released
 *            Qwen2/2.5 model) is ignored: attention is full.
 *   opt      pre-LayerNorm (weight + bias), ReLU MLP fc1/fc2, biases on every
 *            linear layer (`enable_bias`), learned positional embeddings of
 *            max_position_embeddings + 2 rows, project_in/project_out when
 *            word_embed_proj_dim != hidden_size, lm_head tied by default.
 *
 * Names and paths (hx_model_load):
 *
 *   - a directory holding config.json, or a path to a .json file (any regular
 *     file), is read directly;
 *   - anything else is a preset name, resolved as <models dir>/<name>/config.json
 *     (case-insensitive). The models dir is the first of: $HEXFLOW_MODELS_DIR;
 *     <dir of the running executable>/../models, /../../models,
 *     /../share/hexflow/models; the compile-time HX_MODELS_DIR.
 *
 * Errors (every message names the file and the field):
 *
 *   HX_ENOENT  unknown preset or missing file:
 *              unknown model 'llama-2-7'; expected a preset (llama-2-13b, ...) or a
 *              directory with config.json; did you mean 'llama-2-7b'?
 *   HX_EPARSE  not JSON, not a JSON object, a required field missing or of the
 *              wrong type:  model config 'x/config.json': hidden_size: missing
 *   HX_EINVAL  a value out of bounds, not dividing, or not supported:
 *              model config 'x/config.json': num_key_value_heads: 7 does not
 *              divide num_attention_heads 64
 *
 * Required fields: hidden_size, num_hidden_layers, num_attention_heads,
 * intermediate_size (OPT: ffn_dim), vocab_size, and model_type (or
 * architectures[0] naming one of LlamaForCausalLM, MistralForCausalLM,
 * Qwen2ForCausalLM, OPTForCausalLM). Others take the Hugging Face defaults.
 * Bounds: 1 <= layers <= 1024, hidden <= 131072, heads <= 1024, head_dim <=
 * 1024, kv_heads divides heads, hidden % heads == 0 unless `head_dim` is
 * given, intermediate <= 1048576, vocab <= 4194304, max positions <= 16777216.
 * Within these bounds every count below fits int64_t without overflow.
 *
 * Notation for the formulas: L layers, h hidden_size, H heads, K kv heads,
 * d head_dim, f intermediate_size, V vocab_size, P max_position_embeddings,
 * e word-embedding width (OPT word_embed_proj_dim, else h), W sliding window
 * (infinite when absent), b dtype bytes.
 */
#ifndef HX_MODEL_H
#define HX_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "common/json.h"
#include "common/status.h"

#define HX_MODEL_NAME_MAX 128
#define HX_MODEL_PATH_MAX 4096

/* Environment variable naming the directory of presets. */
#define HX_MODEL_DIR_ENV "HEXFLOW_MODELS_DIR"

typedef enum hx_model_arch {
    HX_MODEL_ARCH_LLAMA = 0,
    HX_MODEL_ARCH_MISTRAL = 1,
    HX_MODEL_ARCH_QWEN2 = 2,
    HX_MODEL_ARCH_OPT = 3
} hx_model_arch;

/* Weight (and KV-cache) element type. */
typedef enum hx_model_dtype {
    HX_MODEL_DTYPE_BF16 = 0, /* 2 bytes */
    HX_MODEL_DTYPE_FP16 = 1, /* 2 bytes */
    HX_MODEL_DTYPE_FP32 = 2  /* 4 bytes */
} hx_model_dtype;

/*
 * A model's architecture. Plain value: copy it freely; it owns no memory.
 * All layers of the supported families are alike, so one layer describes all.
 */
typedef struct hx_model {
    char name[HX_MODEL_NAME_MAX];          /* preset name, or the model directory's name */
    char config_path[HX_MODEL_PATH_MAX];   /* file it was read from; "" when from memory */
    char architecture[HX_MODEL_NAME_MAX];  /* architectures[0] ("LlamaForCausalLM"), or "" */
    hx_model_arch arch;
    int num_layers;            /* L: num_hidden_layers */
    int hidden_size;           /* h */
    int num_heads;             /* H: num_attention_heads */
    int num_kv_heads;          /* K: num_key_value_heads (== H without GQA) */
    int head_dim;              /* d: head_dim, or hidden_size / num_heads */
    int intermediate_size;     /* f: MLP inner width (OPT: ffn_dim) */
    int vocab_size;            /* V */
    int max_position_tokens;   /* P: max_position_embeddings */
    int word_embed_dim;        /* e: OPT word_embed_proj_dim; hidden_size otherwise */
    int sliding_window_tokens; /* W: keys a query sees at most; 0 = full attention */
    int tied_embeddings;       /* lm_head shares the token-embedding matrix */
    int has_qkv_bias;          /* q/k/v projections have biases (qwen2, OPT) */
    int has_o_bias;            /* o projection has a bias (OPT, llama attention_bias) */
    int has_mlp_bias;          /* MLP projections have biases (OPT, llama mlp_bias) */
    int gated_mlp;             /* 1: gate/up/down (SwiGLU); 0: fc1/fc2 */
    int layer_norm;            /* 1: LayerNorm (OPT); 0: RMSNorm */
    int norm_params_per_dim;   /* a: affine parameters per norm per hidden unit (RMS 1, LN 2, 0) */
    int has_final_norm;        /* a norm after the last layer */
    int learned_positions;     /* OPT: learned (P + 2) x h positional table */
    double rope_theta;         /* rotary base; 0 without rotary positions */
    double norm_eps;
    hx_model_dtype dtype;      /* from torch_dtype (default bf16); see hx_model_set_dtype */
    int dtype_bytes;           /* b */
} hx_model;

/* Parameter counts of one decoder layer (weights and biases). */
typedef struct hx_model_layer_params {
    int64_t attn_params; /* h*H*d + 2*h*K*d + H*d*h  [+ H*d + 2*K*d qkv bias] [+ h o bias] */
    int64_t mlp_params;  /* gated: 3*h*f [+ 2*f + h bias];  OPT: 2*h*f [+ f + h bias] */
    int64_t norm_params; /* 2 norms * a*h */
    int64_t total_params;
} hx_model_layer_params;

/* Parameter counts of the whole model. */
typedef struct hx_model_params {
    hx_model_layer_params layer; /* one layer; all L are alike */
    int64_t embed_params;   /* V*e [+ (P+2)*h learned positions] [+ e*h project_in if e != h] */
    int64_t lm_head_params; /* the output matrix e*V, whether tied or not */
    int64_t head_params;    /* [a*h final norm] [+ h*e project_out] [+ e*V lm_head unless tied] */
    int64_t total_params;   /* L*layer.total + embed + head (a tied matrix counts once) */
} hx_model_params;

/*
 * FLOPs by component. A matrix multiply counts 2 FLOPs per multiply-add
 * (2*in*out per token for a linear layer), a bias add 1 per output. Norms
 * count 4*h per token (RMSNorm: square, sum, scale, weight) or 7*h
 * (LayerNorm: sum, subtract, square, sum, scale, weight, bias). Not counted:
 * embedding lookups (a gather), OPT's positional add, rotary embeddings,
 * softmax, activation functions and residual adds (each O(h) or O(H*ctx)
 * elementwise, well under 0.1% of the total).
 *
 * Attention scores: a query that attends to k keys costs 4*H*d*k per layer
 * (QK^T: 2*H*d*k, AV: 2*H*d*k), with k = min(keys, W).
 */
typedef struct hx_model_layer_flops {
    double attn_proj_flops;  /* q/k/v/o projections: 2*(attn weights) + bias outputs per token */
    double attn_score_flops; /* QK^T and AV */
    double mlp_flops;        /* 2*(MLP weights) + bias outputs per token */
    double norm_flops;       /* the layer's two norms */
    double total_flops;
} hx_model_layer_flops;

typedef struct hx_model_flops {
    hx_model_layer_flops layer; /* one layer; all L are alike */
    double embed_flops;         /* input side: lookup is 0; OPT project_in 2*e*h per token */
    double head_flops;          /* final norm + project_out 2*h*e + lm_head 2*e*V, per token */
    double total_flops;         /* L*layer.total + embed + head */
} hx_model_flops;

/* ---- dtype -------------------------------------------------------------- */

/*
 * Parses "bf16"/"bfloat16", "fp16"/"float16"/"half", "fp32"/"float32"/"float"
 * (case-insensitive). HX_EINVAL, with a message naming the accepted values,
 * otherwise. `s` is borrowed.
 */
hx_status hx_model_dtype_parse(const char *s, hx_model_dtype *out, hx_err *err);

/* "bf16", "fp16", "fp32" (static strings). */
const char *hx_model_dtype_name(hx_model_dtype dtype);

/* 2, 2, 4. */
int hx_model_dtype_bytes(hx_model_dtype dtype);

/* Overrides the dtype read from torch_dtype (sets dtype and dtype_bytes). */
void hx_model_set_dtype(hx_model *m, hx_model_dtype dtype);

/* "llama", "mistral", "qwen2", "opt" (static strings). */
const char *hx_model_arch_name(hx_model_arch arch);

/* ---- loading ------------------------------------------------------------ */

/*
 * Resolves `name_or_path` (borrowed) as described at the top of this file and
 * reads it into *out (caller-owned; written only on success).
 */
hx_status hx_model_load(const char *name_or_path, hx_model *out, hx_err *err);

/*
 * Reads one config file. `config_path` is borrowed; `name` (borrowed, may be
 * NULL) names the model, else it is derived from the path (the directory of
 * a config.json, or the file's stem).
 */
hx_status hx_model_load_file(const char *config_path, const char *name, hx_model *out,
                             hx_err *err);

/*
 * Builds a model from a parsed config object. `root` is borrowed (the caller
 * keeps its reference). `config_path` (borrowed, may be NULL) is only used in
 * messages and copied into out->config_path; `name` (borrowed, may be NULL)
 * becomes out->name ("" when NULL). *out is written only on success.
 */
hx_status hx_model_from_json(const json_t *root, const char *config_path, const char *name,
                             hx_model *out, hx_err *err);

/*
 * Writes the directory of presets into buf (caller-owned, `size` bytes),
 * searching in the order given at the top of this file. HX_ENOENT when none
 * exists, or when $HEXFLOW_MODELS_DIR is set and is not a directory.
 */
hx_status hx_model_models_dir(char *buf, size_t size, hx_err *err);

/*
 * Writes the preset names found in the models dir, sorted and joined with
 * ", ", into buf (caller-owned; "" when there are none; a long list ends in
 * ", ..."). Returns the number of presets found.
 */
size_t hx_model_preset_list(char *buf, size_t size);

/* ---- arithmetic (m is borrowed; all functions are pure) ------------------ */

/* Exact parameter counts, by component (formulas in hx_model_params). */
void hx_model_param_counts(const hx_model *m, hx_model_params *out);

/* Total parameters (a tied lm_head counted once). */
int64_t hx_model_param_count(const hx_model *m);

/* All weights: total_params * b. */
int64_t hx_model_weight_bytes(const hx_model *m);

/* One decoder layer's weights: layer.total_params * b. */
int64_t hx_model_layer_weight_bytes(const hx_model *m);

/* Input-side weights held by the first pipeline stage: embed_params * b. */
int64_t hx_model_embed_weight_bytes(const hx_model *m);

/*
 * Output-side weights held by the last pipeline stage: head_params * b, plus
 * lm_head_params * b when the embeddings are tied (the last stage of a
 * multi-stage pipeline needs its own copy of the shared matrix).
 */
int64_t hx_model_head_weight_bytes(const hx_model *m);

/*
 * Weights of a pipeline stage holding layers [first_layer, first_layer +
 * num_layers): num_layers layers, plus the embedding when it holds layer 0,
 * plus the head when it holds the last layer (a tied matrix counted once when
 * the stage holds both). num_layers >= 1 and the range must lie within the
 * model, else HX_EINVAL. Summed over the stages of a one-stage pipeline this
 * is hx_model_weight_bytes().
 */
hx_status hx_model_stage_weight_bytes(const hx_model *m, int first_layer, int num_layers,
                                      int64_t *out_bytes, hx_err *err);

/* KV cache per token: 2 (K and V) * L * K * d * b. */
int64_t hx_model_kv_bytes_per_token(const hx_model *m);

/*
 * FLOPs to prefill a causal prompt of n_tokens (all tokens, not per token;
 * 0 when n_tokens <= 0):
 *
 *   n * (L * (proj + mlp + norms) + embed)         per-token parts, every token
 *   + L * 4*H*d * sum_{i=1..n} min(i, W)           attention: query i sees i keys
 *       = L * 2*H*d * n*(n+1)                      without a window (or n <= W)
 *   + head                                         logits for the last token only
 *
 * The lm_head (and final norm) runs once, for the token that is sampled, as
 * serving engines do; add (n - 1) * head_flops for a training-style count.
 * With out (caller-owned, may be NULL) the breakdown, whose per-layer values
 * are totals over the prompt for one layer.
 */
double hx_model_prefill_flops(const hx_model *m, int64_t n_tokens, hx_model_flops *out);

/*
 * FLOPs to decode one token that attends to context_tokens keys (the tokens
 * in the KV cache, counting itself; negative counts as 0):
 *
 *   L * (proj + mlp + norms + 4*H*d*min(c, W)) + embed + head
 *   ~= 2 * (params - lookups + tied)  +  4*L*H*d*min(c, W)
 *
 * where lookups = V*e [+ (P+2)*h for OPT] are the embedding tables (a gather,
 * no arithmetic) and tied = e*V when the lm_head shares the token embedding
 * (counted once in params, but multiplied with as the lm_head).
 *
 * With out (caller-owned, may be NULL) the breakdown for that token.
 */
double hx_model_decode_flops(const hx_model *m, int64_t context_tokens, hx_model_flops *out);

/*
 * The model as a JSON object (a new reference, NULL when out of memory):
 * name, config, model_type, architecture, num_layers, hidden_size, num_heads,
 * num_kv_heads, head_dim, intermediate_size, vocab_size, max_position_tokens,
 * sliding_window_tokens, tied_embeddings, qkv_bias, dtype, dtype_bytes, params,
 * weight_bytes, kv_bytes_per_token, and "layer", "embed", "head" objects
 * with params and weight_bytes (layer also split into attn/mlp/norm params).
 * "head" is what the last pipeline stage holds, so with tied embeddings it
 * includes the shared matrix (as hx_model_head_weight_bytes does).
 */
json_t *hx_model_to_json(const hx_model *m);

#endif /* HX_MODEL_H */
