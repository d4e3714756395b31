/*
 * test_batch.c - the continuous-batching engine on make-tiny models against
 * the single-sequence path (hx_llama_prefill / hx_llama_forward /
 * hx_llama_generate): eight greedy sequences joining and leaving at
 * different steps, prompts prefilled in chunks mixed with decode steps, give
 * the same tokens (and, on the portable kernels, bit-identical logits); a
 * sequence whose KV is packed from a single-sequence prefill and unpacked
 * into the engine continues identically; seeded sampling matches; admission
 * control refuses cleanly and leaks no block.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cpu/cpu.h"
#include "runtime/batch.h"
#include "runtime/kvcache.h"
#include "runtime/llama.h"
#include "runtime/llama_weights.h"
#include "runtime/tiny.h"

#define LOGIT_TOL 1e-4

static char tmp_dir[256];
static char model[512]; /* a tiny model with kv_heads < heads */

/* ---- helpers --------------------------------------------------------------------------------- */

static int group_setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/hx_test_batch_XXXXXX");
    if (!mkdtemp(tmp_dir))
        return -1;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.num_layers = 3;
    c.hidden_size = 64;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.intermediate_size = 96;
    c.vocab_size = 300;
    c.seed = 7;
    snprintf(model, sizeof model, "%s/gqa", tmp_dir);
    hx_err err = {0};
    if (hx_tiny_write(model, &c, &err) != HX_OK) {
        fprintf(stderr, "make-tiny: %s\n", err.msg);
        return -1;
    }
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static hx_llama *load(int threads)
{
    hx_llama_options opt;
    hx_llama_options_init(&opt);
    opt.threads = threads;
    hx_llama *m = NULL;
    hx_err err = {0};
    if (hx_llama_load(model, &opt, &m, &err) != HX_OK)
        fail_msg("load '%s': %s", model, err.msg);
    return m;
}

static hx_batch *engine(const hx_llama *m, int max_seqs, int step_tokens, int bt, int blocks)
{
    hx_batch_options o;
    hx_batch_options_init(&o);
    o.max_seqs = max_seqs;
    o.max_step_tokens = step_tokens;
    o.block_tokens = bt;
    o.max_blocks = blocks;
    o.max_seq_tokens = 128;
    hx_batch *b = NULL;
    hx_err err = {0};
    if (hx_batch_new(m, &o, &b, &err) != HX_OK)
        fail_msg("hx_batch_new: %s", err.msg);
    return b;
}

static void some_tokens(int *t, int n, uint64_t seed, int vocab)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = (int)((s >> 33) % (uint64_t)vocab);
    }
}

/*
 * The single-sequence reference: prefill, then greedy decode with
 * hx_llama_forward, recording each step's logits ([max_new][vocab], caller
 * frees) and tokens; stops after eos_id (kept) unless eos_id < 0.
 */
static float *reference(const hx_llama *m, const int *prompt, int n_prompt, int max_new,
                        int eos_id, int *tokens, int *n_tokens)
{
    const int V = hx_llama_config(m)->vocab_size;
    hx_llama_state *s = NULL;
    hx_err err = {0};
    if (hx_llama_state_new(m, n_prompt + max_new, 0, &s, &err) != HX_OK)
        fail_msg("state: %s", err.msg);
    float *all = malloc((size_t)max_new * V * sizeof *all);
    assert_non_null(all);
    const float *logits = NULL;
    if (hx_llama_prefill(m, s, prompt, n_prompt, 0, &logits, &err) != HX_OK)
        fail_msg("prefill: %s", err.msg);
    *n_tokens = 0;
    for (int i = 0; i < max_new; i++) {
        memcpy(all + (size_t)i * V, logits, (size_t)V * sizeof *all);
        int t = hx_llama_argmax(logits, V);
        tokens[(*n_tokens)++] = t;
        if (t == eos_id || i + 1 == max_new)
            break;
        if (hx_llama_forward(m, s, t, n_prompt + i, &logits, &err) != HX_OK)
            fail_msg("forward: %s", err.msg);
    }
    hx_llama_state_free(s);

    /* and hx_llama_generate agrees */
    int *gen = malloc((size_t)max_new * sizeof *gen);
    int n_gen = 0;
    hx_llama_sampler *g = NULL;
    assert_int_equal(hx_llama_sampler_new(V, 0, 1, 1, &g, NULL), HX_OK);
    assert_int_equal(hx_llama_state_new(m, n_prompt + max_new, 0, &s, NULL), HX_OK);
    assert_int_equal(hx_llama_generate(m, s, g, prompt, n_prompt, max_new, eos_id, gen, &n_gen,
                                       &err),
                     HX_OK);
    assert_int_equal(n_gen, *n_tokens);
    assert_memory_equal(gen, tokens, (size_t)n_gen * sizeof *gen);
    hx_llama_state_free(s);
    hx_llama_sampler_free(g);
    free(gen);
    return all;
}

