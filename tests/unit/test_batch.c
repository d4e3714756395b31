/*
 * test_batch.c - the continuous-batching engine on make-tiny models against
 * the single-sequence path (hx_llama_prefill / hx_llama_forward /
 * hx_llama_generate): eight greedy sequences joining and leaving at
 * different steps, prompts prefilled in chunks mixed with decode steps, give
 * the same tokens (and, on the portable kernels, bit-identical logits); a
 * sequence whose KV is packed from a single-sequence prefill and unpacked
 * into the engine continues identically; seeded sampling matches; admission
 * control refuses cleanly and leaks no block.
 *
 * Groups: engines of pipeline stages and TP ranks, each on its own thread,
 * talking through an in-memory hx_batch_comm (a barrier all-reduce that sums
 * in rank order, queues for rows and tokens), decode as hx_llama_generate
 * does (TP 2, TP 4 with replicated KV heads, PP 2 with uneven stages, PP x
 * TP); a prefill group holding its KV hands it as hx_kv_plan_segments'
 * pieces to a decode group of another layout; missing or failing callbacks.
 *
 * The rules shared with the cuda engine (hx_batch_comm_missing, the request
 * and prefilled checks, the comm error wrappers, hx_batch_comm_tokens) on
 * their own: every branch and message.
 */
#define _POSIX_C_SOURCE 200809L
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
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
    if (hx_batch_new(m, &o, NULL, &b, &err) != HX_OK)
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
                                      sc[i].max_new, sc[i].eos, 0, 1, 0, 0};
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
        size_t n = hx_kv_segment_bytes(HX_KV_DTYPE_F32, ranges[i][1], ranges[i][3], NP, d);
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
        hx_batch_request r = {(uint64_t)i, other[i], 9, 30, -1, 0, 1, 0, 0};
        assert_int_equal(hx_batch_add(b, &r, &err), HX_OK);
    }
    const hx_batch_event *ev;
    int n_ev;
    for (int s = 0; s < 3; s++)
        assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), HX_OK);

    hx_batch_request req = {77, NULL, NP, NEW, -1, 0, 1, 0, 0};
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
                              (uint64_t)(1000 + i), 0};
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
    hx_batch_request r = {1, p, 5, 8, -1, 0, 1, 0, 0};
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
    hx_batch_request small = {3, p, 2, 3, -1, 0, 1, 0, 0};
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
    bad = (hx_batch_request){9, badp, 2, 2, -1, 0, 1, 0, 0};
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "index 1 is outside the vocabulary"));
    bad = (hx_batch_request){9, p, 2, 2, -1, -1.0f, 1, 0, 0};
    assert_int_equal(hx_batch_add(b, &bad, &err), HX_EINVAL); /* the sampler refuses */
    bad = (hx_batch_request){9, NULL, 2, 2, -1, 0, 1, 0, 0};
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
    assert_int_equal(hx_batch_new(m, &o, NULL, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "below max_seqs"));
    hx_batch_options_init(&o);
    o.max_seq_tokens = 1 << 20;
    assert_int_equal(hx_batch_new(m, &o, NULL, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "max_position_embeddings"));
    hx_batch_options_init(&o);
    o.block_tokens = 0;
    assert_int_equal(hx_batch_new(m, &o, NULL, &x, &err), HX_EINVAL);
    assert_int_equal(hx_batch_new(m, NULL, NULL, &x, &err), HX_OK);
    hx_batch_free(x);
    hx_llama_free(m);

    /* a pipeline stage is not a whole model */
    hx_llama_options lo;
    hx_llama_options_init(&lo);
    lo.num_layers = 1;
    hx_llama *stage = NULL;
    assert_int_equal(hx_llama_load(model, &lo, &stage, &err), HX_OK);
    assert_int_equal(hx_batch_new(stage, NULL, NULL, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "whole model"));
    hx_llama_free(stage);
}

/* ---- groups: stages and TP ranks on threads, an in-memory comm -------------------------------- */

#define MAX_STAGES 3
#define MAX_TP 4
#define MAX_REQ 8
#define GROUP_STEP_TOKENS 16

typedef struct msg {
    struct msg *next;
    int n;        /* floats or ints */
    float rows[]; /* rows, or tokens stored as floats' bits (memcpy) */
} msg;

/* A FIFO of messages to one engine. */
typedef struct inbox {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    msg *head, *tail;
} inbox;

typedef struct group group;

/* One request of a script. */
typedef struct script_req {
    hx_batch_request r;
    int join_step;
    int first_token; /* >= 0: hx_batch_add_prefilled with the member's segments */
} script_req;

/* One engine of a group: its model, engine, inboxes, and what it saw. */
typedef struct member {
    group *g;
    int stage, rank;
    hx_llama *m;
    hx_batch *b;
    inbox rows, toks;
    /* segments for each prefilled request (borrowed from the test) */
    hx_kv_segment segs[MAX_REQ][16];
    int n_segs[MAX_REQ];
    /* results */
    hx_status st;
    hx_err err;
    int tokens[MAX_REQ][MAX_NEW];
    int first_index[MAX_REQ], n_got[MAX_REQ], finished[MAX_REQ];
    float *logits; /* [MAX_REQ][MAX_NEW][vocab] when the member has the head */
    int steps;
} member;

struct group {
    int n_stages;
    hx_kv_stage stages[MAX_STAGES];
    member mem[MAX_STAGES][MAX_TP];
    pthread_barrier_t bar[MAX_STAGES];
    float *slot[MAX_STAGES][MAX_TP];
    float *sum[MAX_STAGES]; /* [GROUP_STEP_TOKENS][hidden] */
    const script_req *script;
    int n_req;
    int vocab;
};

static void inbox_init(inbox *q)
{
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->head = q->tail = NULL;
}

static void inbox_release(inbox *q)
{
    while (q->head) {
        msg *n = q->head->next;
        free(q->head);
        q->head = n;
    }
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
}

