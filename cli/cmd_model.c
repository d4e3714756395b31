/*
 * cmd_model.c - `hexflow model show NAME|DIR`: a model's architecture,
 * parameters, weight and KV-cache bytes and FLOPs, for people or as JSON;
 * `hexflow model make-tiny --out DIR`: a small random-weight Llama model in
 * Hugging Face layout (runtime/tiny.h).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "common/json.h"
#include "common/table.h"
#include "planner/model.h"
#include "runtime/tiny.h"

#define DEFAULT_CONTEXT_TOKENS 2048
#define MAX_CONTEXT_TOKENS 16777216

static const long long prefill_points[] = {512, 2048};
#define N_PREFILL_POINTS (sizeof prefill_points / sizeof prefill_points[0])

static void usage_model(FILE *fp)
{
    fputs("usage: hexflow model show NAME|DIR [--json] [--dtype bf16|fp16|fp32] [--context N]\n"
          "       hexflow model make-tiny --out DIR [--layers N --hidden N --heads N ...]\n"
          "\n"
          "Describes a model: architecture, parameter count, weight and KV-cache bytes,\n"
          "and FLOPs per token for prefill and decode; or writes a small random-weight\n"
          "Llama model for tests and demos.\n"
          "\n"
          "subcommands:\n"
          "  show NAME|DIR   describe a model (see 'hexflow model show --help')\n"
          "  make-tiny       write a random-weight Llama model in Hugging Face layout\n"
          "                  (see 'hexflow model make-tiny --help')\n"
          "\n"
          "NAME is a preset (llama-2-70b, llama-3-8b, mistral-7b, qwen2.5-72b, opt-30b, ...)\n"
          "found in $" HX_MODEL_DIR_ENV " or the models/ directory of the installation;\n"
          "DIR is a directory holding a Hugging Face config.json, or the path of a .json file.\n",
          fp);
}

static void usage_show(FILE *fp)
{
    char presets[512];
    size_t n = hx_model_preset_list(presets, sizeof presets);
    fputs("usage: hexflow model show NAME|DIR [--json] [--dtype bf16|fp16|fp32] [--context N]\n"
          "\n"
          "Prints a model's architecture, parameter count, weight bytes, KV-cache bytes per\n"
          "token, prefill FLOPs per token (512- and 2048-token prompts) and decode FLOPs per\n"
          "token at a context of N tokens, with a per-component breakdown.\n"
          "\n"
          "  NAME|DIR          a preset name, a directory with config.json, or a .json file\n"
          "  --json            print JSON instead of tables\n"
          "  --dtype TYPE      element type of weights and KV cache: bf16, fp16 or fp32\n"
          "                    (default: the config's torch_dtype, else bf16)\n"
          "  --context N       context length in tokens for decode FLOPs (default 2048)\n"
          "  -h, --help        show this help\n",
          fp);
    if (n > 0)
        fprintf(fp, "\npresets: %s\n", presets);
}

/* ---- formatting for people ------------------------------------------------------ */

/* Drops a trailing ".0"/".00" before the unit: "320.0 KiB" -> "320 KiB". */
static void tidy(char *buf)
{
    char *dot = strchr(buf, '.');
    if (!dot)
        return;
    char *end = dot + 1;
    while (*end >= '0' && *end <= '9')
        end++;
    char *q = end;
    while (q > dot + 1 && q[-1] == '0')
        q--;
    if (q == dot + 1)
        q = dot;
    memmove(q, end, strlen(end) + 1);
}

/* x scaled by the largest step it reaches, 2 decimals below 10, else 1. */
static const char *fmt_scaled(double x, const double *steps, const char *const *names, int n,
                              char *buf, size_t size)
{
    int i = 0;
    while (i + 1 < n && x >= steps[i + 1])
        i++;
    double v = x / steps[i];
    snprintf(buf, size, v < 10 ? "%.2f%s%s" : "%.1f%s%s", v, names[i][0] ? " " : "", names[i]);
    if (i == 0 && x == (double)(long long)x)
        snprintf(buf, size, "%lld%s%s", (long long)x, names[0][0] ? " " : "", names[0]);
    tidy(buf);
    return buf;
}

