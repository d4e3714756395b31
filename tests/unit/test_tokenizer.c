/*
 * test_tokenizer.c - BPE tokenizers from tokenizer.json: byte-level (GPT-2,
 * Llama-3 splits), SentencePiece-style (Llama-2 normalizer, Metaspace), the
 * bare byte-level shape of `hexflow model make-tiny`, added tokens, byte
 * fallback, BOS/EOS, decode and streaming pieces, and the errors.
 *
 * Every tokenizer is written by hand into a temporary directory; the expected
 * ids follow from the merges by hand (each case says how).
 */
#define _POSIX_C_SOURCE 200809L

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/tokenizer.h"

/* ------------------------------------------------------------------------ */
/* Fixtures                                                                 */
/* ------------------------------------------------------------------------ */

static char g_dir[64];
static char *g_files[64];
static size_t g_nfiles;
static char *g_dirs[16];
static size_t g_ndirs;

static hx_tokenizer *g_bl;   /* byte-level, GPT-2 split */
static hx_tokenizer *g_l3;   /* byte-level, Llama-3 split, ignore_merges, merges as pairs */
static hx_tokenizer *g_sp;   /* SentencePiece-style: Prepend + Replace, byte fallback */
static hx_tokenizer *g_ms;   /* SentencePiece-style: Metaspace prepend_scheme first */
static hx_tokenizer *g_unk;  /* SentencePiece-style, no byte fallback: unk, fused */
static hx_tokenizer *g_tiny; /* make-tiny shape: bytes first, no pre_tokenizer / decoder */

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    assert_non_null(p);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Makes g_dir/name; returns its path (owned by the fixture list). */
static const char *make_subdir(const char *name)
{
    char *p = path_join(g_dir, name);
    assert_int_equal(mkdir(p, 0755), 0);
    g_dirs[g_ndirs++] = p;
    return p;
}

/* Writes text into dir/name; returns the path (owned by the fixture list). */
static const char *write_text(const char *dir, const char *name, const char *text)
{
    char *p = path_join(dir, name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    g_files[g_nfiles++] = p;
    return p;
}

/* Writes root (stolen) as dir/name. */
static const char *write_json(const char *dir, const char *name, json_t *root)
{
    char *text = json_dumps(root, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
    assert_non_null(text);
    const char *p = write_text(dir, name, text);
    free(text);
    json_decref(root);
    return p;
}

/* GPT-2 bytes_to_unicode, written out independently of the reader. */
static void byte_char(int b, char out[3])
{
    int cp;
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) {
        cp = b;
    } else {
        int k = 0;
        for (int x = 0; x < b; x++)
            if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174))
                k++;
        cp = 256 + k;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = '\0';
    } else {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = '\0';
    }
}

/* {"<char of byte b>": b} for the 256 bytes, then extra tokens from id 256. */
static json_t *byte_vocab(const char *const *extra, size_t n_extra)
{
    json_t *v = json_object();
    for (int b = 0; b < 256; b++) {
        char c[3];
        byte_char(b, c);
        json_object_set_new(v, c, json_integer(b));
    }
    for (size_t i = 0; i < n_extra; i++)
        json_object_set_new(v, extra[i], json_integer(256 + (json_int_t)i));
    return v;
}

static json_t *added_token(int id, const char *content)
{
    return json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", id, "content", content,
                     "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", 0, "special", 1);
}

static json_t *template_bos(const char *bos, int id)
{
    return json_pack("{s:s, s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}], s:[], s:{s:{s:s, s:[i], s:[s]}}}",
                     "type", "TemplateProcessing", "single", "SpecialToken", "id", bos,
                     "type_id", 0, "Sequence", "id", "A", "type_id", 0, "pair",
                     "special_tokens", bos, "id", bos, "ids", id, "tokens", bos);
}

static json_t *string_array(const char *const *s, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_string(s[i]));
    return a;
}

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/*
 * Byte-level, GPT-2 style. Ids 0..255 are the bytes; merges (rank order):
 *   0 Ġ t -> 256 Ġt    1 h e -> 257 he     2 Ġt he -> 258 Ġthe   3 t he -> 259 the
 *   4 i n -> 260 in    5 Ġ in -> 261 Ġin   6 Ċ Ċ -> 262 ĊĊ       7 3 4 -> 263 34
 *   8 ' M -> 264 'M
 * added: 265 <s>, 266 </s>; post_processor adds <s>.
 */
static const char *const bl_extra[] = {"Ġt", "he", "Ġthe", "the", "in", "Ġin", "ĊĊ", "34", "'M"};
static const char *const bl_merges[] = {"Ġ t", "h e", "Ġt he", "t he", "i n",
                                        "Ġ in", "Ċ Ċ", "3 4", "' M"};