/* Compares the engine's logits with the reference: bit for bit, or within LOGIT_TOL. */
static void compare_logits(const char *what, int step, const float *got, const float *want,
                           int V, int exact)
{
    if (exact) {
        if (memcmp(got, want, (size_t)V * sizeof *got) != 0) {
            int i = 0;
            while (got[i] == want[i])
                i++;
            fail_msg("%s, token %d: logit %d is %.9g, the single-sequence path gives %.9g", what,
                     step, i, (double)got[i], (double)want[i]);
        }
        return;
    }
    for (int i = 0; i < V; i++)
        if (fabs((double)got[i] - (double)want[i]) > LOGIT_TOL)
            fail_msg("%s, token %d: logit %d is %.9g, the single-sequence path gives %.9g", what,
                     step, i, (double)got[i], (double)want[i]);
}

static void check_cache_empty(const hx_batch *b)
{
    const hx_kvcache *c = hx_batch_kvcache(b);
    hx_err err = {0};
    if (hx_kvcache_check(c, &err) != HX_OK)
        fail_msg("%s", err.msg);
    assert_int_equal(hx_kvcache_seq_count(c), 0);
    assert_int_equal(hx_kvcache_blocks_free(c), hx_kvcache_max_blocks(c));
    assert_int_equal(hx_batch_free_blocks(b), hx_kvcache_max_blocks(c));
    assert_int_equal(hx_batch_seq_count(b), 0);
}

static int set_path(hx_cpu_path path)
{
    if (hx_cpu_set_path(path) == HX_OK)
        return 1;
    print_message("skipped the %s kernels: not available on this CPU\n", hx_cpu_path_name(path));
    return 0;
}

static void restore_path(void)
{
    hx_cpu_set_path(hx_cpu_has_avx2() ? HX_CPU_PATH_AVX2 : HX_CPU_PATH_PORTABLE);
}

/* ---- eight sequences joining and leaving ----------------------------------------------------- */

#define NSEQ 8
#define MAX_NEW 24

typedef struct seq_case {
    int n_prompt, max_new, join_step, eos;
    int prompt[48];
    int want[MAX_NEW], n_want;
    float *want_logits; /* [max_new][vocab] */
    int got[MAX_NEW], n_got;
    int done;
} seq_case;

