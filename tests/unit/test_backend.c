/* test_backend.c - the engines behind one table: choice, refusals, and the cpu
 * engine through the table (prefill with held KV, export, decode elsewhere). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "runtime/backend.h"
#include "runtime/llama.h"
#include "runtime/tiny.h"

static char tmp_dir[256];
static char model[512];

static int setup(void **state)
{
    (void)state;
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/hx_test_backend_XXXXXX");
    if (!mkdtemp(tmp_dir))
        return -1;
    hx_tiny_config c;
    hx_tiny_config_init(&c);
    c.num_layers = 2;
    c.num_kv_heads = 2;
    c.seed = 3;
    snprintf(model, sizeof model, "%s/m", tmp_dir);
    hx_err err = {0};
    return hx_tiny_write(model, &c, &err) == HX_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    return system(cmd) == 0 ? 0 : -1;
}

static hx_backend_options whole(hx_backend_kind kind)
{
    hx_backend_options o = {kind, model, 0, 0, 0, 1, 0, 1, 4, 16, 0, 0};
    return o;
}

static void test_parse(void **state)
{
    (void)state;
    hx_backend_kind k;
    hx_err err = {0};
    assert_int_equal(hx_backend_parse("cpu", &k, &err), HX_OK);
    assert_int_equal(k, HX_BACKEND_CPU);
    assert_int_equal(hx_backend_parse("cuda", &k, &err), HX_OK);
    assert_int_equal(k, HX_BACKEND_CUDA);
    assert_int_equal(hx_backend_parse("auto", &k, &err), HX_OK);
    assert_int_equal(k, HX_BACKEND_AUTO);
    assert_int_equal(hx_backend_parse("gpu", &k, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "unknown backend 'gpu' (auto, cpu or cuda)"));
    assert_string_equal(hx_backend_name(HX_BACKEND_CUDA), "cuda");
}

/* Without a usable GPU, cuda is refused saying why, and auto runs on the cpu. */
static void test_choice_without_gpu(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_backend *b = NULL;
    hx_backend_options o = whole(HX_BACKEND_AUTO);
    assert_int_equal(hx_backend_open(&o, NULL, &b, &err), HX_OK);
    hx_backend_kind got = hx_backend_kind_of(b);
    hx_backend_close(b);
    if (got == HX_BACKEND_CUDA) {
        print_message("a GPU is here: auto chose cuda; the refusal is not checked\n");
        return;
    }
    assert_int_equal(got, HX_BACKEND_CPU);
    o = whole(HX_BACKEND_CUDA);
    assert_int_equal(hx_backend_open(&o, NULL, &b, &err), HX_ENOTSUP);
    assert_true(strstr(err.msg, "no CUDA device") || strstr(err.msg, "built without CUDA"));
    /* a stage is never given to the GPU engine by auto */
    o = whole(HX_BACKEND_AUTO);
    o.num_layers = 1;
    hx_batch_comm none = {0};
    assert_int_equal(hx_backend_open(&o, &none, &b, &err), HX_EINVAL); /* cpu: needs a comm */
}