static const char *write_bl(void)
{
    json_t *root = json_pack(
        "{s:s, s:n, s:[o, o], s:n, s:{s:s, s:b, s:b, s:b}, s:o, s:{s:s, s:b, s:b, s:b}, "
        "s:{s:s, s:n, s:n, s:n, s:n, s:b, s:b, s:o, s:o}}",
        "version", "1.0", "truncation", "added_tokens", added_token(265, "<s>"),
        added_token(266, "</s>"), "normalizer", "pre_tokenizer", "type", "ByteLevel",
        "add_prefix_space", 0, "trim_offsets", 1, "use_regex", 1, "post_processor",
        template_bos("<s>", 265), "decoder", "type", "ByteLevel", "add_prefix_space", 1,
        "trim_offsets", 1, "use_regex", 1, "model", "type", "BPE", "dropout", "unk_token",
        "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", 0, "byte_fallback", 0,
        "vocab", byte_vocab(bl_extra, COUNT(bl_extra)), "merges",
        string_array(bl_merges, COUNT(bl_merges)));
    assert_non_null(root);
    return write_json(make_subdir("bl"), "tokenizer.json", root);
}

/*
 * Byte-level, Llama-3 style: Split(Llama-3 regex) + ByteLevel(use_regex false),
 * ignore_merges, merges as pairs in a different order:
 *   0 h e   1 t he   2 Ġ t   3 Ġt he   4 i n   5 Ġ in   6 Ċ Ċ   7 3 4   8 ' M
 * vocab as bl plus 265 Ġworld (no merge makes it); added 266 <|begin_of_text|>,
 * 267 <|eot_id|>, 268 <|end_of_text|>; tokenizer_config.json names eos <|eot_id|>.
 */
static const char *const l3_extra[] = {"Ġt", "he",  "Ġthe", "the", "in",
                                       "Ġin", "ĊĊ", "34",   "'M",  "Ġworld"};
static const char *const l3_pairs[][2] = {{"h", "e"},   {"t", "he"}, {"Ġ", "t"},
                                          {"Ġt", "he"}, {"i", "n"},  {"Ġ", "in"},
                                          {"Ċ", "Ċ"},   {"3", "4"},  {"'", "M"}};
static const char l3_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static const char *write_l3(void)
{
    json_t *merges = json_array();
    for (size_t i = 0; i < COUNT(l3_pairs); i++)
        json_array_append_new(merges, json_pack("[s, s]", l3_pairs[i][0], l3_pairs[i][1]));
    json_t *pre = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b, s:b}]}", "type",
                            "Sequence", "pretokenizers", "type", "Split", "pattern", "Regex",
                            l3_regex, "behavior", "Isolated", "invert", 0, "type", "ByteLevel",
                            "add_prefix_space", 0, "trim_offsets", 1, "use_regex", 0);
    json_t *post = json_pack("{s:s, s:[{s:s, s:b, s:b, s:b}, o]}", "type", "Sequence",
                             "processors", "type", "ByteLevel", "add_prefix_space", 1,
                             "trim_offsets", 0, "use_regex", 1,
                             template_bos("<|begin_of_text|>", 266));
    json_t *root = json_pack(
        "{s:[o, o, o], s:n, s:o, s:o, s:{s:s, s:b, s:b, s:b}, "
        "s:{s:s, s:n, s:b, s:b, s:b, s:o, s:o}}",
        "added_tokens", added_token(266, "<|begin_of_text|>"), added_token(267, "<|eot_id|>"),
        added_token(268, "<|end_of_text|>"), "normalizer", "pre_tokenizer", pre,
        "post_processor", post, "decoder", "type", "ByteLevel", "add_prefix_space", 1,
        "trim_offsets", 1, "use_regex", 1, "model", "type", "BPE",
        "unk_token", "fuse_unk", 0, "byte_fallback", 0, "ignore_merges", 1, "vocab",
        byte_vocab(l3_extra, COUNT(l3_extra)), "merges", merges);
    assert_non_null(root);
    const char *dir = make_subdir("l3");
    write_text(dir, "tokenizer_config.json",
               "{\"bos_token\": \"<|begin_of_text|>\", \"eos_token\": {\"content\": "
               "\"<|eot_id|>\", \"special\": true}, \"chat_template\": \"...\"}\n");
    return write_json(dir, "tokenizer.json", root);
}

/*
 * SentencePiece-style (Llama-2). Ids: 0 <unk>, 1 <s>, 2 </s>, 3 + b for <0xHH>,
 * then 259 ▁, 260 t, 261 h, 262 e, 263 w, 264 o, 265 r, 266 l, 267 d, 268 é,
 * 269 ▁t, 270 he, 271 ▁the, 272 or, 273 ▁w, 274 ▁wor, 275 ld, 276 ▁world,
 * 277 H, 278 i, 279 ▁H, 280 ▁Hi, 281 ▁▁. Merges (rank order):
 *   0 ▁ t  1 h e  2 ▁t he  3 o r  4 ▁ w  5 ▁w or  6 l d  7 ▁wor ld  8 ▁ H  9 ▁H i
 *   10 ▁ ▁
 */
