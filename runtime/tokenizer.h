/*
 * tokenizer.h - BPE tokenizers read from Hugging Face `tokenizer.json`.
 *
 * Two shapes of `model.type == "BPE"` are supported, as the Llama family uses
 * them:
 *
 *   byte-level BPE (GPT-2, Llama-3, Qwen2): pre_tokenizer ByteLevel, alone
 *     (GPT-2 split) or in a Sequence after a Split regex; every byte of the
 *     text maps to one character of the GPT-2 bytes_to_unicode table, merges
 *     apply within each pre-token, decoder ByteLevel.
 *   SentencePiece-style BPE (Llama-2, Mistral): normalizer Sequence of
 *     Prepend("▁") and Replace(" ", "▁"), or pre_tokenizer Metaspace;
 *     byte_fallback turns characters outside the vocab into <0xHH> tokens;
 *     decoder Sequence of Replace("▁", " "), ByteFallback, Fuse, Strip, or
 *     decoder Metaspace.
 *
 * Encoding: added tokens (`added_tokens`: "<s>", "<|begin_of_text|>", ...)
 * written literally in the text are matched first (leftmost, longest), then
 * each stretch of text between them is normalized, pre-tokenized and BPE-merged
 * (lowest merge rank first, leftmost first on a tie, exactly as Hugging Face
 * does). The BOS token that a post_processor template would add is NOT added:
 * the caller decides (see hx_tokenizer_bos and hx_tokenizer_adds_bos).
 *
 * Pre-tokenizer splits are coded by hand, not with a regex engine. Recognised
 * Split patterns: GPT-2's, Llama-3's (cl100k) and Qwen2's (Llama-3 with one
 * digit per number); any other pattern is HX_ENOTSUP. The Unicode classes
 * they use (\p{L}, \p{N}, \s) come from a table generated from Unicode 16.0,
 * so non-ASCII text splits as the regex splits it (Hugging Face tokenizers
 * 0.23 gave the same ids on thousands of random multilingual texts, emoji and
 * unassigned code points included). Bytes that are not valid UTF-8 count as
 * punctuation.
 *
 * Where this reader differs from Hugging Face:
 *   - a NFC normalizer is accepted but not applied (text is assumed NFC);
 *     other normalizers (Lowercase, NFKC, Precompiled, ...) are HX_ENOTSUP;
 *   - added tokens are matched on the raw text whether or not they are
 *     `normalized`; `single_word` is ignored; `lstrip`/`rstrip` strip ASCII
 *     whitespace only;
 *   - ByteLevel add_prefix_space is applied to each stretch of text before
 *     the Split, not to each piece after it (no known file has both);
 *   - `dropout` is ignored (encoding is deterministic);
 *   - decode writes the bytes of <0xHH> and byte-level tokens as they are,
 *     where Hugging Face replaces an invalid UTF-8 sequence with U+FFFD;
 *   - with no decoder, decode concatenates token strings (Hugging Face joins
 *     them with spaces); a file with no normalizer, no pre_tokenizer, a
 *     ByteLevel or no decoder, and all 256 byte-level characters in its vocab
 *     is read as GPT-2 byte-level (the shape `hexflow model make-tiny` may
 *     write), where Hugging Face would not byte-map it.
 * Behaviours of Hugging Face that are kept, though they do not round-trip:
 * a Prepend("▁") normalizer applies to every stretch between added tokens
 * ("<s>a" decodes to "<s> a"), and a Metaspace decoder drops every "▁" of the
 * first token (so "  a" decodes to " a" when "▁▁" is one token).
 *
 * BOS/EOS: BOS is the special token that the post_processor
 * TemplateProcessing (alone or in a Sequence) puts before "$A"; else
 * `bos_token` of a tokenizer_config.json beside tokenizer.json; else the first
 * of "<s>", "<|begin_of_text|>", "<bos>" that is a token. EOS is `eos_token`
 * of tokenizer_config.json; else a special token the template puts after
 * "$A"; else the first of "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"
 * that is a token.
 *
 * Errors (hx_err message names the file and the field):
 *   cannot open tokenizer 'x/tokenizer.json': no such file          HX_ENOENT
 *   tokenizer 'x/tokenizer.json':3:14: unexpected token ...         HX_EPARSE
 *   tokenizer 'x': model.type: 'Unigram' is not supported; expected BPE
 *                                                                   HX_ENOTSUP
 *   tokenizer 'x': model.merges[7]: token 'Ġq' is not in the vocab  HX_EPARSE
 *
 * Cost: load is O(file); encode is O(k log k) per pre-token of k symbols
 * (a heap of candidate merges), so a SentencePiece text, which is one
 * pre-token, is not quadratic; its workspace is about 40 bytes per input
 * byte, allocated once per call.
 *
 * Thread safety: a loaded tokenizer is immutable; encode, decode and the
 * look-ups may run from any number of threads at once.
 */