static void eight_sequences(int threads, hx_cpu_path path)
{
    if (!set_path(path))
        return;
    hx_llama *m = load(threads);
    const int V = hx_llama_config(m)->vocab_size;
    const int exact = path == HX_CPU_PATH_PORTABLE;
    static const int n_prompt[NSEQ] = {1, 3, 5, 8, 13, 21, 34, 40};
    static const int max_new[NSEQ] = {12, 7, 20, 5, 16, 9, 3, 14};
    static const int join[NSEQ] = {0, 0, 1, 3, 4, 6, 9, 12};
    seq_case sc[NSEQ];
    memset(sc, 0, sizeof sc);
    for (int i = 0; i < NSEQ; i++) {
        sc[i].n_prompt = n_prompt[i];
        sc[i].max_new = max_new[i];
        sc[i].join_step = join[i];
        sc[i].eos = -1;
        some_tokens(sc[i].prompt, n_prompt[i], (uint64_t)i + 1, V);
        sc[i].prompt[0] = HX_TINY_BOS_ID;
    }
    /* sequence 2 stops at its own eos: its reference's 6th token (first occurrence) */
    {
        int t[MAX_NEW], n;
        float *l = reference(m, sc[2].prompt, sc[2].n_prompt, sc[2].max_new, -1, t, &n);
        free(l);
        sc[2].eos = t[5];
    }
    for (int i = 0; i < NSEQ; i++)
        sc[i].want_logits = reference(m, sc[i].prompt, sc[i].n_prompt, sc[i].max_new,
                                      sc[i].eos, sc[i].want, &sc[i].n_want);
    assert_true(sc[2].n_want <= 6);

    /* small steps (16 rows) and blocks (4 tokens): prompts are chunked, blocks are crossed */
    hx_batch *b = engine(m, NSEQ, 16, 4, 160);
    hx_err err = {0};
    int added = 0, most = 0, mixed_steps = 0;
    for (int step = 0; step < 1000 && (added < NSEQ || hx_batch_seq_count(b) > 0); step++) {
        for (int i = 0; i < NSEQ; i++)
            if (sc[i].join_step == step) {
                hx_batch_request r = {(uint64_t)(100 + i), sc[i].prompt, sc[i].n_prompt,
                                      sc[i].max_new, sc[i].eos, 0, 1, 0};
                assert_true(hx_batch_can_admit(b, sc[i].n_prompt, sc[i].max_new));
                if (hx_batch_add(b, &r, &err) != HX_OK)
                    fail_msg("add %d: %s", i, err.msg);
                added++;
            }
        if (hx_batch_seq_count(b) > most)
            most = hx_batch_seq_count(b);
        const hx_batch_event *ev;
        int n_ev;
        if (hx_batch_step(b, &ev, &n_ev, &err) != HX_OK)
            fail_msg("step %d: %s", step, err.msg);
        int decoded = 0, first = 0;
        for (int e = 0; e < n_ev; e++) {
            int i = (int)(ev[e].id - 100);
            assert_true(i >= 0 && i < NSEQ);
            seq_case *s = &sc[i];
            assert_false(s->done);
            assert_int_equal(ev[e].index, s->n_got);
            char what[64];
            snprintf(what, sizeof what, "sequence %d", i);
            compare_logits(what, s->n_got, ev[e].logits,
                           s->want_logits + (size_t)s->n_got * V, V, exact);
            s->got[s->n_got++] = ev[e].token;
            s->done = ev[e].finished;
            if (s->done)
                assert_int_equal(s->n_got, s->n_want);
            if (ev[e].index == 0)
                first++;
            else
                decoded++;
        }
        if (decoded > 0 && first > 0)
            mixed_steps++;
    }
    for (int i = 0; i < NSEQ; i++) {
        assert_true(sc[i].done);
        assert_int_equal(sc[i].n_got, sc[i].n_want);
        assert_memory_equal(sc[i].got, sc[i].want, (size_t)sc[i].n_want * sizeof(int));
        free(sc[i].want_logits);
    }
    assert_true(most >= 5);        /* several sequences really ran together */
    assert_true(mixed_steps >= 1); /* and prompts finished in steps that also decoded */
    check_cache_empty(b);
    hx_batch_free(b);
    hx_llama_free(m);
    restore_path();
}

static void test_eight_sequences_portable(void **state)
{
    (void)state;
    eight_sequences(1, HX_CPU_PATH_PORTABLE);
    eight_sequences(3, HX_CPU_PATH_PORTABLE);
}

static void test_eight_sequences_avx2(void **state)
{
    (void)state;
    eight_sequences(1, HX_CPU_PATH_AVX2);
    eight_sequences(2, HX_CPU_PATH_AVX2);
}

/* ---- KV from a single-sequence prefill ------------------------------------------------------- */