/* Prefill on one engine with held KV, export it, continue on another = generate. */
static void test_prefill_export_decode(void **state)
{
    (void)state;
    hx_err err = {0};
    int prompt[5] = {72, 101, 108, 108, 111};
    const int max_new = 12;
    /* the reference */
    hx_llama *m = NULL;
    hx_llama_state *s = NULL;
    hx_llama_sampler *sm = NULL;
    int want[12], n_want = 0;
    assert_int_equal(hx_llama_load(model, NULL, &m, &err), HX_OK);
    assert_int_equal(hx_llama_state_new(m, 64, 0, &s, &err), HX_OK);
    assert_int_equal(hx_llama_sampler_new(hx_llama_config(m)->vocab_size, 0, 1, 1, &sm, &err),
                     HX_OK);
    assert_int_equal(hx_llama_generate(m, s, sm, prompt, 5, max_new, -1, want, &n_want, &err),
                     HX_OK);
    hx_llama_sampler_free(sm);
    hx_llama_state_free(s);
    hx_llama_free(m);

    hx_backend *p = NULL, *d = NULL;
    hx_backend_options o = whole(HX_BACKEND_CPU);
    assert_int_equal(hx_backend_open(&o, NULL, &p, &err), HX_OK);
    assert_int_equal(hx_backend_open(&o, NULL, &d, &err), HX_OK);
    int ctx = hx_backend_config(p)->max_position_tokens;
    assert_int_equal(hx_backend_max_seq_tokens(p), ctx < 4096 ? ctx : 4096);
    assert_true(hx_backend_can_admit(p, 5, 1));
    hx_batch_request r = {9, prompt, 5, 1, -1, 0, 1, 1, 1};
    assert_int_equal(hx_backend_add(p, &r, &err), HX_OK);
    const hx_batch_event *ev;
    int n = 0;
    assert_int_equal(hx_backend_step(p, &ev, &n, &err), HX_OK);
    assert_int_equal(n, 1);
    assert_int_equal(ev[0].token, want[0]);
    assert_int_equal(hx_backend_seq_tokens(p, 9), 5); /* held */
    assert_int_equal(hx_backend_seq_count(p), 1);

    const hx_model *c = hx_backend_config(p);
    assert_int_equal(hx_backend_kv_dtype(p), HX_KV_DTYPE_F32); /* the cpu engine's cache */
    size_t bytes = hx_kv_segment_bytes(hx_backend_kv_dtype(p), c->num_layers, c->num_kv_heads, 5,
                                       c->head_dim);
    void *buf = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    assert_int_equal(hx_backend_pack_kv(p, 9, 0, c->num_layers, 0, c->num_kv_heads, buf, bytes,
                                        NULL, &err),
                     HX_OK);
    assert_int_equal(hx_backend_pack_kv(p, 77, 0, 1, 0, 1, buf, bytes, NULL, &err), HX_ENOENT);
    assert_int_equal(hx_backend_remove(p, 9, &err), HX_OK);
    assert_int_equal(hx_backend_seq_tokens(p, 9), -1);

    hx_kv_segment seg;
    assert_int_equal(hx_kv_segment_parse(buf, bytes, &seg, &err), HX_OK);
    hx_batch_request rd = {9, NULL, 5, max_new, -1, 0, 1, 1, 0};
    assert_int_equal(hx_backend_add_prefilled(d, &rd, want[0], &seg, 1, &err), HX_OK);
    int got[12], n_got = 1;
    got[0] = want[0];
    while (hx_backend_seq_count(d) > 0) {
        assert_int_equal(hx_backend_step(d, &ev, &n, &err), HX_OK);
        for (int i = 0; i < n; i++)
            got[n_got++] = ev[i].token;
    }
    assert_int_equal(n_got, n_want);
    assert_memory_equal(got, want, sizeof(int) * (size_t)n_want);
    free(buf);
    hx_backend_close(p);
    hx_backend_close(d);
}

/* A KV budget too small for one block is refused, naming the sizes. */
static void test_kv_budget(void **state)
{
    (void)state;
    hx_err err = {0};
    hx_backend *b = NULL;
    hx_backend_options o = whole(HX_BACKEND_CPU);
    o.kv_budget_bytes = 100;
    assert_int_equal(hx_backend_open(&o, NULL, &b, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "KV budget of 100 bytes holds no block"));
    o.kv_budget_bytes = 1 << 20;
    assert_int_equal(hx_backend_open(&o, NULL, &b, &err), HX_OK);
    const hx_model *c = hx_backend_config(b);
    int per_block = 2 * c->num_layers * c->num_kv_heads * c->head_dim * 4 * 16;
    assert_int_equal(hx_backend_max_tokens(b), ((1 << 20) / per_block) * 16);
    hx_backend_close(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_choice_without_gpu),
        cmocka_unit_test(test_prefill_export_decode),
        cmocka_unit_test(test_kv_budget),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