static const char *const sp_tokens[] = {"▁",   "t",  "h",   "e",    "w",   "o",
                                        "r",   "l",  "d",   "é",    "▁t",  "he",
                                        "▁the", "or", "▁w",  "▁wor", "ld",  "▁world",
                                        "H",   "i",  "▁H",  "▁Hi",  "▁▁"};
static const char *const sp_merges[] = {"▁ t",  "h e",      "▁t he", "o r",  "▁ w", "▁w or",
                                        "l d",  "▁wor ld", "▁ H",   "▁H i", "▁ ▁"};

static json_t *sp_vocab(void)
{
    json_t *v = json_object();
    json_object_set_new(v, "<unk>", json_integer(0));
    json_object_set_new(v, "<s>", json_integer(1));
    json_object_set_new(v, "</s>", json_integer(2));
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        json_object_set_new(v, name, json_integer(3 + b));
    }
    for (size_t i = 0; i < COUNT(sp_tokens); i++)
        json_object_set_new(v, sp_tokens[i], json_integer(259 + (json_int_t)i));
    return v;
}

/*
 * style 0: Llama-2 normalizer + decoder; 1: pre_tokenizer Metaspace (prepend_scheme
 * first), decoder ByteFallback + Metaspace; 2: like 0 without byte fallback
 */
static const char *write_sp(const char *name, int style)
{
    json_t *norm = json_null(), *pre = json_null(), *dec;
    if (style == 1) {
        pre = json_pack("{s:s, s:s, s:s, s:b}", "type", "Metaspace", "replacement", "▁",
                        "prepend_scheme", "first", "split", 0);
        dec = json_pack("{s:s, s:[{s:s}, {s:s, s:s, s:s, s:b}]}", "type", "Sequence",
                        "decoders", "type", "ByteFallback", "type", "Metaspace", "replacement",
                        "▁", "prepend_scheme", "first", "split", 0);
    } else {
        norm = json_pack("{s:s, s:[{s:s, s:s}, {s:s, s:{s:s}, s:s}]}", "type", "Sequence",
                         "normalizers", "type", "Prepend", "prepend", "▁", "type", "Replace",
                         "pattern", "String", " ", "content", "▁");
        dec = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s}, {s:s}, {s:s}, {s:s, s:s, s:i, s:i}]}",
                        "type", "Sequence", "decoders", "type", "Replace", "pattern", "String",
                        "▁", "content", " ", "type", "ByteFallback", "type", "Fuse", "type",
                        "Strip", "content", " ", "start", 1, "stop", 0);
    }
    json_t *root = json_pack(
        "{s:[o, o, o], s:o, s:o, s:o, s:o, s:{s:s, s:n, s:s, s:b, s:b, s:o, s:o}}",
        "added_tokens", added_token(0, "<unk>"), added_token(1, "<s>"), added_token(2, "</s>"),
        "normalizer", norm, "pre_tokenizer", pre, "post_processor", template_bos("<s>", 1),
        "decoder", dec, "model", "type", "BPE", "dropout", "unk_token", "<unk>", "fuse_unk", 1,
        "byte_fallback", style != 2, "vocab", sp_vocab(), "merges",
        string_array(sp_merges, COUNT(sp_merges)));
    assert_non_null(root);
    return write_json(make_subdir(name), "tokenizer.json", root);
}

/*
 * The make-tiny shape: the 256 byte tokens first, merges as "a b" strings,
 * added <s> and </s>, and nothing else (no normalizer, pre_tokenizer, decoder,
 * post_processor). Merges: 0 h e -> 256 he, 1 l l -> 257 ll, 2 Ġ w -> 258 Ġw;
 * added 259 <s>, 260 </s>.
 */
static const char *write_tiny(void)
{
    static const char *const extra[] = {"he", "ll", "Ġw"};
    static const char *const merges[] = {"h e", "l l", "Ġ w"};
    json_t *root = json_pack("{s:[o, o], s:{s:s, s:o, s:o}}", "added_tokens",
                             added_token(259, "<s>"), added_token(260, "</s>"), "model", "type",
                             "BPE", "vocab", byte_vocab(extra, COUNT(extra)), "merges",
                             string_array(merges, COUNT(merges)));
    assert_non_null(root);
    return write_json(make_subdir("tiny"), "tokenizer.json", root);
}

static hx_tokenizer *load_ok(const char *path)
{
    hx_tokenizer *t = NULL;
    hx_err err = {0};
    hx_status st = hx_tokenizer_load(path, &t, &err);
    if (st != HX_OK)
        fail_msg("loading '%s': %s", path, err.msg);
    return t;
}