static void imported(hx_cpu_path path)
{
    if (!set_path(path))
        return;
    const int exact = path == HX_CPU_PATH_PORTABLE;
    hx_llama *m = load(2);
    const hx_model *c = hx_llama_config(m);
    const int V = c->vocab_size, L = c->num_layers, K = c->num_kv_heads, d = c->head_dim;
    enum { NP = 11, NEW = 15 };
    int prompt[NP], want[NEW], n_want;
    some_tokens(prompt, NP, 99, V);
    float *want_logits = reference(m, prompt, NP, NEW, -1, want, &n_want);
    assert_int_equal(n_want, NEW);

    /* the prefill side: a lone state, and three segments cut as a TP=2 two-stage group would */
    hx_llama_state *st = NULL;
    hx_err err = {0};
    assert_int_equal(hx_llama_state_new(m, 32, 0, &st, &err), HX_OK);
    const float *logits;
    assert_int_equal(hx_llama_prefill(m, st, prompt, NP, 0, &logits, &err), HX_OK);
    const int first = hx_llama_argmax(logits, V);
    assert_int_equal(first, want[0]);
    hx_kv_contiguous kc = {NULL, NULL, 0, L, 0, K, hx_llama_state_max_tokens(st), d};
    hx_llama_state_kv(st, &kc.k, &kc.v);
    const int ranges[3][4] = {{0, 1, 0, K}, {1, L - 1, 0, 1}, {1, L - 1, 1, K - 1}};
    void *segs[3];
    size_t sizes[3];
    for (int i = 0; i < 3; i++) {
        size_t n = hx_kv_segment_bytes(ranges[i][1], ranges[i][3], NP, d);
        segs[i] = malloc(n);
        assert_int_equal(hx_kv_pack_contiguous(&kc, NP, ranges[i][0], ranges[i][1],
                                               ranges[i][2], ranges[i][3], segs[i], n,
                                               &sizes[i], &err),
                         HX_OK);
    }
    hx_llama_state_free(st);

    /* the decode side: an engine already running two other requests */
    hx_batch *b = engine(m, 4, 8, 4, 64);
    int other[2][9];
    for (int i = 0; i < 2; i++) {
        some_tokens(other[i], 9, (uint64_t)(7 + i), V);
        hx_batch_request r = {(uint64_t)i, other[i], 9, 30, -1, 0, 1, 0};
        assert_int_equal(hx_batch_add(b, &r, &err), HX_OK);
    }
    const hx_batch_event *ev;
    int n_ev;
    for (int s = 0; s < 3; s++)
        assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), HX_OK);

    hx_batch_request req = {77, NULL, NP, NEW, -1, 0, 1, 0};
    hx_kv_segment cs[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(hx_kv_segment_parse(segs[i], sizes[i], &cs[i], &err), HX_OK);
    /* refusals first: nothing is added and no block is kept */
    const int free_before = hx_kvcache_blocks_free(hx_batch_kvcache(b));
    assert_int_equal(hx_batch_add_prefilled(b, &req, first, cs, 2, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "layer 1, KV head 1 uncovered"));
    hx_batch_request longer = req;
    longer.n_prompt = NP + 1;
    assert_int_equal(hx_batch_add_prefilled(b, &longer, first, cs, 3, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "segment 0 holds positions 0-10; the prompt's are 0-11"));
    hx_kv_segment broken[3] = {cs[0], cs[1], cs[2]};
    broken[2].head_first = K; /* outside the model: refused after segment 0 and 1 went in */
    assert_int_equal(hx_batch_add_prefilled(b, &req, first, broken, 3, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "not within"));
    assert_int_equal(hx_batch_add_prefilled(b, &req, V, cs, 3, &err), HX_EINVAL);
    hx_batch_request one = req;
    one.max_new_tokens = 1;
    assert_int_equal(hx_batch_add_prefilled(b, &one, first, cs, 3, &err), HX_EINVAL);
    assert_int_equal(hx_batch_add_prefilled(b, &req, first, cs, 0, &err), HX_EINVAL);
    assert_int_equal(hx_kvcache_blocks_free(hx_batch_kvcache(b)), free_before);
    assert_int_equal(hx_batch_seq_count(b), 2);
    hx_err cerr = {0};
    assert_int_equal(hx_kvcache_check(hx_batch_kvcache(b), &cerr), HX_OK);

    assert_int_equal(hx_batch_add_prefilled(b, &req, first, cs, 3, &err), HX_OK);
    int got = 1, steps = 0;
    while (hx_batch_seq_count(b) > 0 && steps++ < 100) {
        assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), HX_OK);
        for (int e = 0; e < n_ev; e++) {
            if (ev[e].id != 77)
                continue;
            assert_int_equal(ev[e].index, got);
            compare_logits("imported sequence", got, ev[e].logits,
                           want_logits + (size_t)got * V, V, exact);
            assert_int_equal(ev[e].token, want[got]);
            got++;
            assert_int_equal(ev[e].finished, got == NEW);
        }
    }
    assert_int_equal(got, NEW);
    check_cache_empty(b);
    for (int i = 0; i < 3; i++)
        free(segs[i]);
    free(want_logits);
    hx_batch_free(b);
    hx_llama_free(m);
    restore_path();
}