static void inbox_push(inbox *q, const void *data, int n)
{
    msg *m = malloc(sizeof *m + (size_t)(n > 0 ? n : 1) * sizeof(float));
    assert_non_null(m);
    m->next = NULL;
    m->n = n;
    if (n > 0)
        memcpy(m->rows, data, (size_t)n * sizeof(float));
    pthread_mutex_lock(&q->mu);
    if (q->tail)
        q->tail->next = m;
    else
        q->head = m;
    q->tail = m;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

/* Pops the next message into data ([n]); HX_EINVAL when its size is not n. */
static hx_status inbox_pop(inbox *q, void *data, int n, const char *what, hx_err *err)
{
    pthread_mutex_lock(&q->mu);
    while (!q->head)
        pthread_cond_wait(&q->cv, &q->mu);
    msg *m = q->head;
    q->head = m->next;
    if (!q->head)
        q->tail = NULL;
    pthread_mutex_unlock(&q->mu);
    hx_status st = HX_OK;
    if (m->n != n)
        st = hx_err_set(err, HX_EINVAL, "test comm: %s of %d values, expected %d", what, m->n,
                        n);
    else if (n > 0)
        memcpy(data, m->rows, (size_t)n * sizeof(float));
    free(m);
    return st;
}

/* Sums in rank order on rank 0, which every rank then copies: bit-identical everywhere. */
static hx_status g_allreduce(void *ctx, float *x, size_t n, hx_err *err)
{
    (void)err;
    member *me = ctx;
    group *g = me->g;
    const int s = me->stage, tp = g->stages[s].tp;
    g->slot[s][me->rank] = x;
    pthread_barrier_wait(&g->bar[s]);
    if (me->rank == 0) {
        float *sum = g->sum[s];
        memcpy(sum, g->slot[s][0], n * sizeof(float));
        for (int r = 1; r < tp; r++)
            for (size_t i = 0; i < n; i++)
                sum[i] += g->slot[s][r][i];
    }
    pthread_barrier_wait(&g->bar[s]);
    memcpy(x, g->sum[s], n * sizeof(float));
    pthread_barrier_wait(&g->bar[s]);
    return HX_OK;
}

static hx_status g_recv_rows(void *ctx, float *x, int rows, int hidden, hx_err *err)
{
    member *me = ctx;
    return inbox_pop(&me->rows, x, rows * hidden, "rows", err);
}

/* Rank 0 of a stage sends its rows to every rank of the next stage (the others' are equal). */
static hx_status g_send_rows(void *ctx, const float *x, int rows, int hidden, hx_err *err)
{
    (void)err;
    member *me = ctx;
    group *g = me->g;
    if (me->rank != 0)
        return HX_OK;
    for (int r = 0; r < g->stages[me->stage + 1].tp; r++)
        inbox_push(&g->mem[me->stage + 1][r].rows, x, rows * hidden);
    return HX_OK;
}

/* Rank 0 of the last stage publishes the tokens to every engine of the other stages. */
static hx_status g_tokens(void *ctx, int *tokens, int n, int is_source, hx_err *err)
{
    member *me = ctx;
    group *g = me->g;
    if (!is_source)
        return inbox_pop(&me->toks, tokens, n, "tokens", err);
    /* only the last stage's rank 0 publishes: to every other engine of the group */
    assert_int_equal(me->stage, g->n_stages - 1);
    assert_int_equal(me->rank, 0);
    for (int s = 0; s < g->n_stages; s++)
        for (int r = s == g->n_stages - 1 ? 1 : 0; r < g->stages[s].tp; r++)
            inbox_push(&g->mem[s][r].toks, tokens, n);
    return HX_OK;
}

/* A group of the layout stages[0..n) of the test model; every engine on a 1-thread pool. */
static group *group_new(const hx_kv_stage *stages, int n)
{
    group *g = calloc(1, sizeof *g);
    assert_non_null(g);
    g->n_stages = n;
    hx_err err = {0};
    for (int s = 0; s < n; s++) {
        g->stages[s] = stages[s];
        pthread_barrier_init(&g->bar[s], NULL, (unsigned)stages[s].tp);
        for (int r = 0; r < stages[s].tp; r++) {
            member *me = &g->mem[s][r];
            me->g = g;
            me->stage = s;
            me->rank = r;
            inbox_init(&me->rows);
            inbox_init(&me->toks);
            hx_llama_options lo;
            hx_llama_options_init(&lo);
            lo.first_layer = stages[s].layer_first;
            lo.num_layers = stages[s].num_layers;
            lo.threads = 1;
            lo.tp_rank = r;
            lo.tp_size = stages[s].tp;
            if (hx_llama_load(model, &lo, &me->m, &err) != HX_OK)
                fail_msg("load stage %d rank %d: %s", s, r, err.msg);
            const hx_model *c = hx_llama_config(me->m);
            g->vocab = c->vocab_size;
            if (!g->sum[s]) {
                g->sum[s] = malloc((size_t)GROUP_STEP_TOKENS * c->hidden_size * sizeof(float));
                assert_non_null(g->sum[s]);
            }
            hx_batch_options o;
            hx_batch_options_init(&o);
            o.max_seqs = MAX_REQ;
            o.max_step_tokens = GROUP_STEP_TOKENS;
            o.block_tokens = 4;
            o.max_blocks = 256;
            o.max_seq_tokens = 128;
            const hx_batch_comm comm = {me, g_allreduce, g_recv_rows, g_send_rows, g_tokens};
            /* a whole model at TP 1 runs without a comm */
            const int whole = n == 1 && stages[0].tp == 1;
            if (hx_batch_new(me->m, &o, whole ? NULL : &comm, &me->b, &err) != HX_OK)
                fail_msg("engine stage %d rank %d: %s", s, r, err.msg);
            if (s == n - 1) {
                me->logits = calloc((size_t)MAX_REQ * MAX_NEW * c->vocab_size, sizeof(float));
                assert_non_null(me->logits);
            }
        }
    }
    return g;
}

static void group_free(group *g)
{
    for (int s = 0; s < g->n_stages; s++) {
        for (int r = 0; r < g->stages[s].tp; r++) {
            member *me = &g->mem[s][r];
            hx_batch_free(me->b);
            hx_llama_free(me->m);
            inbox_release(&me->rows);
            inbox_release(&me->toks);
            free(me->logits);
        }
        pthread_barrier_destroy(&g->bar[s]);
        free(g->sum[s]);
    }
    free(g);
}

/* One engine's thread: the script's adds and steps, until every request has finished. */
static void *member_run(void *arg)
{
    member *me = arg;
    const group *g = me->g;
    const int V = g->vocab;
    int done = 0;
    for (int i = 0; i < MAX_REQ; i++)
        me->first_index[i] = -1;
    for (int step = 0; step < 1000; step++) {
        for (int i = 0; i < g->n_req; i++) {
            const script_req *q = &g->script[i];
            if (q->join_step != step)
                continue;
            me->st = q->first_token >= 0
                         ? hx_batch_add_prefilled(me->b, &q->r, q->first_token, me->segs[i],
                                                  me->n_segs[i], &me->err)
                         : hx_batch_add(me->b, &q->r, &me->err);
            if (me->st != HX_OK)
                return NULL;
        }
        if (done == g->n_req)
            break;
        const hx_batch_event *ev;
        int n_ev;
        if ((me->st = hx_batch_step(me->b, &ev, &n_ev, &me->err)) != HX_OK)
            return NULL;
        me->steps++;
        for (int e = 0; e < n_ev; e++) {
            int i = 0;
            while (i < g->n_req && g->script[i].r.id != ev[e].id)
                i++;
            if (i == g->n_req || ev[e].index >= MAX_NEW || me->finished[i]) {
                me->st = hx_err_set(&me->err, HX_EINTERNAL, "unexpected event for %llu",
                                    (unsigned long long)ev[e].id);
                return NULL;
            }
            if (me->first_index[i] < 0)
                me->first_index[i] = ev[e].index;
            me->tokens[i][ev[e].index] = ev[e].token;
            me->n_got[i]++;
            if (me->logits && ev[e].logits)
                memcpy(me->logits + ((size_t)i * MAX_NEW + ev[e].index) * V, ev[e].logits,
                       (size_t)V * sizeof(float));
            if ((ev[e].logits != NULL) != (me->logits != NULL)) {
                me->st = hx_err_set(&me->err, HX_EINTERNAL,
                                    "logits on a stage without the head, or none on the last");
                return NULL;
            }
            if (ev[e].finished) {
                me->finished[i] = 1;
                done++;
            }
        }
    }
    me->st = done == g->n_req ? HX_OK
                              : hx_err_set(&me->err, HX_EINTERNAL, "%d of %d requests finished",
                                           done, g->n_req);
    return NULL;
}

/* Runs the script on every engine of g at once (each on its own thread). */
static void group_run(group *g, const script_req *script, int n_req)
{
    g->script = script;
    g->n_req = n_req;
    pthread_t th[MAX_STAGES * MAX_TP];
    int n = 0;
    for (int s = 0; s < g->n_stages; s++)
        for (int r = 0; r < g->stages[s].tp; r++) {
            member *me = &g->mem[s][r];
            memset(me->tokens, 0, sizeof me->tokens);
            memset(me->n_got, 0, sizeof me->n_got);
            memset(me->finished, 0, sizeof me->finished);
            me->steps = 0;
            assert_int_equal(pthread_create(&th[n++], NULL, member_run, me), 0);
        }
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    for (int s = 0; s < g->n_stages; s++)
        for (int r = 0; r < g->stages[s].tp; r++) {
            if (g->mem[s][r].st != HX_OK)
                fail_msg("stage %d rank %d: %s", s, r, g->mem[s][r].err.msg);
            /* every row and token published was taken: the comm calls matched up */
            if (g->mem[s][r].rows.head || g->mem[s][r].toks.head)
                fail_msg("stage %d rank %d: messages left unread", s, r);
        }
}

/* The reference of each request of a script: tokens and logits from token 0 on. */
typedef struct want {
    int tokens[MAX_NEW], n;
    float *logits; /* [max_new][vocab] */
} want;

static void want_for(const hx_llama *whole, const script_req *script, const int (*prompts)[48],
                     int n_req, want *w)
{
    for (int i = 0; i < n_req; i++)
        w[i].logits = reference(whole, prompts[i], script[i].r.n_prompt,
                                script[i].r.max_new_tokens, script[i].r.eos_id, w[i].tokens,
                                &w[i].n);
}

/*
 * Every engine of g saw every request's tokens (from its first_index on,
 * request i's first event index being first[i]), equal to the reference; the
 * last stage's logits agree within LOGIT_TOL; held requests are still there.
 */
static void group_check(const group *g, const want *w, const int *first, const char *layout)
{
    const int V = g->vocab;
    for (int s = 0; s < g->n_stages; s++)
        for (int r = 0; r < g->stages[s].tp; r++) {
            const member *me = &g->mem[s][r];
            for (int i = 0; i < g->n_req; i++) {
                char what[160];
                snprintf(what, sizeof what, "%s, stage %d rank %d, request %d", layout, s, r, i);
                if (me->first_index[i] != first[i] || me->n_got[i] != w[i].n - first[i])
                    fail_msg("%s: events %d.. (%d of them); expected %d.. (%d)", what,
                             me->first_index[i], me->n_got[i], first[i], w[i].n - first[i]);
                for (int t = first[i]; t < w[i].n; t++) {
                    if (me->tokens[i][t] != w[i].tokens[t])
                        fail_msg("%s: token %d is %d, hx_llama_generate gives %d", what, t,
                                 me->tokens[i][t], w[i].tokens[t]);
                    if (me->logits)
                        compare_logits(what, t, me->logits + ((size_t)i * MAX_NEW + t) * V,
                                       w[i].logits + (size_t)t * V, V, 0);
                }
            }
        }
}

/* Several prompts of different lengths, joining at different steps, one stopping at eos. */
static int decode_script(const hx_llama *whole, script_req *sc, int (*prompts)[48], want *w)
{
    const int V = hx_llama_config(whole)->vocab_size;
    static const int n_prompt[5] = {1, 6, 13, 29, 4};
    static const int max_new[5] = {12, 9, 7, 5, 16};
    static const int join[5] = {0, 0, 1, 2, 5};
    for (int i = 0; i < 5; i++) {
        some_tokens(prompts[i], n_prompt[i], (uint64_t)(200 + i), V);
        sc[i] = (script_req){{(uint64_t)(500 + i), prompts[i], n_prompt[i], max_new[i], -1, 0,
                              1, 0, 0},
                             join[i], -1};
    }
    /* request 1 stops at its own eos: the reference's 4th token */
    int t[MAX_NEW], n;
    free(reference(whole, prompts[1], n_prompt[1], max_new[1], -1, t, &n));
    sc[1].r.eos_id = t[3];
    want_for(whole, sc, (const int(*)[48])prompts, 5, w);
    assert_true(w[1].n <= 4);
    return 5;
}

/* Runs the decode script on each layout (layouts[i]: n_stages[i] stages) and checks it. */
static void decode_layouts(const hx_kv_stage (*layouts)[MAX_STAGES], const int *n_stages,
                           int n_layouts)
{
    hx_llama *whole = load(1);
    script_req sc[MAX_REQ];
    int prompts[MAX_REQ][48];
    want w[MAX_REQ];
    const int n = decode_script(whole, sc, prompts, w);
    const int first[MAX_REQ] = {0};
    for (int k = 0; k < n_layouts; k++) {
        char name[96];
        int o = snprintf(name, sizeof name, "layout");
        for (int s = 0; s < n_stages[k]; s++)
            o += snprintf(name + o, sizeof name - (size_t)o, " [layers %d-%d, tp %d]",
                          layouts[k][s].layer_first,
                          layouts[k][s].layer_first + layouts[k][s].num_layers - 1,
                          layouts[k][s].tp);
        group *g = group_new(layouts[k], n_stages[k]);
        group_run(g, sc, n);
        group_check(g, w, first, name);
        for (int s = 0; s < g->n_stages; s++)
            for (int r = 0; r < g->stages[s].tp; r++) {
                check_cache_empty(g->mem[s][r].b);
                /* the schedules agreed: every engine ran the same steps */
                assert_int_equal(g->mem[s][r].steps, g->mem[0][0].steps);
            }
        group_free(g);
    }
    for (int i = 0; i < n; i++)
        free(w[i].logits);
    hx_llama_free(whole);
}

/* TP 2 (2 KV heads: one each) and TP 4 (one query head each, KV heads replicated). */
static void test_group_tp(void **state)
{
    (void)state;
    const hx_kv_stage layouts[2][MAX_STAGES] = {{{0, 3, 2}}, {{0, 3, 4}}};
    const int n_stages[2] = {1, 1};
    decode_layouts(layouts, n_stages, 2);
}

/* Two stages of 1 and 2 layers, and of 2 and 1. */
static void test_group_pp(void **state)
{
    (void)state;
    const hx_kv_stage layouts[2][MAX_STAGES] = {{{0, 1, 1}, {1, 2, 1}}, {{0, 2, 1}, {2, 1, 1}}};
    const int n_stages[2] = {2, 2};
    decode_layouts(layouts, n_stages, 2);
}

/* Two stages of TP 2; stages of different degrees (1 and 4); three stages (2, 1, 4). */
static void test_group_pp_tp(void **state)
{
    (void)state;
    const hx_kv_stage layouts[3][MAX_STAGES] = {{{0, 2, 2}, {2, 1, 2}},
                                                {{0, 1, 1}, {1, 2, 4}},
                                                {{0, 1, 2}, {1, 1, 1}, {2, 1, 4}}};
    const int n_stages[3] = {2, 2, 3};
    decode_layouts(layouts, n_stages, 3);
}

/*
 * A prefill group (hold_kv, max_new_tokens 1) gives each request's first
 * token and keeps its KV; the KV moves as hx_kv_plan_segments' pieces to a
 * decode group of another layout, which continues as hx_llama_generate does.
 */
static void prefill_then_decode(const hx_kv_stage *src, int n_src, const hx_kv_stage *dst,
                                int n_dst, const char *what)
{
    hx_llama *whole = load(1);
    const hx_model *c = hx_llama_config(whole);
    const int V = c->vocab_size, L = c->num_layers, K = c->num_kv_heads, d = c->head_dim;
    enum { N = 4, NEW = 10 };
    static const int n_prompt[N] = {7, 1, 18, 33};
    int prompts[MAX_REQ][48];
    script_req pre[N], dec[N];
    want w[N];
    for (int i = 0; i < N; i++) {
        some_tokens(prompts[i], n_prompt[i], (uint64_t)(300 + i), V);
        pre[i] = (script_req){{(uint64_t)(40 + i), prompts[i], n_prompt[i], 1, -1, 0, 1, 0, 1},
                              i / 2, -1};
        w[i].logits = reference(whole, prompts[i], n_prompt[i], NEW, -1, w[i].tokens, &w[i].n);
        assert_int_equal(w[i].n, NEW);
    }

    /* prefill: one token each, the KV held */
    group *p = group_new(src, n_src);
    group_run(p, pre, N);
    int first[N];
    for (int i = 0; i < N; i++)
        first[i] = 0;
    want w1[N];
    for (int i = 0; i < N; i++) {
        w1[i] = w[i];
        w1[i].n = 1;
    }
    group_check(p, w1, first, what);
    for (int s = 0; s < n_src; s++)
        for (int r = 0; r < src[s].tp; r++) {
            const hx_batch *b = p->mem[s][r].b;
            assert_int_equal(hx_batch_seq_count(b), N); /* held after the last token */
            for (int i = 0; i < N; i++) {
                int kv = hx_batch_seq_kv(b, pre[i].r.id);
                assert_true(kv >= 0);
                assert_int_equal(hx_kvcache_seq_tokens(hx_batch_kvcache(b), kv), n_prompt[i]);
            }
            assert_int_equal(hx_batch_seq_kv(b, 12345), -1);
            /* a held request takes no rows: a step does nothing */
            const hx_batch_event *ev;
            int n_ev;
            hx_err err = {0};
            assert_int_equal(hx_batch_step(p->mem[s][r].b, &ev, &n_ev, &err), HX_OK);
            assert_int_equal(n_ev, 0);
        }

    /* the pieces, packed on the prefill side, parsed on the decode side */
    hx_kv_piece pieces[64];
    int n_pieces = 0;
    hx_err err = {0};
    if (hx_kv_plan_segments(L, K, src, n_src, dst, n_dst, pieces, 64, &n_pieces, &err) != HX_OK)
        fail_msg("plan: %s", err.msg);
    group *q = group_new(dst, n_dst);
    void *bufs[N * 64];
    int n_bufs = 0;
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < n_pieces; k++) {
            const hx_kv_piece *pc = &pieces[k];
            const hx_batch *sb = p->mem[pc->src_stage][pc->src_rank].b;
            size_t size = hx_kv_segment_bytes(HX_KV_DTYPE_F32, pc->num_layers, pc->num_heads, n_prompt[i], d);
            void *buf = malloc(size);
            assert_non_null(buf);
            bufs[n_bufs++] = buf;
            size_t got = 0;
            if (hx_kvcache_pack(hx_batch_kvcache(sb), hx_batch_seq_kv(sb, pre[i].r.id),
                                pc->layer_first, pc->num_layers, pc->head_first, pc->num_heads,
                                buf, size, &got, &err) != HX_OK)
                fail_msg("pack piece %d: %s", k, err.msg);
            member *dm = &q->mem[pc->dst_stage][pc->dst_rank];
            assert_true(dm->n_segs[i] < 16);
            assert_int_equal(hx_kv_segment_parse(buf, got, &dm->segs[i][dm->n_segs[i]++], &err),
                             HX_OK);
        }
        dec[i] = (script_req){{(uint64_t)(40 + i), NULL, n_prompt[i], NEW, -1, 0, 1, 0, 0},
                              i % 3, w[i].tokens[0]};
    }
    /* the prefill side lets them go */
    for (int s = 0; s < n_src; s++)
        for (int r = 0; r < src[s].tp; r++) {
            for (int i = 0; i < N; i++)
                assert_int_equal(hx_batch_remove(p->mem[s][r].b, pre[i].r.id, &err), HX_OK);
            check_cache_empty(p->mem[s][r].b);
        }
    group_free(p);

    /* decode: tokens 1 .. NEW-1 */
    group_run(q, dec, N);
    for (int i = 0; i < N; i++)
        first[i] = 1;
    group_check(q, w, first, what);
    for (int s = 0; s < n_dst; s++)
        for (int r = 0; r < dst[s].tp; r++)
            check_cache_empty(q->mem[s][r].b);
    group_free(q);
    for (int i = 0; i < n_bufs; i++)
        free(bufs[i]);
    for (int i = 0; i < N; i++)
        free(w[i].logits);
    hx_llama_free(whole);
}