static int setup(void **state)
{
    (void)state;
    strcpy(g_dir, "/tmp/hx_tokenizer_test_XXXXXX");
    if (!mkdtemp(g_dir))
        return -1;
    g_bl = load_ok(write_bl());
    g_l3 = load_ok(write_l3());
    g_sp = load_ok(write_sp("sp", 0));
    g_ms = load_ok(write_sp("ms", 1));
    g_unk = load_ok(write_sp("unk", 2));
    g_tiny = load_ok(write_tiny());
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    hx_tokenizer_free(g_bl);
    hx_tokenizer_free(g_l3);
    hx_tokenizer_free(g_sp);
    hx_tokenizer_free(g_ms);
    hx_tokenizer_free(g_unk);
    hx_tokenizer_free(g_tiny);
    for (size_t i = 0; i < g_nfiles; i++) {
        unlink(g_files[i]);
        free(g_files[i]);
    }
    while (g_ndirs > 0) {
        rmdir(g_dirs[--g_ndirs]);
        free(g_dirs[g_ndirs]);
    }
    rmdir(g_dir);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static void print_ids(const char *what, const int *ids, size_t n)
{
    fprintf(stderr, "%s:", what);
    for (size_t i = 0; i < n; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "\n");
}

static void check_ids_len(const hx_tokenizer *t, const char *text, size_t len, const int *want,
                          size_t nwant)
{
    int *ids = NULL;
    size_t n = 0;
    hx_err err = {0};
    hx_status st = hx_tokenizer_encode(t, text, len, &ids, &n, &err);
    if (st != HX_OK)
        fail_msg("encode '%s': %s", text, err.msg);
    assert_non_null(ids);
    int same = n == nwant && (n == 0 || memcmp(ids, want, n * sizeof *ids) == 0);
    if (!same) {
        fprintf(stderr, "text '%s'\n", text);
        print_ids("  want", want, nwant);
        print_ids("  got ", ids, n);
    }
    free(ids);
    if (!same)
        fail_msg("wrong ids for '%s'", text);
}

#define CHECK_IDS(t, text, ...)                                                               \
    do {                                                                                      \
        static const int want_[] = {__VA_ARGS__};                                             \
        check_ids_len(t, text, strlen(text), want_, COUNT(want_));                            \
    } while (0)

/*
 * decode(encode(text)) == text, and the streaming pieces concatenate to the
 * decoded text (after the leading space(s) the decoder strips).
 */
static void check_round_trip_len(const hx_tokenizer *t, const char *text, size_t len)
{
    int *ids = NULL;
    size_t n = 0;
    char *out = NULL;
    size_t out_len = 0;
    hx_err err = {0};
    if (hx_tokenizer_encode(t, text, len, &ids, &n, &err) != HX_OK)
        fail_msg("encode '%s': %s", text, err.msg);
    if (hx_tokenizer_decode(t, ids, n, &out, &out_len, &err) != HX_OK)
        fail_msg("decode '%s': %s", text, err.msg);
    if (out_len != len || memcmp(out, text, len) != 0) {
        print_ids("ids", ids, n);
        fail_msg("round trip of '%s' gave '%s'", text, out);
    }
    assert_int_equal(out[out_len], '\0');

    char *cat = malloc(4 * len + 16);
    size_t k = 0;
    assert_non_null(cat);
    for (size_t i = 0; i < n; i++) {
        const char *b;
        size_t bl;
        assert_int_equal(hx_tokenizer_token_bytes(t, ids[i], &b, &bl), HX_OK);
        memcpy(cat + k, b, bl);
        k += bl;
    }
    size_t skip = 0;
    while (skip < k && skip < (size_t)hx_tokenizer_strips_leading_space(t) && cat[skip] == ' ')
        skip++;
    assert_int_equal(k - skip, out_len);
    assert_memory_equal(cat + skip, out, out_len);
    free(cat);
    free(out);
    free(ids);
}

static void check_round_trip(const hx_tokenizer *t, const char *text)
{
    check_round_trip_len(t, text, strlen(text));
}

static const char *const samples[] = {
    "",
    "the the",
    "Hello, world!",
    "hello world",
    "  leading and trailing spaces  ",
    "many     spaces\tand\ttabs",
    "line one\nline two\r\nline three\n\n\nend\n",
    "\n",
    " ",
    "héllo wörld é",
    "日本語のテキスト 日本",
    "emoji 😀 and 👨‍👩‍👧 and 🇫🇷",
    "don't I'M we'RE you'll it's",
    "numbers 12345 3.14159 ½ ²",
    "mixed: Привет, Ελληνικά, हिन्दी, العربية",
    "code: int main(void) { return 0; }",
    "<s>special</s> inside <|begin_of_text|>",
};

/* ------------------------------------------------------------------------ */
/* Byte-level BPE                                                           */
/* ------------------------------------------------------------------------ */

static void test_bytelevel_ids(void **state)
{
    (void)state;
    /* "the" -> t h e -> t he (rank 1) -> the (rank 3); " the" -> Ġ t h e -> Ġt (0) -> he (1)
       -> Ġthe (2) */
    CHECK_IDS(g_bl, "the the", 259, 258);
    CHECK_IDS(g_bl, " in the", 261, 258);
    CHECK_IDS(g_bl, "in", 260);
    CHECK_IDS(g_bl, "ininin", 260, 260, 260);
    CHECK_IDS(g_bl, "hehe", 257, 257);
    /* " thee": Ġt, he, Ġthe, then the last e stays */
    CHECK_IDS(g_bl, " thee", 258, 101);
    /* GPT-2 split: "12345" is one pre-token, so 3 4 merges */
    CHECK_IDS(g_bl, "12345", '1', '2', 263, '5');
    /* GPT-2 contractions are lower case only: I ' M apart */
    CHECK_IDS(g_bl, "I'M", 'I', '\'', 'M');
    /* \s+(?!\S): "a\n\nb" is a, \n, \n, b; at the end the run stays whole */
    CHECK_IDS(g_bl, "a\n\nb", 'a', '\n', '\n', 'b');
    CHECK_IDS(g_bl, "a\n\n", 'a', 262);
    /* "  the": " " then " the" */
    CHECK_IDS(g_bl, "  the", ' ', 258);
    /* UTF-8 bytes map one by one */
    CHECK_IDS(g_bl, "é", 0xC3, 0xA9);
    CHECK_IDS(g_bl, "😀", 0xF0, 0x9F, 0x98, 0x80);
    CHECK_IDS(g_bl, "日本", 0xE6, 0x97, 0xA5, 0xE6, 0x9C, 0xAC);
    check_ids_len(g_bl, "", 0, NULL, 0);
    check_ids_len(g_bl, NULL, 0, NULL, 0);
    /* bytes that are not UTF-8, and NUL, are tokens like any other */
    CHECK_IDS(g_bl, "\xff\xfe", 0xFF, 0xFE);
    check_ids_len(g_bl, "a\0b", 3, (const int[]){'a', 0, 'b'}, 3);
}

static void test_bytelevel_round_trip(void **state)
{
    (void)state;
    for (size_t i = 0; i < COUNT(samples); i++) {
        check_round_trip(g_bl, samples[i]);
        check_round_trip(g_l3, samples[i]);
        check_round_trip(g_tiny, samples[i]);
    }
    check_round_trip_len(g_bl, "a\0b\xff\xc3", 5);
    check_round_trip_len(g_l3, "\xe6\x97", 2); /* half a character */
}

static void test_bytelevel_special_tokens(void **state)
{
    (void)state;
    CHECK_IDS(g_bl, "<s>the</s>", 265, 259, 266);
    CHECK_IDS(g_bl, "<s><s>", 265, 265);
    CHECK_IDS(g_bl, "x<s", 'x', '<', 's');
    /* the text after an added token is split on its own: " the" keeps its Ġ */
    CHECK_IDS(g_bl, "<s> the", 265, 258);
    assert_int_equal(hx_tokenizer_bos(g_bl), 265);
    assert_int_equal(hx_tokenizer_eos(g_bl), 266); /* by name: </s> */
    assert_int_equal(hx_tokenizer_adds_bos(g_bl), 1);
    assert_int_equal(hx_tokenizer_vocab_size(g_bl), 267);
    assert_int_equal(hx_tokenizer_strips_leading_space(g_bl), 0);
    assert_int_equal(hx_tokenizer_token_id(g_bl, "Ġthe"), 258);
    assert_int_equal(hx_tokenizer_token_id(g_bl, "<s>"), 265);
    assert_int_equal(hx_tokenizer_token_id(g_bl, "Ġ"), ' ');
    assert_int_equal(hx_tokenizer_token_id(g_bl, "nope"), -1);
    assert_int_equal(hx_tokenizer_token_id(g_bl, NULL), -1);

    /* special tokens decode to their text */
    char *out;
    size_t len;
    hx_err err = {0};
    int ids[] = {265, 259, 266};
    assert_int_equal(hx_tokenizer_decode(g_bl, ids, 3, &out, &len, &err), HX_OK);
    assert_string_equal(out, "<s>the</s>");
    free(out);
}

static void test_llama3_split(void **state)
{
    (void)state;
    /* \p{N}{1,3}: "123" "45", so the 3 4 merge cannot happen */
    CHECK_IDS(g_l3, "12345", '1', '2', '3', '4', '5');
    CHECK_IDS(g_l3, "1234", '1', '2', '3', '4');
    /* case-insensitive contractions: I 'M */
    CHECK_IDS(g_l3, "I'M", 'I', 264);
    /* ignore_merges: " world" is in the vocab though no merge builds it */
    CHECK_IDS(g_l3, " world", 265);
    CHECK_IDS(g_l3, "the the", 259, 258);
    /* rank order of this file: h e (0), t he (1) before Ġ t (2): Ġ the e */
    CHECK_IDS(g_l3, " thee", ' ', 259, 'e');
    /* [^\r\n\p{L}\p{N}]?\p{L}+: "!in" is one pre-token; i n still merge inside it */
    CHECK_IDS(g_l3, "!in", '!', 260);
    /* \s*[\r\n]+ keeps a newline run whole before text */
    CHECK_IDS(g_l3, "a\n\n\nb", 'a', 262, '\n', 'b');
    CHECK_IDS(g_l3, "<|begin_of_text|>hi<|eot_id|>", 266, 'h', 'i', 267);
    assert_int_equal(hx_tokenizer_bos(g_l3), 266);
    assert_int_equal(hx_tokenizer_adds_bos(g_l3), 1);
    /* tokenizer_config.json's eos_token beats the <|end_of_text|> name */
    assert_int_equal(hx_tokenizer_eos(g_l3), 267);
    assert_int_equal(hx_tokenizer_vocab_size(g_l3), 269);
}

static void test_make_tiny_shape(void **state)
{
    (void)state;
    /* read as GPT-2 byte-level: "hello" -> he ll o; " world" -> Ġw o r l d */
    CHECK_IDS(g_tiny, "hello world", 256, 257, 'o', 258, 'o', 'r', 'l', 'd');
    CHECK_IDS(g_tiny, "<s>hello</s>", 259, 256, 257, 'o', 260);
    assert_int_equal(hx_tokenizer_bos(g_tiny), 259);
    assert_int_equal(hx_tokenizer_eos(g_tiny), 260);
    assert_int_equal(hx_tokenizer_adds_bos(g_tiny), 0);
    assert_int_equal(hx_tokenizer_vocab_size(g_tiny), 261);
}

/* ------------------------------------------------------------------------ */
/* SentencePiece-style BPE                                                  */
/* ------------------------------------------------------------------------ */

#define FB(b) (3 + (b)) /* id of <0xHH> */

static void test_sentencepiece_ids(void **state)
{
    (void)state;
    /* "▁the▁world": ▁t he ▁the, or ▁w ▁wor ld ▁world */
    CHECK_IDS(g_sp, "the world", 271, 276);
    CHECK_IDS(g_sp, "Hi", 280);
    CHECK_IDS(g_sp, "é", 259, 268);
    /* byte fallback for characters outside the vocab */
    CHECK_IDS(g_sp, "日本", 259, FB(0xE6), FB(0x97), FB(0xA5), FB(0xE6), FB(0x9C), FB(0xAC));
    CHECK_IDS(g_sp, "\n", 259, FB('\n'));
    /* "▁▁▁the": ▁t he ▁the first (ranks 0-2), then ▁ ▁ (rank 10) */
    CHECK_IDS(g_sp, "  the", 281, 271);
    check_ids_len(g_sp, "", 0, NULL, 0);
    /* not UTF-8: each byte falls back */
    CHECK_IDS(g_sp, "\xff", 259, FB(0xFF));
    /* Prepend applies to every stretch of text between added tokens (HF legacy) */
    CHECK_IDS(g_sp, "<s>the", 1, 271);
    CHECK_IDS(g_sp, "the</s>", 271, 2);
    assert_int_equal(hx_tokenizer_bos(g_sp), 1);
    assert_int_equal(hx_tokenizer_eos(g_sp), 2);
    assert_int_equal(hx_tokenizer_adds_bos(g_sp), 1);
    assert_int_equal(hx_tokenizer_strips_leading_space(g_sp), 1);
    assert_int_equal(hx_tokenizer_vocab_size(g_sp), 282);
    assert_int_equal(hx_tokenizer_token_id(g_sp, "<0x0A>"), FB('\n'));
}

static void test_sentencepiece_decode(void **state)
{
    (void)state;
    char *out;
    size_t len;
    hx_err err = {0};
    int ids[] = {1, 271, 276};
    assert_int_equal(hx_tokenizer_decode(g_sp, ids, 3, &out, &len, &err), HX_OK);
    assert_string_equal(out, "<s> the world");
    free(out);
    assert_int_equal(hx_tokenizer_decode(g_sp, ids + 1, 2, &out, &len, &err), HX_OK);
    assert_string_equal(out, "the world"); /* the one leading space is stripped */
    free(out);

    const char *b;
    size_t bl;
    assert_int_equal(hx_tokenizer_token_bytes(g_sp, 271, &b, &bl), HX_OK);
    assert_int_equal(bl, 4);
    assert_memory_equal(b, " the", 4);
    assert_int_equal(hx_tokenizer_token_bytes(g_sp, FB(0xE6), &b, &bl), HX_OK);
    assert_int_equal(bl, 1);
    assert_int_equal((unsigned char)b[0], 0xE6);

    for (size_t i = 0; i < COUNT(samples); i++) {
        /* text after an added token gets its own ▁ ("<s>a" decodes to "<s> a", as in HF) */
        if (strchr(samples[i], '<'))
            continue;
        check_round_trip(g_sp, samples[i]);
        /* Metaspace drops every ▁ of the first token, so leading spaces are lost (as in HF) */
        if (samples[i][0] != ' ')
            check_round_trip(g_ms, samples[i]);
    }
    check_round_trip_len(g_sp, "a\0b\xff", 4);

    /* ▁▁ then ▁the: Strip takes one space; the Metaspace decoder all of the first token's */
    int two[] = {281, 271};
    assert_int_equal(hx_tokenizer_decode(g_sp, two, 2, &out, &len, &err), HX_OK);
    assert_string_equal(out, "  the");
    free(out);
    assert_int_equal(hx_tokenizer_decode(g_ms, two, 2, &out, &len, &err), HX_OK);
    assert_string_equal(out, " the");
    free(out);
    assert_int_equal(hx_tokenizer_token_bytes(g_ms, 281, &b, &bl), HX_OK);
    assert_int_equal(bl, 2);
    assert_memory_equal(b, "  ", 2);
}

static void test_metaspace(void **state)
{
    (void)state;
    CHECK_IDS(g_ms, "the world", 271, 276);
    /* prepend_scheme first: no ▁ after an added token */
    CHECK_IDS(g_ms, "<s>the", 1, 260, 270);
    CHECK_IDS(g_ms, "the<s> the", 271, 1, 271);
    assert_int_equal(hx_tokenizer_strips_leading_space(g_ms), 1);
}

static void test_unknown_without_fallback(void **state)
{
    (void)state;
    /* 日 and 本 have no token: one fused <unk> */
    CHECK_IDS(g_unk, "日本", 259, 0);
    CHECK_IDS(g_unk, "日 本", 259, 0, 259, 0);
    CHECK_IDS(g_unk, "Hi日本Hi", 280, 0, 277, 278);
}

/* ------------------------------------------------------------------------ */
/* Long input: linear-ish, not quadratic                                    */
/* ------------------------------------------------------------------------ */

static void test_long_text(void **state)
{
    (void)state;
    const char unit[] = "the world Hi ";
    size_t reps = 20000, ul = strlen(unit);
    char *text = malloc(reps * ul + 1);
    assert_non_null(text);
    for (size_t i = 0; i < reps; i++)
        memcpy(text + i * ul, unit, ul);
    text[reps * ul] = '\0';
    int *ids;
    size_t n;
    hx_err err = {0};
    /* SentencePiece: the whole text is one pre-token of 260000 symbols */
    assert_int_equal(hx_tokenizer_encode(g_sp, text, reps * ul, &ids, &n, &err), HX_OK);
    /* "▁the▁world▁Hi" per unit, and the final space is a lone ▁ */
    assert_int_equal(n, 3 * reps + 1);
    assert_int_equal(ids[0], 271);
    assert_int_equal(ids[1], 276);
    assert_int_equal(ids[2], 280);
    assert_int_equal(ids[n - 1], 259);
    free(ids);
    check_round_trip_len(g_sp, text, reps * ul);
    check_round_trip_len(g_bl, text, reps * ul);
    free(text);
}

/* ------------------------------------------------------------------------ */
/* Errors                                                                   */
/* ------------------------------------------------------------------------ */

static void expect_load_error(const char *path, hx_status code, const char *needle)
{
    hx_tokenizer *t = (hx_tokenizer *)&t;
    hx_err err = {0};
    hx_status st = hx_tokenizer_load(path, &t, &err);
    if (st != code)
        fail_msg("loading '%s': status %d (%s), want %d", path, st, err.msg, code);
    assert_null(t);
    assert_int_equal(err.code, code);
    if (!strstr(err.msg, needle))
        fail_msg("message '%s' lacks '%s'", err.msg, needle);
}

static void test_errors_files(void **state)
{
    (void)state;
    char *missing = path_join(g_dir, "x");
    char want[512];
    snprintf(want, sizeof want, "cannot open tokenizer '%s': no such file", missing);
    expect_load_error(missing, HX_ENOENT, want);
    free(missing);

    const char *empty_dir = make_subdir("empty");
    snprintf(want, sizeof want, "cannot open tokenizer '%s/tokenizer.json': no such file",
             empty_dir);
    expect_load_error(empty_dir, HX_ENOENT, want);

    const char *p = write_text(empty_dir, "bad.json", "{\n  \"model\": [1,\n}\n");
    snprintf(want, sizeof want, "tokenizer '%s':3:", p);
    expect_load_error(p, HX_EPARSE, want);

    p = write_text(empty_dir, "array.json", "[1, 2]");
    expect_load_error(p, HX_EPARSE, "expected a JSON object at the top level");
    p = write_text(empty_dir, "nomodel.json", "{\"added_tokens\": []}");
    expect_load_error(p, HX_EPARSE, "missing 'model'");
}

static void test_errors_content(void **state)
{
    (void)state;
    const char *d = make_subdir("bad");
    char want[512];
    const char *p = write_text(d, "unigram.json",
                               "{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}");
    snprintf(want, sizeof want,
             "tokenizer '%s': model.type: 'Unigram' is not supported; expected BPE", p);
    expect_load_error(p, HX_ENOTSUP, want);
    p = write_text(d, "wordpiece.json",
                   "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}");
    expect_load_error(p, HX_ENOTSUP, "model.type: 'WordPiece' is not supported; expected BPE");

    p = write_text(d, "merge.json",
                   "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2},"
                   " \"merges\": [\"a b\", \"a q\"]}}");
    expect_load_error(p, HX_EPARSE, "model.merges[1]: token 'q' is not in the vocab");
    p = write_text(d, "merged.json",
                   "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1},"
                   " \"merges\": [[\"a\", \"b\"]]}}");
    expect_load_error(p, HX_EPARSE, "model.merges[0]: merged token 'ab' is not in the vocab");
    p = write_text(d, "mergeshape.json",
                   "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a\"]}}");
    expect_load_error(p, HX_EPARSE, "model.merges[0]: 'a' is not two tokens");
    p = write_text(d, "vocabid.json",
                   "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -3}, \"merges\": []}}");
    expect_load_error(p, HX_EPARSE, "model.vocab['a']: expected an id");
    p = write_text(d, "dupid.json",
                   "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}}");
    expect_load_error(p, HX_EPARSE, "model.vocab: id 0 is given to both");
    p = write_text(d, "regex.json",
                   "{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\w+\"},"
                   " \"behavior\": \"Isolated\", \"invert\": false},"
                   " \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}");
    expect_load_error(p, HX_ENOTSUP, "pre_tokenizer.pattern.Regex: '\\w+' is not a split");
    p = write_text(d, "norm.json",
                   "{\"normalizer\": {\"type\": \"Sequence\", \"normalizers\": [{\"type\": "
                   "\"Lowercase\"}]}, \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, "
                   "\"merges\": []}}");
    expect_load_error(p, HX_ENOTSUP, "normalizer.normalizers[0].type: normalizer 'Lowercase'");
    p = write_text(d, "added.json",
                   "{\"added_tokens\": [{\"id\": \"x\", \"content\": \"<s>\"}],"
                   " \"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}");
    expect_load_error(p, HX_EPARSE, "added_tokens[0].id: expected an integer");

    const char *cd = make_subdir("badcfg");
    write_text(cd, "tokenizer_config.json", "{\"eos_token\": \"<nope>\"}");
    write_text(cd, "tokenizer.json",
               "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}");
    expect_load_error(cd, HX_EPARSE, "eos_token '<nope>' is not a token");
}

static void test_errors_ids(void **state)
{
    (void)state;
    char *out = (char *)&out;
    size_t len = 7;
    hx_err err = {0};
    int bad[] = {259, 999};
    assert_int_equal(hx_tokenizer_decode(g_bl, bad, 2, &out, &len, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "token id 999"));
    assert_non_null(strstr(err.msg, "position 1"));
    int neg[] = {-1};
    assert_int_equal(hx_tokenizer_decode(g_bl, neg, 1, &out, &len, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "token id -1"));

    const char *b;
    size_t bl;
    assert_int_equal(hx_tokenizer_token_bytes(g_bl, 267, &b, &bl), HX_EINVAL);
    assert_int_equal(hx_tokenizer_token_bytes(g_bl, -5, &b, &bl), HX_EINVAL);

    /* no byte fallback and no unk: an uncovered character is an error that says which */
    const char *d = make_subdir("nounk");
    const char *p = write_text(d, "tokenizer.json",
                               "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, "
                               "\"merges\": []}}");
    hx_tokenizer *t = load_ok(p);
    int *ids;
    size_t n;
    assert_int_equal(hx_tokenizer_encode(t, "ab", 2, &ids, &n, &err), HX_EINVAL);
    assert_non_null(strstr(err.msg, "cannot encode '\\x62'"));
    CHECK_IDS(t, "aa", 0, 0);
    hx_tokenizer_free(t);

    /* empty decode gives an empty string */
    assert_int_equal(hx_tokenizer_decode(g_bl, NULL, 0, &out, &len, &err), HX_OK);
    assert_int_equal(len, 0);
    assert_string_equal(out, "");
    free(out);

    hx_tokenizer_free(NULL);
    assert_int_equal(hx_tokenizer_load(NULL, &t, &err), HX_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bytelevel_ids),
        cmocka_unit_test(test_bytelevel_round_trip),
        cmocka_unit_test(test_bytelevel_special_tokens),
        cmocka_unit_test(test_llama3_split),
        cmocka_unit_test(test_make_tiny_shape),
        cmocka_unit_test(test_sentencepiece_ids),
        cmocka_unit_test(test_sentencepiece_decode),
        cmocka_unit_test(test_metaspace),
        cmocka_unit_test(test_unknown_without_fallback),
        cmocka_unit_test(test_long_text),
        cmocka_unit_test(test_errors_files),
        cmocka_unit_test(test_errors_content),
        cmocka_unit_test(test_errors_ids),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