static void test_imported_kv(void **state)
{
    (void)state;
    imported(HX_CPU_PATH_PORTABLE);
    imported(HX_CPU_PATH_AVX2);
}

/* ---- sampling, admission, errors ------------------------------------------------------------- */

/* Seeded sampling in the engine draws what hx_llama_generate draws (portable kernels). */
static void test_sampling(void **state)
{
    (void)state;
    if (!set_path(HX_CPU_PATH_PORTABLE))
        return;
    hx_llama *m = load(1);
    const int V = hx_llama_config(m)->vocab_size;
    enum { N = 3, NEW = 20 };
    int prompt[N][6], want[N][NEW], n_want[N];
    for (int i = 0; i < N; i++) {
        some_tokens(prompt[i], 6, (uint64_t)(50 + i), V);
        hx_llama_state *s = NULL;
        hx_llama_sampler *g = NULL;
        assert_int_equal(hx_llama_state_new(m, 6 + NEW, 0, &s, NULL), HX_OK);
        assert_int_equal(hx_llama_sampler_new(V, 0.9f, 0.8f, (uint64_t)(1000 + i), &g, NULL),
                         HX_OK);
        assert_int_equal(hx_llama_generate(m, s, g, prompt[i], 6, NEW, -1, want[i], &n_want[i],
                                           NULL),
                         HX_OK);
        hx_llama_sampler_free(g);
        hx_llama_state_free(s);
    }
    hx_batch *b = engine(m, 4, 8, 4, 64);
    hx_err err = {0};
    for (int i = 0; i < N; i++) {
        hx_batch_request r = {(uint64_t)i, prompt[i], 6, NEW, -1, 0.9f, 0.8f,
                              (uint64_t)(1000 + i)};
        assert_int_equal(hx_batch_add(b, &r, &err), HX_OK);
    }
    int got[N][NEW], n_got[N] = {0};
    while (hx_batch_seq_count(b) > 0) {
        const hx_batch_event *ev;
        int n_ev;
        assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), HX_OK);
        for (int e = 0; e < n_ev; e++)
            got[ev[e].id][n_got[ev[e].id]++] = ev[e].token;
    }
    for (int i = 0; i < N; i++) {
        assert_int_equal(n_got[i], n_want[i]);
        assert_memory_equal(got[i], want[i], (size_t)n_want[i] * sizeof(int));
    }
    check_cache_empty(b);
    hx_batch_free(b);
    hx_llama_free(m);
    restore_path();
}

