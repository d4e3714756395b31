/*
 * cmd_generate.c - `hexflow generate --model DIR --prompt TEXT`: tokenizes a
 * prompt, runs the Llama forward pass on the CPU and prints the continuation
 * (streamed for people; {"tokens": [...], "text": "..."} with --json).
 */
#define _POSIX_C_SOURCE 200809L
#include "cli/cmd_generate.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "common/file.h"
#include "common/json.h"
#include "runtime/backend.h"
#include "runtime/llama.h"
#include "runtime/tokenizer.h"

#define CMD "generate"
#define DEFAULT_MAX_TOKENS 64
#define MAX_PROMPT_IDS 1048576

static void usage(FILE *fp)
{
    fprintf(fp,
            "usage: hexflow generate --model DIR (--prompt TEXT | --prompt-ids IDS)\n"
            "                        [--max-tokens N] [--temperature T] [--top-p P]\n"
            "                        [--seed S] [--threads N] [--stats] [--json]\n"
            "                        [--backend cpu|cuda]\n"
            "\n"
            "Runs a Llama-family model on this machine's CPU (one process, fp32) and\n"
            "prints the text it generates after the prompt. DIR is a Hugging Face model\n"
            "directory: config.json, model.safetensors (or an index and shards) and\n"
            "tokenizer.json. Generation stops at the end-of-sequence token or after\n"
            "--max-tokens tokens.\n"
            "\n"
            "  --model DIR        the model directory (required)\n"
            "  --prompt TEXT      the prompt, tokenized with DIR/tokenizer.json (BOS added\n"
            "                     when the tokenizer's template adds it)\n"
            "  --prompt-ids IDS   the prompt as token ids, e.g. 256,423,99 (no tokenizer\n"
            "                     needed; the text is printed when DIR has one)\n"
            "  --max-tokens N     tokens to generate at most (default %d)\n"
            "  --temperature T    0 for greedy decoding (default 0)\n"
            "  --top-p P          nucleus sampling mass in (0, 1]; 1 samples from the\n"
            "                     whole distribution (default 1)\n"
            "  --seed S           seed of the sampler (default 1)\n"
            "  --threads N        CPU threads (default $HEXFLOW_THREADS, else all CPUs)\n"
            "  --stats            print token counts and tokens/s to stderr\n"
            "  --backend NAME     cpu (fp32, the reference; default) or cuda (bf16 on GPU 0,\n"
            "                     the engine `hexflow worker --backend cuda` runs)\n"
            "  --json             print {\"tokens\": [...], \"text\": \"...\",\n"
            "                     \"finish_reason\": \"stop\"|\"length\"} (generated part only;\n"
            "                     invalid UTF-8 in the text becomes U+FFFD)\n"
            "  -h, --help         show this help\n",
            DEFAULT_MAX_TOKENS);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* "1,2,3" -> ids (caller frees); 0 after printing the problem. */
static int parse_ids(const char *s, int **out, int *n_out)
{
    int cap = 16, n = 0;
    int *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids) {
        hx_cli_error("out of memory");
        return 0;
    }
    const char *p = s;
    while (*p) {
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX || (*end != ',' && *end != '\0')) {
            hx_cli_usage_error(CMD, "--prompt-ids: '%s' is not a comma-separated list of "
                               "token ids", s);
            free(ids);
            return 0;
        }
        if (n == MAX_PROMPT_IDS) {
            hx_cli_usage_error(CMD, "--prompt-ids: more than %d ids", MAX_PROMPT_IDS);
            free(ids);
            return 0;
        }
        if (n == cap) {
            int *g = realloc(ids, (size_t)cap * 2 * sizeof *ids);
            if (!g) {
                free(ids);
                hx_cli_error("out of memory");
                return 0;
            }
            ids = g;
            cap *= 2;
        }
        ids[n++] = (int)v;
        p = *end == ',' ? end + 1 : end;
    }
    if (n == 0) {
        hx_cli_usage_error(CMD, "--prompt-ids: no ids");
        free(ids);
        return 0;
    }
    *out = ids;
    *n_out = n;
    return 1;
}