static void test_prefill_to_decode(void **state)
{
    (void)state;
    const hx_kv_stage tp2[1] = {{0, 3, 2}}, tp1[1] = {{0, 3, 1}}, tp4[1] = {{0, 3, 4}};
    const hx_kv_stage pp2[2] = {{0, 1, 1}, {1, 2, 1}};
    const hx_kv_stage pp2tp2[2] = {{0, 2, 2}, {2, 1, 2}};
    prefill_then_decode(tp2, 1, tp1, 1, "prefill TP 2 -> decode TP 1");
    prefill_then_decode(pp2, 2, tp2, 1, "prefill PP 2 -> decode TP 2");
    prefill_then_decode(tp4, 1, pp2tp2, 2, "prefill TP 4 -> decode PP 2 x TP 2");
}

/* ---- group errors ----------------------------------------------------------------------------- */

typedef struct failing {
    hx_status code; /* what the failing callback returns */
    int calls;
} failing;

static hx_status f_allreduce(void *ctx, float *x, size_t n, hx_err *err)
{
    (void)x;
    (void)n;
    failing *f = ctx;
    f->calls++;
    return hx_err_set(err, f->code, "peer rank gone");
}

static hx_status f_recv_rows(void *ctx, float *x, int rows, int hidden, hx_err *err)
{
    (void)x;
    (void)rows;
    (void)hidden;
    failing *f = ctx;
    f->calls++;
    return hx_err_set(err, f->code, "previous stage gone");
}