static void test_admission(void **state)
{
    (void)state;
    hx_llama *m = load(1);
    const int V = hx_llama_config(m)->vocab_size;
    /* 7 blocks of 4 tokens; a request of 5 + 8 needs 12 positions = 3 blocks */
    hx_batch *b = engine(m, 3, 8, 4, 7);
    hx_err err = {0};
    int p[5] = {HX_TINY_BOS_ID, 1, 2, 3, 4};
    hx_batch_request r = {1, p, 5, 8, -1, 0, 1, 0};
    assert_true(hx_batch_can_admit(b, 5, 8));
    assert_int_equal(hx_batch_add(b, &r, &err), HX_OK);
    r.id = 2;
    assert_int_equal(hx_batch_add(b, &r, &err), HX_OK);
    assert_int_equal(hx_batch_free_blocks(b), 1);
    /* blocks are reserved at admission, not when used */
    assert_int_equal(hx_kvcache_blocks_free(hx_batch_kvcache(b)), 7);
    assert_false(hx_batch_can_admit(b, 5, 8));
    r.id = 3;
    assert_int_equal(hx_batch_add(b, &r, &err), HX_ENOMEM);
    assert_non_null(strstr(err.msg, "3 KV blocks needed, 1 unreserved of 7"));
    assert_true(hx_batch_can_admit(b, 2, 3)); /* 4 positions: one block */
    hx_batch_request small = {3, p, 2, 3, -1, 0, 1, 0};
    assert_int_equal(hx_batch_add(b, &small, &err), HX_OK);
    assert_int_equal(hx_batch_free_blocks(b), 0);
    small.id = 4;
    assert_int_equal(hx_batch_add(b, &small, &err), HX_ENOMEM);
    assert_non_null(strstr(err.msg, "all 3 sequence slots are taken"));

    /* bad requests */
    hx_batch_request bad = r;
    bad.id = 1;
    hx_batch_remove(b, 3, NULL);
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL); /* duplicate id */
    assert_non_null(strstr(err.msg, "already"));
    bad.id = 9;
    bad.n_prompt = 0;
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL);
    bad.n_prompt = 5;
    bad.max_new_tokens = 0;
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL);
    bad.max_new_tokens = 125; /* 5 + 125 - 1 > 128 */
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_ERANGE);
    assert_false(hx_batch_can_admit(b, 5, 125));
    int badp[2] = {1, V};
    bad = (hx_batch_request){9, badp, 2, 2, -1, 0, 1, 0};
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "index 1 is outside the vocabulary"));
    bad = (hx_batch_request){9, p, 2, 2, -1, -1.0f, 1, 0};
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL); /* the sampler refuses */
    bad = (hx_batch_request){9, NULL, 2, 2, -1, 0, 1, 0};
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL);
    assert_int_equal(hx_batch_remove(b, 3, &err), HX_ENOENT);
    assert_int_equal(hx_batch_seq_count(b), 2);

    /* run both to the end (the second's prompt waits for room in the first step) */
    const hx_batch_event *ev;
    int n_ev, finished = 0, steps = 0;
    while (hx_batch_seq_count(b) > 0 && steps++ < 50) {
        assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), HX_OK);
        for (int e = 0; e < n_ev; e++)
            finished += ev[e].finished;
        hx_err cerr = {0};
        assert_int_equal(hx_kvcache_check(hx_batch_kvcache(b), &cerr), HX_OK);
    }
    assert_int_equal(finished, 2);
    assert_int_equal(steps, 9); /* 8 tokens each, the second one step behind */
    r.id = 5;
    assert_int_equal(hx_batch_add(b, &r, &err), HX_OK);
    assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), HX_OK);
    assert_int_equal(n_ev, 1);
    assert_int_equal(hx_batch_remove(b, 5, &err), HX_OK); /* cancel mid-flight */
    check_cache_empty(b);
    assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), HX_OK); /* empty: a no-op */
    assert_int_equal(n_ev, 0);
    hx_batch_free(b);
    hx_batch_free(NULL);

    /* engine options */
    hx_batch_options o;
    hx_batch_options_init(&o);
    hx_batch *x = NULL;
    o.max_step_tokens = 8;
    o.max_seqs = 9;
    assert_int_equal(hx_batch_new(m, &o, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "below max_seqs"));
    hx_batch_options_init(&o);
    o.max_seq_tokens = 1 << 20;
    assert_int_equal(hx_batch_new(m, &o, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "max_position_embeddings"));
    hx_batch_options_init(&o);
    o.block_tokens = 0;
    assert_int_equal(hx_batch_new(m, &o, &x, &err), HX_EINVAL);
    assert_int_equal(hx_batch_new(m, NULL, &x, &err), HX_OK);
    hx_batch_free(x);
    hx_llama_free(m);

    /* a pipeline stage is not a whole model */
    hx_llama_options lo;
    hx_llama_options_init(&lo);
    lo.num_layers = 1;
    hx_llama *stage = NULL;
    assert_int_equal(hx_llama_load(model, &lo, &stage, &err), HX_OK);
    assert_int_equal(hx_batch_new(stage, NULL, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "whole model"));
    hx_llama_free(stage);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eight_sequences_portable),
        cmocka_unit_test(test_eight_sequences_avx2),
        cmocka_unit_test(test_imported_kv),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_admission),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