/* Copies `len` bytes into a new string, replacing invalid UTF-8 with U+FFFD. */
static char *utf8_sanitize(const char *s, size_t len)
{
    char *out = malloc(3 * len + 1);
    if (!out)
        return NULL;
    size_t o = 0, i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)s[i];
        size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 && c >= 0xC2 ? 2 : (c & 0xF0) == 0xE0 ? 3
                                 : (c & 0xF8) == 0xF0 && c <= 0xF4 ? 4 : 0;
        int ok = n > 0 && i + n <= len && c != 0;
        for (size_t k = 1; ok && k < n; k++)
            ok = ((unsigned char)s[i + k] & 0xC0) == 0x80;
        if (ok && n == 3) { /* no overlongs, no surrogates */
            unsigned char c1 = (unsigned char)s[i + 1];
            ok = !(c == 0xE0 && c1 < 0xA0) && !(c == 0xED && c1 >= 0xA0);
        } else if (ok && n == 4) {
            unsigned char c1 = (unsigned char)s[i + 1];
            ok = !(c == 0xF0 && c1 < 0x90) && !(c == 0xF4 && c1 >= 0x90);
        }
        if (ok) {
            memcpy(out + o, s + i, n);
            o += n;
            i += n;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
    return out;
}

typedef struct gen_args {
    const char *model;
    const char *prompt;
    const char *prompt_ids;
    long max_tokens;
    double temperature, top_p;
    unsigned long long seed;
    int threads;
    int json, stats;
    hx_backend_kind backend; /* cpu (default) or cuda */
} gen_args;