static hx_status ok_send_rows(void *ctx, const float *x, int rows, int hidden, hx_err *err)
{
    (void)ctx;
    (void)x;
    (void)rows;
    (void)hidden;
    (void)err;
    return HX_OK;
}

static hx_status f_tokens(void *ctx, int *tokens, int n, int is_source, hx_err *err)
{
    (void)tokens;
    (void)n;
    failing *f = ctx;
    f->calls++;
    assert_int_equal(is_source, 0);
    return hx_err_set(err, f->code, "no tokens in time");
}

static hx_llama *load_part(int first, int num, int rank, int tp)
{
    hx_llama_options lo;
    hx_llama_options_init(&lo);
    lo.first_layer = first;
    lo.num_layers = num;
    lo.threads = 1;
    lo.tp_rank = rank;
    lo.tp_size = tp;
    hx_llama *m = NULL;
    hx_err err = {0};
    if (hx_llama_load(model, &lo, &m, &err) != HX_OK)
        fail_msg("load: %s", err.msg);
    return m;
}

/* The step fails with the callback's error; the engine stays consistent. */
static void step_fails(hx_llama *m, const hx_batch_comm *comm, hx_status code,
                       const char *needle)
{
    hx_batch_options o;
    hx_batch_options_init(&o);
    o.max_seq_tokens = 64;
    hx_batch *b = NULL;
    hx_err err = {0};
    assert_int_equal(hx_batch_new(m, &o, comm, &b, &err), HX_OK);
    int p[5] = {HX_TINY_BOS_ID, 5, 6, 7, 8};
    hx_batch_request r = {1, p, 5, 4, -1, 0, 1, 0, 0};
    assert_int_equal(hx_batch_add(b, &r, &err), HX_OK);
    const hx_batch_event *ev;
    int n_ev = -1;
    assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), code);
    assert_int_equal(n_ev, 0);
    if (!strstr(err.msg, needle))
        fail_msg("'%s' does not say '%s'", err.msg, needle);
    /* again: the same positions, the same failure; then the request can go */
    assert_int_equal(hx_batch_step(b, &ev, &n_ev, &err), code);
    assert_int_equal(hx_kvcache_seq_tokens(hx_batch_kvcache(b), hx_batch_seq_kv(b, 1)), 5);
    assert_int_equal(hx_batch_remove(b, 1, &err), HX_OK);
    check_cache_empty(b);
    hx_batch_free(b);
}