/* Parameter counts with two decimals, as people quote them: "68.98 B", "262.14 M". */
static const char *fmt_count(double n, char *buf, size_t size)
{
    static const double steps[] = {1e3, 1e6, 1e9, 1e12};
    static const char *const names[] = {"K", "M", "B", "T"};
    if (n < 1e3) {
        snprintf(buf, size, "%lld", (long long)n);
        return buf;
    }
    int i = 0;
    while (i + 1 < 4 && n >= steps[i + 1])
        i++;
    snprintf(buf, size, "%.2f %s", n / steps[i], names[i]);
    return buf;
}

static const char *fmt_bytes(double n, char *buf, size_t size)
{
    static const double steps[] = {1, 1024.0, 1048576.0, 1073741824.0, 1099511627776.0};
    static const char *const names[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    return fmt_scaled(n, steps, names, 5, buf, size);
}

static const char *fmt_flop(double n, char *buf, size_t size)
{
    static const double steps[] = {1, 1e3, 1e6, 1e9, 1e12, 1e15};
    static const char *const names[] = {"FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"};
    if (n < 1e3) {
        snprintf(buf, size, "%.0f FLOP", n);
        return buf;
    }
    return fmt_scaled(n, steps, names, 6, buf, size);
}

/* 68976648192 -> "68,976,648,192" */
static const char *fmt_grouped(long long n, char *buf, size_t size)
{
    char digits[32];
    int len = snprintf(digits, sizeof digits, "%lld", n < 0 ? -n : n);
    size_t o = 0;
    if (n < 0 && o + 1 < size)
        buf[o++] = '-';
    for (int i = 0; i < len && o + 2 < size; i++) {
        if (i > 0 && (len - i) % 3 == 0)
            buf[o++] = ',';
        buf[o++] = digits[i];
    }
    buf[o] = '\0';
    return buf;
}

/* ---- output -------------------------------------------------------------- */

static void embed_label(const hx_model *m, char *buf, size_t size)
{
    snprintf(buf, size, "embedding%s%s", m->learned_positions ? " + positions" : "",
             m->word_embed_dim != m->hidden_size ? " + project_in" : "");
}

static void head_label(const hx_model *m, char *buf, size_t size)
{
    snprintf(buf, size, "%s%slm_head%s", m->has_final_norm ? "final norm + " : "",
             m->word_embed_dim != m->hidden_size ? "project_out + " : "",
             m->tied_embeddings ? " (tied)" : "");
}

static void print_people(const hx_model *m, long long context_tokens)
{
    hx_model_params p;
    hx_model_param_counts(m, &p);
    const double b = m->dtype_bytes;
    char s1[64], s2[64], s3[64], s4[64], s5[64];

    printf("%s", m->name[0] ? m->name : "model");
    if (m->config_path[0])
        printf("  (%s)", m->config_path);
    printf("\n\n");
    printf("  %-16s %s%s%s%s\n", "architecture", hx_model_arch_name(m->arch),
           m->architecture[0] ? " (" : "", m->architecture, m->architecture[0] ? ")" : "");
    printf("  %-16s %d\n", "layers", m->num_layers);
    printf("  %-16s %d\n", "hidden size", m->hidden_size);
    if (m->num_kv_heads == m->num_heads)
        printf("  %-16s %d (KV heads %d)\n", "heads", m->num_heads, m->num_kv_heads);
    else
        printf("  %-16s %d, KV heads %d (grouped-query, %d per KV head)\n", "heads",
               m->num_heads, m->num_kv_heads, m->num_heads / m->num_kv_heads);
    printf("  %-16s %d\n", "head dim", m->head_dim);
    printf("  %-16s %d\n", "intermediate", m->intermediate_size);
    printf("  %-16s %d\n", "vocab", m->vocab_size);
    printf("  %-16s %d tokens", "max positions", m->max_position_tokens);
    if (m->sliding_window_tokens > 0)
        printf(" (sliding window %d)", m->sliding_window_tokens);
    printf("\n");
    printf("  %-16s %s\n", "embeddings", m->tied_embeddings ? "tied to lm_head" : "untied");
    printf("  %-16s %s (%d bytes)\n", "dtype", hx_model_dtype_name(m->dtype), m->dtype_bytes);
    printf("  %-16s %s (%s)\n", "parameters", fmt_count((double)p.total_params, s1, sizeof s1),
           fmt_grouped(p.total_params, s2, sizeof s2));
    printf("  %-16s %s\n", "weights",
           fmt_bytes((double)hx_model_weight_bytes(m), s1, sizeof s1));
    printf("  %-16s %s per token (2 x %d layers x %d KV heads x %d x %d bytes)\n", "KV cache",
           fmt_bytes((double)hx_model_kv_bytes_per_token(m), s1, sizeof s1), m->num_layers,
           m->num_kv_heads, m->head_dim, m->dtype_bytes);
    printf("  %-16s", "prefill");
    for (size_t i = 0; i < N_PREFILL_POINTS; i++) {
        double f = hx_model_prefill_flops(m, prefill_points[i], NULL);
        printf("%s %s per token at %lld tokens", i ? "," : "",
               fmt_flop(f / (double)prefill_points[i], s1, sizeof s1), prefill_points[i]);
    }
    printf("\n");
    printf("  %-16s %s per token at context %lld",
           "decode", fmt_flop(hx_model_decode_flops(m, context_tokens, NULL), s1, sizeof s1),
           context_tokens);
    if (context_tokens > m->max_position_tokens)
        printf(" (beyond max positions %d)", m->max_position_tokens);
    printf("\n\n");

    /* per-component breakdown */
    long long n = context_tokens > 0 ? context_tokens : 1;
    hx_model_flops pf, df;
    hx_model_prefill_flops(m, n, &pf);
    hx_model_decode_flops(m, context_tokens, &df);
    const double dn = (double)n;
    printf("Breakdown (layer rows are one of %d layers; prefill of %lld prompt tokens, "
           "decode at context %lld):\n",
           m->num_layers, n, context_tokens);
    hx_table *t = hx_table_new(5, "COMPONENT", ">PARAMS", ">BYTES", ">PREFILL FLOP/TOKEN",
                               ">DECODE FLOP/TOKEN");
    if (!t) {
        hx_cli_error("out of memory");
        return;
    }
    char label[96];
    embed_label(m, label, sizeof label);
    hx_table_row(t, label, fmt_count((double)p.embed_params, s1, sizeof s1),
                 fmt_bytes((double)p.embed_params * b, s2, sizeof s2),
                 fmt_flop(pf.embed_flops / dn, s3, sizeof s3),
                 fmt_flop(df.embed_flops, s4, sizeof s4));
    hx_table_row(t, "layer: attention q/k/v/o",
                 fmt_count((double)p.layer.attn_params, s1, sizeof s1),
                 fmt_bytes((double)p.layer.attn_params * b, s2, sizeof s2),
                 fmt_flop(pf.layer.attn_proj_flops / dn, s3, sizeof s3),
                 fmt_flop(df.layer.attn_proj_flops, s4, sizeof s4));
    hx_table_row(t, "layer: attention scores", "-", "-",
                 fmt_flop(pf.layer.attn_score_flops / dn, s3, sizeof s3),
                 fmt_flop(df.layer.attn_score_flops, s4, sizeof s4));
    snprintf(label, sizeof label, "layer: mlp (%s)",
             m->gated_mlp ? "gate/up/down" : "fc1/fc2");
    hx_table_row(t, label, fmt_count((double)p.layer.mlp_params, s1, sizeof s1),
                 fmt_bytes((double)p.layer.mlp_params * b, s2, sizeof s2),
                 fmt_flop(pf.layer.mlp_flops / dn, s3, sizeof s3),
                 fmt_flop(df.layer.mlp_flops, s4, sizeof s4));
    snprintf(label, sizeof label, "layer: norms (%s)", m->layer_norm ? "LayerNorm" : "RMSNorm");
    hx_table_row(t, label, fmt_count((double)p.layer.norm_params, s1, sizeof s1),
                 fmt_bytes((double)p.layer.norm_params * b, s2, sizeof s2),
                 fmt_flop(pf.layer.norm_flops / dn, s3, sizeof s3),
                 fmt_flop(df.layer.norm_flops, s4, sizeof s4));
    hx_table_row(t, "layer: total", fmt_count((double)p.layer.total_params, s1, sizeof s1),
                 fmt_bytes((double)p.layer.total_params * b, s2, sizeof s2),
                 fmt_flop(pf.layer.total_flops / dn, s3, sizeof s3),
                 fmt_flop(df.layer.total_flops, s4, sizeof s4));
    snprintf(label, sizeof label, "all %d layers", m->num_layers);
    double all = (double)p.layer.total_params * m->num_layers;
    hx_table_row(t, label, fmt_count(all, s1, sizeof s1), fmt_bytes(all * b, s2, sizeof s2),
                 fmt_flop(pf.layer.total_flops * m->num_layers / dn, s3, sizeof s3),
                 fmt_flop(df.layer.total_flops * m->num_layers, s4, sizeof s4));
    head_label(m, label, sizeof label);
    hx_table_row(t, label, fmt_count((double)p.head_params, s1, sizeof s1),
                 fmt_bytes((double)p.head_params * b, s2, sizeof s2),
                 fmt_flop(pf.head_flops / dn, s3, sizeof s3),
                 fmt_flop(df.head_flops, s4, sizeof s4));
    hx_table_row(t, "total", fmt_count((double)p.total_params, s1, sizeof s1),
                 fmt_bytes((double)p.total_params * b, s2, sizeof s2),
                 fmt_flop(pf.total_flops / dn, s3, sizeof s3),
                 fmt_flop(df.total_flops, s5, sizeof s5));
    hx_table_print(t, stdout);
    hx_table_free(t);
    printf("\nFLOPs count 2 per multiply-add; prefill computes logits for the last prompt "
           "token only.\n");
}

static json_t *flops_json(const hx_model_flops *f)
{
    return json_pack("{s:{s:f,s:f,s:f,s:f,s:f},s:f,s:f,s:f}", "layer", "attn_proj_flops",
                     f->layer.attn_proj_flops, "attn_score_flops", f->layer.attn_score_flops,
                     "mlp_flops", f->layer.mlp_flops, "norm_flops", f->layer.norm_flops,
                     "total_flops", f->layer.total_flops, "embed_flops", f->embed_flops,
                     "head_flops", f->head_flops, "total_flops", f->total_flops);
}

static int print_json(const hx_model *m, long long context_tokens)
{
    json_t *root = hx_model_to_json(m);
    json_t *prefill = json_array();
    hx_model_flops df;
    double decode = hx_model_decode_flops(m, context_tokens, &df);
    int rc = 1;
    if (!root || !prefill)
        goto out;
    long long points[N_PREFILL_POINTS + 1];
    size_t npoints = 0;
    for (size_t i = 0; i < N_PREFILL_POINTS; i++)
        points[npoints++] = prefill_points[i];
    if (context_tokens > 0 && context_tokens != 512 && context_tokens != 2048)
        points[npoints++] = context_tokens;
    for (size_t i = 0; i < npoints; i++) {
        hx_model_flops pf;
        double f = hx_model_prefill_flops(m, points[i], &pf);
        json_t *e = json_pack("{s:I,s:f,s:f,s:o}", "prompt_tokens", (json_int_t)points[i],
                              "flops", f, "flops_per_token", f / (double)points[i], "breakdown",
                              flops_json(&pf));
        if (!e || json_array_append_new(prefill, e) != 0)
            goto out;
    }
    json_t *flops = json_pack("{s:I,s:o,s:{s:I,s:f,s:o}}", "context_tokens",
                              (json_int_t)context_tokens, "prefill", prefill, "decode",
                              "context_tokens", (json_int_t)context_tokens, "flops_per_token",
                              decode, "breakdown", flops_json(&df));
    prefill = NULL; /* json_pack's "o" took it, even on failure */
    if (!flops || json_object_set_new(root, "flops", flops) != 0)
        goto out;
    rc = hx_json_print(root) == HX_OK ? 0 : 1;
out:
    if (rc != 0)
        hx_cli_error("cannot print model as JSON: out of memory");
    json_decref(prefill);
    json_decref(root);
    return rc;
}

/* ---- show ---------------------------------------------------------------- */

static int cmd_show(int argc, char **argv)
{
    static const struct option opts[] = {
        {"json", no_argument, NULL, 'j'},
        {"dtype", required_argument, NULL, 'd'},
        {"context", required_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int json = 0;
    const char *dtype_arg = NULL;
    long long context_tokens = DEFAULT_CONTEXT_TOKENS;
    hx_err err = {0};

    opterr = 0;
    optind = 0; /* restart scanning (glibc: full reinitialisation) */
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'j': json = 1; break;
        case 'd': dtype_arg = optarg; break;
        case 'c': {
            char *end = NULL;
            errno = 0;
            long long v = strtoll(optarg, &end, 10);
            if (errno || end == optarg || *end != '\0' || v < 0 || v > MAX_CONTEXT_TOKENS)
                return hx_cli_usage_error("model show",
                                          "--context: '%s' is not a token count from 0 to %d",
                                          optarg, MAX_CONTEXT_TOKENS);
            context_tokens = v;
            break;
        }
        case 'h': usage_show(stdout); return 0;
        case ':':
            return hx_cli_usage_error("model show", "option '%s' needs a value",
                                      argv[optind - 1]);
        default:
            if (optopt)
                return hx_cli_usage_error("model show", "unknown option '-%c'", optopt);
            return hx_cli_usage_error("model show", "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc)
        return hx_cli_usage_error("model show", "missing model name or directory");
    if (optind + 1 < argc)
        return hx_cli_usage_error("model show", "unexpected argument '%s'", argv[optind + 1]);

    hx_model m;
    hx_status st = hx_model_load(argv[optind], &m, &err);
    if (st != HX_OK)
        return hx_cli_fail(&err);
    if (dtype_arg) {
        hx_model_dtype d;
        if (hx_model_dtype_parse(dtype_arg, &d, &err) != HX_OK) {
            hx_err why = err;
            hx_err_set(&err, HX_EINVAL, "--dtype: %s", why.msg);
            return hx_cli_fail(&err);
        }
        hx_model_set_dtype(&m, d);
    }
    if (json)
        return print_json(&m, context_tokens);
    print_people(&m, context_tokens);
    return 0;
}

/* ---- make-tiny ------------------------------------------------------------ */

static void usage_make_tiny(FILE *fp)
{
    hx_tiny_config d;
    hx_tiny_config_init(&d);
    fprintf(fp,
            "usage: hexflow model make-tiny --out DIR [--layers N] [--hidden N] [--heads N]\n"
            "                               [--kv-heads N] [--intermediate N] [--vocab N]\n"
            "                               [--seed N] [--dtype fp32|bf16|fp16] [--shards N]\n"
            "\n"
            "Writes a small Llama model with random weights in Hugging Face layout:\n"
            "DIR/config.json, DIR/model.safetensors (HF tensor names) and\n"
            "DIR/tokenizer.json (byte-level BPE; ids 0-255 are bytes, 256 <s>, 257 </s>).\n"
            "The weights depend only on the seed and the shape. DIR is created when\n"
            "missing; a DIR that already holds a config.json is refused.\n"
            "\n"
            "  --out DIR          directory to write (required)\n"
            "  --layers N         decoder layers (default %d)\n"
            "  --hidden N         hidden size (default %d)\n"
            "  --heads N          attention heads (default %d)\n"
            "  --kv-heads N       key/value heads, dividing --heads (default %d)\n"
            "  --intermediate N   MLP inner size (default %d)\n"
            "  --vocab N          vocabulary size, at least 258 (default %d)\n"
            "  --seed N           random seed (default %llu)\n"
            "  --dtype TYPE       weight type: fp32, bf16 or fp16 (default fp32)\n"
            "  --shards N         N shard files by layer and model.safetensors.index.json,\n"
            "                     as Hugging Face writes large models (default 1: one file)\n"
            "  -h, --help         show this help\n",
            d.num_layers, d.hidden_size, d.num_heads, d.num_kv_heads, d.intermediate_size,
            d.vocab_size, (unsigned long long)d.seed);
}

/* Parses an integer option in [lo, hi]; 0 (after printing why) when it is not one. */
static int int_option(const char *opt, const char *s, long long lo, long long hi,
                      long long *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end != '\0' || v < lo || v > hi) {
        hx_cli_usage_error("model make-tiny", "%s: '%s' is not an integer from %lld to %lld",
                           opt, s, lo, hi);
        return 0;
    }
    *out = v;
    return 1;
}

static int cmd_make_tiny(int argc, char **argv)
{
    enum {
        O_OUT = 1, O_LAYERS, O_HIDDEN, O_HEADS, O_KV, O_INTER, O_VOCAB, O_SEED, O_DTYPE, O_SHARDS
    };
    static const struct option opts[] = {
        {"out", required_argument, NULL, O_OUT},
        {"layers", required_argument, NULL, O_LAYERS},
        {"hidden", required_argument, NULL, O_HIDDEN},
        {"heads", required_argument, NULL, O_HEADS},
        {"kv-heads", required_argument, NULL, O_KV},
        {"intermediate", required_argument, NULL, O_INTER},
        {"vocab", required_argument, NULL, O_VOCAB},
        {"seed", required_argument, NULL, O_SEED},
        {"dtype", required_argument, NULL, O_DTYPE},
        {"shards", required_argument, NULL, O_SHARDS},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    const char *out = NULL;
    hx_err err = {0};
    long long v;

    opterr = 0;
    optind = 0; /* restart scanning (glibc: full reinitialisation) */
    int ch;
    while ((ch = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (ch) {
        case O_OUT: out = optarg; break;
        case O_LAYERS:
            if (!int_option("--layers", optarg, 1, 256, &v))
                return 2;
            c.num_layers = (int)v;
            break;
        case O_SHARDS:
            if (!int_option("--shards", optarg, 1, 256, &v))
                return 2;
            c.shards = (int)v;
            break;
        case O_HIDDEN:
            if (!int_option("--hidden", optarg, 2, 16384, &v))
                return 2;
            c.hidden_size = (int)v;
            break;
        case O_HEADS:
            if (!int_option("--heads", optarg, 1, 16384, &v))
                return 2;
            c.num_heads = (int)v;
            break;
        case O_KV:
            if (!int_option("--kv-heads", optarg, 1, 16384, &v))
                return 2;
            c.num_kv_heads = (int)v;
            break;
        case O_INTER:
            if (!int_option("--intermediate", optarg, 1, 65536, &v))
                return 2;
            c.intermediate_size = (int)v;
            break;
        case O_VOCAB:
            if (!int_option("--vocab", optarg, 258, 262144, &v))
                return 2;
            c.vocab_size = (int)v;
            break;
        case O_SEED:
            if (!int_option("--seed", optarg, 0, 9007199254740991LL, &v))
                return 2;
            c.seed = (uint64_t)v;
            break;
        case O_DTYPE:
            if (hx_model_dtype_parse(optarg, &c.dtype, &err) != HX_OK)
                return hx_cli_usage_error("model make-tiny", "--dtype: %s", err.msg);
            break;
        case 'h': usage_make_tiny(stdout); return 0;
        case ':':
            return hx_cli_usage_error("model make-tiny", "option '%s' needs a value",
                                      argv[optind - 1]);
        default:
            if (optopt)
                return hx_cli_usage_error("model make-tiny", "unknown option '-%c'", optopt);
            return hx_cli_usage_error("model make-tiny", "unknown option '%s'",
                                      argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error("model make-tiny", "unexpected argument '%s'", argv[optind]);
    if (!out)
        return hx_cli_usage_error("model make-tiny", "missing --out DIR");
    if (hx_tiny_config_check(&c, &err) != HX_OK)
        return hx_cli_fail(&err);
    hx_status st = hx_tiny_write(out, &c, &err);
    if (st == HX_EEXIST) {
        hx_cli_error("%s", err.msg);
        return 2; /* bad input: the directory is taken */
    }
    if (st != HX_OK)
        return hx_cli_fail(&err);
    long long params = (long long)hx_tiny_param_count(&c);
    printf("wrote %s: llama, %d layers, hidden %d, %d heads (%d KV), intermediate %d, "
           "vocab %d, %s, seed %llu, %lld parameters\n",
           out, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
           c.vocab_size, hx_model_dtype_name(c.dtype), (unsigned long long)c.seed, params);
    return 0;
}

int hx_cmd_model(int argc, char **argv)
{
    if (argc < 2)
        return hx_cli_usage_error("model", "missing subcommand; expected 'show' or 'make-tiny'");
    const char *sub = argv[1];
    if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "help") == 0) {
        usage_model(stdout);
        return 0;
    }
    if (strcmp(sub, "show") == 0)
        return cmd_show(argc - 1, argv + 1);
    if (strcmp(sub, "make-tiny") == 0)
        return cmd_make_tiny(argc - 1, argv + 1);
    if (sub[0] == '-')
        return hx_cli_usage_error("model", "unknown option '%s'", sub);
    return hx_cli_usage_error("model", "unknown subcommand '%s'; expected 'show' or 'make-tiny'",
                              sub);
}