static int parse_args(int argc, char **argv, gen_args *a)
{
    enum { O_MODEL = 1, O_PROMPT, O_IDS, O_MAX, O_TEMP, O_TOPP, O_SEED, O_THREADS, O_STATS,
           O_BACKEND };
    static const struct option opts[] = {
        {"model", required_argument, NULL, O_MODEL},
        {"prompt", required_argument, NULL, O_PROMPT},
        {"prompt-ids", required_argument, NULL, O_IDS},
        {"max-tokens", required_argument, NULL, O_MAX},
        {"temperature", required_argument, NULL, O_TEMP},
        {"top-p", required_argument, NULL, O_TOPP},
        {"seed", required_argument, NULL, O_SEED},
        {"threads", required_argument, NULL, O_THREADS},
        {"stats", no_argument, NULL, O_STATS},
        {"backend", required_argument, NULL, O_BACKEND},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    *a = (gen_args){.max_tokens = DEFAULT_MAX_TOKENS, .temperature = 0, .top_p = 1, .seed = 1,
                    .backend = HX_BACKEND_CPU};
    double v;
    opterr = 0;
    optind = 0; /* restart scanning (glibc: full reinitialisation) */
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_MODEL: a->model = optarg; break;
        case O_PROMPT: a->prompt = optarg; break;
        case O_IDS: a->prompt_ids = optarg; break;
        case O_MAX:
            if (!hx_cli_number(CMD, "--max-tokens", optarg, 1, 16777216, &v))
                return 2;
            if (v != (double)(long)v)
                return hx_cli_usage_error(CMD, "--max-tokens: '%s' is not a whole number",
                                          optarg);
            a->max_tokens = (long)v;
            break;
        case O_TEMP:
            if (!hx_cli_number(CMD, "--temperature", optarg, 0, 100, &a->temperature))
                return 2;
            break;
        case O_TOPP:
            if (!hx_cli_number(CMD, "--top-p", optarg, 0, 1, &a->top_p))
                return 2;
            if (a->top_p <= 0)
                return hx_cli_usage_error(CMD, "--top-p: '%s' is not in (0, 1]", optarg);
            break;
        case O_SEED: {
            char *end = NULL;
            errno = 0;
            a->seed = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end != '\0' || optarg[0] == '-')
                return hx_cli_usage_error(CMD, "--seed: '%s' is not a non-negative integer",
                                          optarg);
            break;
        }
        case O_THREADS:
            if (!hx_cli_number(CMD, "--threads", optarg, 1, HX_CPU_MAX_THREADS, &v))
                return 2;
            if (v != (double)(int)v)
                return hx_cli_usage_error(CMD, "--threads: '%s' is not a whole number", optarg);
            a->threads = (int)v;
            break;
        case O_STATS: a->stats = 1; break;
        case O_BACKEND: {
            hx_err e = {0};
            if (hx_backend_parse(optarg, &a->backend, &e) != HX_OK || a->backend == HX_BACKEND_AUTO)
                return hx_cli_usage_error(CMD, "--backend: '%s' is not cpu or cuda", optarg);
            break;
        }
        case 'j': a->json = 1; break;
        case 'h': usage(stdout); return -1;
        case ':':
            return hx_cli_usage_error(CMD, "option '%s' needs a value", argv[optind - 1]);
        default:
            if (optopt)
                return hx_cli_usage_error(CMD, "unknown option '-%c'", optopt);
            return hx_cli_usage_error(CMD, "unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return hx_cli_usage_error(CMD, "unexpected argument '%s'", argv[optind]);
    if (!a->model)
        return hx_cli_usage_error(CMD, "missing --model DIR");
    if (!a->prompt && !a->prompt_ids)
        return hx_cli_usage_error(CMD, "missing --prompt TEXT or --prompt-ids IDS");
    if (a->prompt && a->prompt_ids)
        return hx_cli_usage_error(CMD, "--prompt and --prompt-ids are exclusive");
    return 0;
}

/* Prints the JSON result; 0 or 1. */
static int print_json(const int *ids, int n, const char *text, size_t text_len,
                      const char *finish)
{
    int rc = 1;
    char *clean = NULL;
    json_t *root = json_object(), *tokens = json_array();
    if (!root || !tokens || json_object_set_new(root, "tokens", tokens) != 0) {
        json_decref(tokens);
        goto out;
    }
    for (int i = 0; i < n; i++)
        if (json_array_append_new(tokens, json_integer(ids[i])) != 0)
            goto out;
    if (text) {
        clean = utf8_sanitize(text, text_len);
        if (!clean || json_object_set_new(root, "text", json_string(clean)) != 0)
            goto out;
    } else if (json_object_set_new(root, "text", json_null()) != 0) {
        goto out;
    }
    if (json_object_set_new(root, "finish_reason", json_string(finish)) != 0)
        goto out;
    rc = hx_json_print(root) == HX_OK ? 0 : 1;
out:
    if (rc)
        hx_cli_error("cannot print the result as JSON: out of memory");
    free(clean);
    json_decref(root);
    return rc;
}

/*
 * Shows generated token t (the n-th): its bytes streamed to people, or kept in
 * *text for --json; ids when there is no tokenizer. 0, or 1 when out of memory.
 */
static int emit(const gen_args *a, const hx_tokenizer *tok, int t, int n, char **text,
                size_t *text_len, size_t *text_cap)
{
    if (!tok) {
        if (!a->json) {
            printf("%s%d", n > 1 ? " " : "", t);
            fflush(stdout);
        }
        return 0;
    }
    const char *bytes;
    size_t len;
    if (hx_tokenizer_token_bytes(tok, t, &bytes, &len) != HX_OK)
        return 0;
    if (!a->json) {
        fwrite(bytes, 1, len, stdout);
        fflush(stdout);
        return 0;
    }
    if (*text_len + len + 1 > *text_cap) {
        size_t cap = 2 * (*text_len + len + 1);
        char *g = realloc(*text, cap);
        if (!g) {
            hx_cli_error("out of memory");
            return 1;
        }
        *text = g;
        *text_cap = cap;
    }
    memcpy(*text + *text_len, bytes, len);
    *text_len += len;
    (*text)[*text_len] = '\0';
    return 0;
}

/*
 * The same run on another engine (runtime/backend.h): one request, stepped
 * until it ends; the output as the cpu path prints it. The exit status.
 */
static int generate_on_backend(const gen_args *a, const hx_tokenizer *tok, const int *prompt,
                               int n_prompt, int max_new)
{
    hx_err err = {0};
    hx_backend *b = NULL;
    hx_backend_options o = {a->backend, a->model, 0, 0, 0, 1, 0, a->threads, 1, 16, 0, 0};
    int rc = 1, n_out = 0, eos = tok ? hx_tokenizer_eos(tok) : -1;
    int *out = malloc((size_t)max_new * sizeof *out);
    char *text = NULL;
    size_t text_len = 0, text_cap = 0;
    const char *finish = "length";
    if (!out) {
        hx_cli_error("out of memory");
        return 1;
    }
    if (hx_backend_open(&o, NULL, &b, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto done;
    }
    hx_batch_request r = {1, prompt, n_prompt, max_new, eos, (float)a->temperature,
                          (float)a->top_p, a->seed, 0};
    if (hx_backend_add(b, &r, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto done;
    }
    int more = 1;
    while (more) {
        const hx_batch_event *ev;
        int n = 0;
        if (hx_backend_step(b, &ev, &n, &err) != HX_OK) {
            rc = hx_cli_fail(&err);
            goto done;
        }
        for (int i = 0; i < n; i++) {
            if (ev[i].token == eos) {
                finish = "stop";
            } else {
                out[n_out++] = ev[i].token;
                if (emit(a, tok, ev[i].token, n_out, &text, &text_len, &text_cap) != 0)
                    goto done;
            }
            more = !ev[i].finished;
        }
    }
    if (a->json) {
        if (tok && !text && !(text = strdup(""))) {
            hx_cli_error("out of memory");
            goto done;
        }
        rc = print_json(out, n_out, text, text_len, finish);
    } else {
        putchar('\n');
        rc = fflush(stdout) == 0 ? 0 : 1;
    }
done:
    hx_backend_close(b);
    free(text);
    free(out);
    return rc;
}

int hx_cmd_generate(int argc, char **argv)
{
    gen_args a;
    int rc = parse_args(argc, argv, &a);
    if (rc != 0)
        return rc < 0 ? 0 : rc;

    hx_err err = {0};
    hx_llama *m = NULL;
    hx_llama_state *s = NULL;
    hx_llama_sampler *sampler = NULL;
    hx_tokenizer *tok = NULL;
    int *prompt = NULL, *out = NULL;
    char *text = NULL;
    size_t text_len = 0, text_cap = 0;
    int n_prompt = 0;
    rc = 1;

    if (!hx_file_is_dir(a.model)) {
        hx_cli_error("model '%s': not a directory (expected a Hugging Face model directory "
                     "with config.json, *.safetensors and tokenizer.json)",
                     a.model);
        return 2;
    }
    hx_model gpu_cfg;
    const hx_model *cfg = &gpu_cfg;
    if (a.backend == HX_BACKEND_CPU) {
        hx_llama_options opt;
        hx_llama_options_init(&opt);
        opt.threads = a.threads;
        if (hx_llama_load(a.model, &opt, &m, &err) != HX_OK) {
            rc = hx_cli_fail(&err);
            goto out;
        }
        cfg = hx_llama_config(m);
    } else if (hx_model_load(a.model, &gpu_cfg, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }

    /* the tokenizer: required for --prompt, used to print text with --prompt-ids */
    hx_status st = hx_tokenizer_load(a.model, &tok, &err);
    if (st != HX_OK && (a.prompt || st != HX_ENOENT)) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    if (a.prompt) {
        size_t n = 0;
        int *ids = NULL;
        if (hx_tokenizer_encode(tok, a.prompt, strlen(a.prompt), &ids, &n, &err) != HX_OK) {
            rc = hx_cli_fail(&err);
            goto out;
        }
        int bos = hx_tokenizer_adds_bos(tok) ? hx_tokenizer_bos(tok) : -1;
        int add = bos >= 0 && !(n > 0 && ids[0] == bos);
        prompt = malloc((n + 1) * sizeof *prompt);
        if (!prompt) {
            free(ids);
            hx_cli_error("out of memory");
            goto out;
        }
        if (add)
            prompt[0] = bos;
        memcpy(prompt + add, ids, n * sizeof *ids);
        n_prompt = (int)n + add;
        free(ids);
        if (n_prompt == 0) {
            hx_cli_error("--prompt: the prompt encodes to no tokens");
            rc = 2;
            goto out;
        }
    } else if (!parse_ids(a.prompt_ids, &prompt, &n_prompt)) {
        rc = 2;
        goto out;
    }
    for (int i = 0; i < n_prompt; i++) {
        if (prompt[i] >= cfg->vocab_size) {
            hx_cli_error("prompt token %d (at %d) is outside the model's vocabulary of %d",
                         prompt[i], i, cfg->vocab_size);
            rc = 2;
            goto out;
        }
    }
    if (n_prompt >= cfg->max_position_tokens) {
        hx_cli_error("the prompt has %d tokens; the model takes at most %d positions", n_prompt,
                     cfg->max_position_tokens);
        rc = 2;
        goto out;
    }
    long max_new = a.max_tokens;
    if (n_prompt + max_new - 1 > cfg->max_position_tokens)
        max_new = cfg->max_position_tokens - n_prompt + 1;

    if (a.backend != HX_BACKEND_CPU) {
        rc = generate_on_backend(&a, tok, prompt, n_prompt, (int)max_new);
        goto out;
    }
    if (hx_llama_state_new(m, (int)(n_prompt + max_new - 1), 0, &s, &err) != HX_OK ||
        hx_llama_sampler_new(cfg->vocab_size, (float)a.temperature, (float)a.top_p, a.seed,
                             &sampler, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    out = malloc((size_t)max_new * sizeof *out);
    if (!out) {
        hx_cli_error("out of memory");
        goto out;
    }

    /* prefill, then one token at a time, streaming its bytes to people */
    int eos = tok ? hx_tokenizer_eos(tok) : -1;
    int n_out = 0, n_forward = 0;
    const char *finish = "length";
    double t0 = now_s();
    const float *logits = NULL;
    if (hx_llama_prefill(m, s, prompt, n_prompt, 0, &logits, &err) != HX_OK) {
        rc = hx_cli_fail(&err);
        goto out;
    }
    double t1 = now_s();
    for (long i = 0; i < max_new; i++) {
        int t = hx_llama_sample(sampler, logits);
        if (t == eos) {
            finish = "stop";
            break;
        }
        out[n_out++] = t;
        if (emit(&a, tok, t, n_out, &text, &text_len, &text_cap) != 0)
            goto out;
        if (i + 1 == max_new)
            break;
        n_forward++;
        if (hx_llama_forward(m, s, t, n_prompt + (int)i, &logits, &err) != HX_OK) {
            if (!a.json)
                putchar('\n');
            rc = hx_cli_fail(&err);
            goto out;
        }
    }
    double t2 = now_s();
    if (a.json) {
        if (tok && !text)
            text = strdup("");
        if (tok && !text) {
            hx_cli_error("out of memory");
            goto out;
        }
        rc = print_json(out, n_out, text, text_len, finish);
    } else {
        putchar('\n');
        rc = fflush(stdout) == 0 ? 0 : 1;
    }
    if (a.stats) {
        double pre = t1 - t0, dec = t2 - t1;
        fprintf(stderr,
                "hexflow: prefill %d tokens in %.3f s (%.1f tokens/s); decode %d tokens in "
                "%.3f s (%.1f tokens/s); %d threads; %s kernels; finish: %s\n",
                n_prompt, pre, pre > 0 ? n_prompt / pre : 0.0, n_forward, dec,
                dec > 0 ? n_forward / dec : 0.0,
                hx_cpu_pool_threads(hx_llama_pool(m)), hx_cpu_path_name(hx_cpu_get_path()),
                finish);
    }
out:
    free(text);
    free(out);
    free(prompt);
    hx_llama_sampler_free(sampler);
    hx_llama_state_free(s);
    hx_tokenizer_free(tok);
    hx_llama_free(m);
    return rc;
}