static void test_group_errors(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_batch *x = NULL;
    failing f = {HX_ECONN, 0};
    const hx_batch_comm all = {&f, f_allreduce, f_recv_rows, ok_send_rows, f_tokens};

    /* a comm without a callback the engine needs */
    hx_llama *tp = load_part(0, 0, 1, 2);
    assert_int_equal(hx_batch_new(tp, NULL, NULL, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "TP rank 1 of 2"));
    assert_non_null(strstr(err.msg, "needs a comm with allreduce"));
    hx_batch_comm c = all;
    c.allreduce = NULL;
    assert_int_equal(hx_batch_new(tp, NULL, &c, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "allreduce"));
    assert_null(x);
    c = (hx_batch_comm){&f, f_allreduce, NULL, NULL, NULL}; /* TP ranks share rank 0's tokens */
    assert_int_equal(hx_batch_new(tp, NULL, &c, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "tokens"));
    c.tokens = f_tokens; /* a whole stage needs no more */
    assert_int_equal(hx_batch_new(tp, NULL, &c, &x, &err), HX_OK);
    hx_batch_free(x);
    x = NULL;

    hx_llama *s0 = load_part(0, 1, 0, 1), *s1 = load_part(1, 2, 0, 1);
    c = all;
    c.send_rows = NULL;
    assert_int_equal(hx_batch_new(s0, NULL, &c, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "send_rows"));
    c = all;
    c.tokens = NULL;
    assert_int_equal(hx_batch_new(s0, NULL, &c, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "tokens"));
    assert_int_equal(hx_batch_new(s1, NULL, &c, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "tokens"));
    c = all;
    c.recv_rows = NULL;
    assert_int_equal(hx_batch_new(s1, NULL, &c, &x, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "recv_rows"));
    assert_null(x);

    /* a sliced model is not for the single-sequence path */
    const int V = hx_llama_config(tp)->vocab_size;
    hx_llama_state *st = NULL;
    hx_llama_sampler *g = NULL;
    assert_int_equal(hx_llama_state_new(tp, 16, 0, &st, &err), HX_OK);
    assert_int_equal(hx_llama_sampler_new(V, 0, 1, 1, &g, &err), HX_OK);
    int p[3] = {HX_TINY_BOS_ID, 1, 2}, out[4], n_out = -1;
    assert_int_equal(hx_llama_generate(tp, st, g, p, 3, 4, -1, out, &n_out, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "tensor-parallel rank 1 of 2"));
    assert_int_equal(n_out, 0);
    const float *logits;
    assert_int_equal(hx_llama_prefill(tp, st, p, 3, 0, &logits, &err), HX_EINVAL);
    hx_llama_sampler_free(g);
    hx_llama_state_free(st);

    /* a failing callback fails the step with its error */
    step_fails(tp, &all, HX_ECONN, "all-reduce after the o projection failed: peer rank gone");
    assert_int_equal(f.calls, 2);
    f = (failing){HX_ETIMEDOUT, 0};
    step_fails(s1, &all, HX_ETIMEDOUT, "recv_rows failed: previous stage gone");
    f = (failing){HX_EIO, 0};
    step_fails(s0, &all, HX_EIO, "tokens failed: no tokens in time");
    assert_int_equal(f.calls, 2);
    hx_llama_free(tp);
    hx_llama_free(s0);
    hx_llama_free(s1);
}