#ifndef HX_TOKENIZER_H
#define HX_TOKENIZER_H

#include <stddef.h>

#include "common/status.h"

/* Ids are below this; a file that uses a larger one is refused. */
#define HX_TOKENIZER_MAX_ID ((1 << 24) - 1)

typedef struct hx_tokenizer hx_tokenizer; /* opaque */

/*
 * Loads `path`: a tokenizer.json file or a directory holding one (and, either
 * way, reads tokenizer_config.json beside it when present, for bos_token and
 * eos_token). On success *out is a new tokenizer the caller frees with
 * hx_tokenizer_free. Codes: HX_ENOENT, HX_EIO, HX_EPARSE (malformed),
 * HX_ENOTSUP (a model, normalizer, pre-tokenizer or decoder this reader does
 * not implement), HX_ENOMEM, HX_EINVAL (bad arguments).
 */
hx_status hx_tokenizer_load(const char *path, hx_tokenizer **out, hx_err *err);

/* Frees `t`; NULL is a no-op. */
void hx_tokenizer_free(hx_tokenizer *t);

/*
 * Encodes `len` bytes of `text` (need not be NUL-terminated nor valid UTF-8;
 * may be NULL when len is 0). On success *ids is a new array of *n ids that
 * the caller frees with free(); it is non-NULL even when *n is 0. Special
 * tokens written literally in text (e.g. "<s>") are matched as added tokens.
 * No BOS is added. Fails with HX_EINVAL when a character has no token and
 * the tokenizer has neither byte fallback nor unk_token; HX_ENOMEM.
 * Allocates its workspace once per call, never per token.
 */
hx_status hx_tokenizer_encode(const hx_tokenizer *t, const char *text, size_t len, int **ids,
                              size_t *n, hx_err *err);

/*
 * Decodes `n` ids. On success *text is a new NUL-terminated buffer of *len
 * bytes (not counting the NUL; it may hold NUL bytes from <0x00>) that the
 * caller frees with free(). Special tokens come out as their text ("<s>").
 * HX_EINVAL names an id out of range or one with no token.
 */
hx_status hx_tokenizer_decode(const hx_tokenizer *t, const int *ids, size_t n, char **text,
                              size_t *len, hx_err *err);

/*
 * The bytes of one token, for streaming: *bytes points into `t` (valid until
 * hx_tokenizer_free; not NUL-terminated as far as the caller should assume)
 * and the caller appends *len of them to a buffer it owns. Byte-level and
 * <0xHH> tokens that split a UTF-8 character give their bytes as they are.
 * The concatenation of the pieces of a sequence equals hx_tokenizer_decode of
 * it, except that decode drops the leading space(s) that the decoder strips
 * at the start of the text (SentencePiece: "▁Hello" is " Hello" here and
 * "Hello" at the start of a decode); hx_tokenizer_strips_leading_space says
 * how many. When streaming a continuation of a prompt, keep that space.
 * HX_EINVAL for an id out of range or with no token.
 */
hx_status hx_tokenizer_token_bytes(const hx_tokenizer *t, int id, const char **bytes,
                                   size_t *len);

/* Number of ids: the largest id of the vocab and added tokens, plus one. */
int hx_tokenizer_vocab_size(const hx_tokenizer *t);

/* BOS / EOS ids, -1 when none (see the top of this file for how they are found). */
int hx_tokenizer_bos(const hx_tokenizer *t);
int hx_tokenizer_eos(const hx_tokenizer *t);

/*
 * 1 when the file's post_processor template adds BOS before the text (so
 * Hugging Face's encode would start with hx_tokenizer_bos), else 0.
 */
int hx_tokenizer_adds_bos(const hx_tokenizer *t);

/*
 * How many leading spaces decode strips from the start of its text: a Strip
 * decoder's count, plus 1 for a Metaspace decoder (which drops every "▁" of
 * the first token). 0 for byte-level tokenizers, 1 for Llama-2 style.
 */
int hx_tokenizer_strips_leading_space(const hx_tokenizer *t);

/* Id of the token spelled `token` exactly as in the file ("Ġthe", "<s>"); -1 when absent. */
int hx_tokenizer_token_id(const hx_tokenizer *t, const char *token);

#endif /* HX_TOKENIZER_H */