/* ---- the rules shared with the cuda engine (no model needed) --------------------------------- */

/* A tokens hook that records its call and writes `give` (n of them) where it is not the source. */
typedef struct tokens_hook {
    int calls, last_n, last_source;
    hx_status code;   /* returned; an error with msg ("" : none set) */
    const char *msg;
    int give[4];
} tokens_hook;

static hx_status rec_tokens(void *ctx, int *tokens, int n, int is_source, hx_err *err)
{
    tokens_hook *t = ctx;
    t->calls++;
    t->last_n = n;
    t->last_source = is_source;
    if (t->code != HX_OK)
        return t->msg[0] ? hx_err_set(err, t->code, "%s", t->msg) : t->code;
    if (!is_source)
        for (int i = 0; i < n; i++)
            tokens[i] = t->give[i];
    return HX_OK;
}

static hx_batch_site site(int first_layer, int num_layers, int rank, int tp, int first,
                          int last)
{
    return (hx_batch_site){"xeng", first_layer, num_layers, rank, tp, first, last};
}

static void expect_msg(const hx_err *err, const char *expected)
{
    if (strcmp(err->msg, expected) != 0)
        fail_msg("got '%s', want '%s'", err->msg, expected);
}

static void test_shared_comm_missing(void **state)
{
    (void)state;
    /* test_group_errors' callbacks: only whether they are set counts here */
    const hx_batch_comm all = {NULL, f_allreduce, f_recv_rows, ok_send_rows, rec_tokens};
    hx_batch_comm c;

    /* a whole model at TP 1 needs nothing, and calls nothing */
    hx_batch_site at = site(0, 4, 0, 1, 1, 1);
    assert_true(hx_batch_site_alone(&at));
    assert_null(hx_batch_comm_missing(&at, NULL, 0));
    c = (hx_batch_comm){0};
    assert_null(hx_batch_comm_missing(&at, &c, 0));

    /* TP: allreduce first (unless summed on the device), then tokens */
    at = site(0, 4, 1, 2, 1, 1);
    assert_false(hx_batch_site_alone(&at));
    assert_string_equal(hx_batch_comm_missing(&at, NULL, 0), "allreduce");
    assert_string_equal(hx_batch_comm_missing(&at, NULL, 1), "tokens");
    c = (hx_batch_comm){NULL, f_allreduce, NULL, NULL, NULL};
    assert_string_equal(hx_batch_comm_missing(&at, &c, 0), "tokens");
    c.tokens = rec_tokens;
    assert_null(hx_batch_comm_missing(&at, &c, 0));
    c.allreduce = NULL;
    assert_string_equal(hx_batch_comm_missing(&at, &c, 0), "allreduce");
    assert_null(hx_batch_comm_missing(&at, &c, 1));

    /* a middle stage: recv_rows, then send_rows, then tokens; no allreduce at TP 1 */
    at = site(2, 1, 0, 1, 0, 0);
    assert_false(hx_batch_site_alone(&at));
    assert_string_equal(hx_batch_comm_missing(&at, NULL, 0), "recv_rows");
    c = all;
    c.allreduce = NULL;
    assert_null(hx_batch_comm_missing(&at, &c, 0));
    c.recv_rows = NULL;
    c.send_rows = NULL;
    assert_string_equal(hx_batch_comm_missing(&at, &c, 0), "recv_rows");
    c.recv_rows = f_recv_rows;
    assert_string_equal(hx_batch_comm_missing(&at, &c, 0), "send_rows");
    c.send_rows = ok_send_rows;
    c.tokens = NULL;
    assert_string_equal(hx_batch_comm_missing(&at, &c, 0), "tokens");

    /* the first stage needs no recv_rows, the last no send_rows */
    at = site(0, 2, 0, 1, 1, 0);
    c = (hx_batch_comm){NULL, NULL, NULL, ok_send_rows, rec_tokens};
    assert_null(hx_batch_comm_missing(&at, &c, 0));
    at = site(2, 2, 0, 1, 0, 1);
    c = (hx_batch_comm){NULL, NULL, f_recv_rows, NULL, rec_tokens};
    assert_null(hx_batch_comm_missing(&at, &c, 0));
}

static void test_shared_request_checks(void **state)
{
    (void)state;
    hx_err err = {0};
    int p[3] = {1, 9, 2};
    hx_batch_request r = {7, p, 3, 4, -1, 0.5f, 0.9f, 1, 0};
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_OK);

    r.n_prompt = 0;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_EINVAL);
    expect_msg(&err, "xeng: request 7: 0 prompt tokens, 4 new (at least 1 each)");
    r.n_prompt = 3;
    r.max_new_tokens = 0;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_EINVAL);
    expect_msg(&err, "xeng: request 7: 3 prompt tokens, 0 new (at least 1 each)");

    /* 3 + 5 - 1 = 7 positions: one too many (the last token is never fed back) */
    r.max_new_tokens = 5;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_ERANGE);
    expect_msg(&err, "xeng: request 7: 3 prompt tokens + 5 new need 7 positions; a sequence "
                     "may use 6");
    r.n_prompt = 2000000000; /* the sum must not wrap */
    r.prompt = NULL;
    r.max_new_tokens = 2000000000;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_ERANGE);
    assert_non_null(strstr(err.msg, "need 3999999999 positions"));

    r = (hx_batch_request){7, p, 3, 4, -1, 0, 1, 0, 0};
    p[1] = 10;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_EINVAL);
    expect_msg(&err, "xeng: request 7: prompt token 10 at index 1 is outside the vocabulary "
                     "of 10");
    p[1] = -1;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "prompt token -1 at index 1"));
    /* without a prompt (added prefilled) only the sizes count */
    r.prompt = NULL;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_OK);
    /* sampling parameters are the engine's to check */
    r.temperature = -1;
    r.top_p = 5;
    assert_int_equal(hx_batch_check_request("xeng", &r, 10, 6, &err), HX_OK);

    /* prefilled: the first token, something left to decode, segments */
    r = (hx_batch_request){8, NULL, 3, 2, 4, 0, 1, 0, 0};
    assert_int_equal(hx_batch_check_prefilled("xeng", &r, 9, 1, 10, &err), HX_OK);
    assert_int_equal(hx_batch_check_prefilled("xeng", &r, 10, 1, 10, &err), HX_EINVAL);
    expect_msg(&err, "xeng: request 8: first token 10 is outside the vocabulary of 10");
    assert_int_equal(hx_batch_check_prefilled("xeng", &r, -2, 1, 10, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "first token -2 is outside"));
    assert_int_equal(hx_batch_check_prefilled("xeng", &r, 4, 1, 10, &err), HX_EINVAL);
    expect_msg(&err, "xeng: request 8: nothing is left to decode after its first token");
    r.max_new_tokens = 1;
    assert_int_equal(hx_batch_check_prefilled("xeng", &r, 3, 1, 10, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "nothing is left to decode"));
    r.max_new_tokens = 2;
    assert_int_equal(hx_batch_check_prefilled("xeng", &r, 3, 0, 10, &err), HX_EINVAL);
    expect_msg(&err, "xeng: request 8: no KV segments");
    /* the first token is checked before the rest */
    assert_int_equal(hx_batch_check_prefilled("xeng", &r, 10, 0, 10, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "first token 10"));
}

static void test_shared_comm_errors(void **state)
{
    (void)state;
    hx_err err = {0}, inner = {0};
    const hx_batch_site at = site(4, 3, 1, 2, 0, 1);
    snprintf(inner.msg, sizeof inner.msg, "peer gone");
    assert_int_equal(hx_batch_comm_failed(&at, HX_ECONN, "recv_rows", &inner, &err), HX_ECONN);
    expect_msg(&err, "xeng: stage of layers 4-6, TP rank 1 of 2: recv_rows failed: peer gone");
    inner.msg[0] = '\0'; /* no message: the code's */
    assert_int_equal(hx_batch_comm_failed(&at, HX_ETIMEDOUT, "send_rows", &inner, &err),
                     HX_ETIMEDOUT);
    char line[256];
    snprintf(line, sizeof line, "xeng: stage of layers 4-6, TP rank 1 of 2: send_rows failed: %s",
             hx_strerror(HX_ETIMEDOUT));
    expect_msg(&err, line);

    /* the all-reduce names the model-wide layer */
    snprintf(inner.msg, sizeof inner.msg, "rank 0 gone");
    assert_int_equal(hx_batch_allreduce_failed(&at, 2, "down", HX_ECONN, &inner, &err), HX_ECONN);
    expect_msg(&err, "xeng: layer 6, TP rank 1 of 2: all-reduce after the down projection "
                     "failed: rank 0 gone");
    inner.msg[0] = '\0';
    assert_int_equal(hx_batch_allreduce_failed(&at, 0, "o", HX_EIO, &inner, &err), HX_EIO);
    snprintf(line, sizeof line, "xeng: layer 4, TP rank 1 of 2: all-reduce after the o "
             "projection failed: %s", hx_strerror(HX_EIO));
    expect_msg(&err, line);
}

static void test_shared_comm_tokens(void **state)
{
    (void)state;
    hx_err err = {0};
    tokens_hook t = {0, -1, -1, HX_OK, "", {3, 0, 9, 1}};
    const hx_batch_comm c = {&t, NULL, NULL, NULL, rec_tokens};
    int tok[4] = {5, 5, 5, 5};

    /* alone: no call (the comm may be empty) */
    hx_batch_site at = site(0, 4, 0, 1, 1, 1);
    const hx_batch_comm none = {0};
    assert_int_equal(hx_batch_comm_tokens(&none, &at, tok, 4, 10, &err), HX_OK);
    assert_int_equal(t.calls, 0);

    /* the last stage's rank 0 is the source: its tokens stay */
    at = site(2, 2, 0, 2, 0, 1);
    assert_int_equal(hx_batch_comm_tokens(&c, &at, tok, 4, 10, &err), HX_OK);
    assert_int_equal(t.calls, 1);
    assert_int_equal(t.last_source, 1);
    assert_int_equal(t.last_n, 4);
    assert_int_equal(tok[0], 5);

    /* another rank of the last stage, and an earlier stage, take the hook's */
    at = site(2, 2, 1, 2, 0, 1);
    assert_int_equal(hx_batch_comm_tokens(&c, &at, tok, 4, 10, &err), HX_OK);
    assert_int_equal(t.last_source, 0);
    assert_memory_equal(tok, t.give, sizeof tok);
    at = site(0, 2, 0, 1, 1, 0);
    /* n 0: still a call */
    assert_int_equal(hx_batch_comm_tokens(&c, &at, tok, 0, 10, &err), HX_OK);
    assert_int_equal(t.calls, 3);
    assert_int_equal(t.last_n, 0);
    assert_int_equal(t.last_source, 0);

    /* a token outside the vocabulary */
    t.give[2] = 10;
    assert_int_equal(hx_batch_comm_tokens(&c, &at, tok, 4, 10, &err), HX_EINVAL);
    expect_msg(&err, "xeng: the tokens hook gave token 10 (event 2 of 4), outside the "
                     "vocabulary of 10");
    t.give[2] = 9;
    t.give[0] = -1;
    assert_int_equal(hx_batch_comm_tokens(&c, &at, tok, 4, 10, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "gave token -1 (event 0 of 4)"));

    /* the hook's failure, wrapped; with no message, the code's */
    t.code = HX_EIO;
    t.msg = "no tokens in time";
    assert_int_equal(hx_batch_comm_tokens(&c, &at, tok, 4, 10, &err), HX_EIO);
    expect_msg(&err, "xeng: stage of layers 0-1, TP rank 0 of 1: tokens failed: no tokens in "
                     "time");
    t.code = HX_ECONN;
    t.msg = "";
    assert_int_equal(hx_batch_comm_tokens(&c, &at, tok, 4, 10, &err), HX_ECONN);
    assert_non_null(strstr(err.msg, hx_strerror(HX_ECONN)));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_eight_sequences_portable),
        cmocka_unit_test(test_eight_sequences_avx2),
        cmocka_unit_test(test_imported_kv),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_admission),
        cmocka_unit_test(test_group_tp),
        cmocka_unit_test(test_group_pp),
        cmocka_unit_test(test_group_pp_tp),
        cmocka_unit_test(test_prefill_to_decode),
        cmocka_unit_test(test_group_errors),
        cmocka_unit_test(test_shared_comm_missing),
        cmocka_unit_test(test_shared_request_checks),
        cmocka_unit_test(test_shared_comm_errors),
        cmocka_unit_test(test_shared_comm_tokens),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
