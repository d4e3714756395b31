/*
 * tokenizer.c - BPE tokenizers from Hugging Face tokenizer.json (see tokenizer.h).
 *
 * Layout of a loaded tokenizer:
 *   vocab[id]      the model vocab string of each id (span into vocab_arena)
 *   vocab_map      open-addressing hash: model vocab string -> id
 *   merges         open-addressing hash: (left id, right id) -> (rank, merged id)
 *   added[]        added tokens; added_map: content -> index; added_order and
 *                  added_bucket index them by first byte, longest first
 *   piece[id]      the decoded bytes of each id (span into piece_arena),
 *                  computed once at load by running the decoder on the token
 *
 * Encoding a text: split it at added tokens; run each stretch through the
 * normalizer steps, the pre-tokenizer (Metaspace / byte-level prefix, then a
 * split into pre-tokens), and BPE-merge each pre-token with a binary heap of
 * candidate pairs ordered by (rank, position) over a linked list of symbols:
 * O(k log k) for a pre-token of k symbols, so a Llama-2 text that is one
 * pre-token is not quadratic. The workspace is allocated once per call.
 */
#include "runtime/tokenizer.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/file.h"
#include "common/json.h"

#define HX_TOK_NONE UINT32_MAX /* span.off of an id without a string */
#define HX_TOK_BADCP UINT32_MAX /* a byte that is not valid UTF-8 */

/* ------------------------------------------------------------------------ */
/* Unicode classes for the pre-tokenizer splits                             */
/* ------------------------------------------------------------------------ */

enum { TL = 0 /* \p{L} */, TN /* \p{N} */, TS /* \s */, TO /* anything else */ };

typedef struct hx_tok_range {
    uint32_t lo, hi;
    uint8_t cls;
} hx_tok_range;

/*
 * The code points >= 0x80 that are letters (\p{L}), numbers (\p{N}: Nd, Nl,
 * No) or whitespace (\s: White_Space, what Oniguruma's \s matches), as
 * sorted ranges; every other code point (marks, punctuation, symbols, format
 * and control characters, private use, unassigned) is "other", as it is for
 * the regex. Generated with Python's unicodedata2 16.0.0 (Unicode 16.0, which
 * matched Hugging Face tokenizers 0.23 on code points of every plane):
 *
 *   cls(c) = S if c is White_Space; else L / N if category is L* / N*; else O
 *   emit each maximal run of c >= 0x80 with cls(c) != O
 */
static const hx_tok_range tok_classes[] = {
    {0x85, 0x85, TS}, {0xA0, 0xA0, TS}, {0xAA, 0xAA, TL}, {0xB2, 0xB3, TN}, {0xB5, 0xB5, TL},
    {0xB9, 0xB9, TN}, {0xBA, 0xBA, TL}, {0xBC, 0xBE, TN}, {0xC0, 0xD6, TL}, {0xD8, 0xF6, TL},
    {0xF8, 0x2C1, TL}, {0x2C6, 0x2D1, TL}, {0x2E0, 0x2E4, TL}, {0x2EC, 0x2EC, TL},
    {0x2EE, 0x2EE, TL}, {0x370, 0x374, TL}, {0x376, 0x377, TL}, {0x37A, 0x37D, TL},
    {0x37F, 0x37F, TL}, {0x386, 0x386, TL}, {0x388, 0x38A, TL}, {0x38C, 0x38C, TL},
    {0x38E, 0x3A1, TL}, {0x3A3, 0x3F5, TL}, {0x3F7, 0x481, TL}, {0x48A, 0x52F, TL},
    {0x531, 0x556, TL}, {0x559, 0x559, TL}, {0x560, 0x588, TL}, {0x5D0, 0x5EA, TL},
    {0x5EF, 0x5F2, TL}, {0x620, 0x64A, TL}, {0x660, 0x669, TN}, {0x66E, 0x66F, TL},
    {0x671, 0x6D3, TL}, {0x6D5, 0x6D5, TL}, {0x6E5, 0x6E6, TL}, {0x6EE, 0x6EF, TL},
    {0x6F0, 0x6F9, TN}, {0x6FA, 0x6FC, TL}, {0x6FF, 0x6FF, TL}, {0x710, 0x710, TL},
    {0x712, 0x72F, TL}, {0x74D, 0x7A5, TL}, {0x7B1, 0x7B1, TL}, {0x7C0, 0x7C9, TN},
    {0x7CA, 0x7EA, TL}, {0x7F4, 0x7F5, TL}, {0x7FA, 0x7FA, TL}, {0x800, 0x815, TL},
    {0x81A, 0x81A, TL}, {0x824, 0x824, TL}, {0x828, 0x828, TL}, {0x840, 0x858, TL},
    {0x860, 0x86A, TL}, {0x870, 0x887, TL}, {0x889, 0x88E, TL}, {0x8A0, 0x8C9, TL},
    {0x904, 0x939, TL}, {0x93D, 0x93D, TL}, {0x950, 0x950, TL}, {0x958, 0x961, TL},
    {0x966, 0x96F, TN}, {0x971, 0x980, TL}, {0x985, 0x98C, TL}, {0x98F, 0x990, TL},
    {0x993, 0x9A8, TL}, {0x9AA, 0x9B0, TL}, {0x9B2, 0x9B2, TL}, {0x9B6, 0x9B9, TL},
    {0x9BD, 0x9BD, TL}, {0x9CE, 0x9CE, TL}, {0x9DC, 0x9DD, TL}, {0x9DF, 0x9E1, TL},
    {0x9E6, 0x9EF, TN}, {0x9F0, 0x9F1, TL}, {0x9F4, 0x9F9, TN}, {0x9FC, 0x9FC, TL},
    {0xA05, 0xA0A, TL}, {0xA0F, 0xA10, TL}, {0xA13, 0xA28, TL}, {0xA2A, 0xA30, TL},
    {0xA32, 0xA33, TL}, {0xA35, 0xA36, TL}, {0xA38, 0xA39, TL}, {0xA59, 0xA5C, TL},
    {0xA5E, 0xA5E, TL}, {0xA66, 0xA6F, TN}, {0xA72, 0xA74, TL}, {0xA85, 0xA8D, TL},
    {0xA8F, 0xA91, TL}, {0xA93, 0xAA8, TL}, {0xAAA, 0xAB0, TL}, {0xAB2, 0xAB3, TL},
    {0xAB5, 0xAB9, TL}, {0xABD, 0xABD, TL}, {0xAD0, 0xAD0, TL}, {0xAE0, 0xAE1, TL},
    {0xAE6, 0xAEF, TN}, {0xAF9, 0xAF9, TL}, {0xB05, 0xB0C, TL}, {0xB0F, 0xB10, TL},
    {0xB13, 0xB28, TL}, {0xB2A, 0xB30, TL}, {0xB32, 0xB33, TL}, {0xB35, 0xB39, TL},
    {0xB3D, 0xB3D, TL}, {0xB5C, 0xB5D, TL}, {0xB5F, 0xB61, TL}, {0xB66, 0xB6F, TN},
    {0xB71, 0xB71, TL}, {0xB72, 0xB77, TN}, {0xB83, 0xB83, TL}, {0xB85, 0xB8A, TL},
    {0xB8E, 0xB90, TL}, {0xB92, 0xB95, TL}, {0xB99, 0xB9A, TL}, {0xB9C, 0xB9C, TL},
    {0xB9E, 0xB9F, TL}, {0xBA3, 0xBA4, TL}, {0xBA8, 0xBAA, TL}, {0xBAE, 0xBB9, TL},
    {0xBD0, 0xBD0, TL}, {0xBE6, 0xBF2, TN}, {0xC05, 0xC0C, TL}, {0xC0E, 0xC10, TL},
    {0xC12, 0xC28, TL}, {0xC2A, 0xC39, TL}, {0xC3D, 0xC3D, TL}, {0xC58, 0xC5A, TL},
    {0xC5D, 0xC5D, TL}, {0xC60, 0xC61, TL}, {0xC66, 0xC6F, TN}, {0xC78, 0xC7E, TN},
    {0xC80, 0xC80, TL}, {0xC85, 0xC8C, TL}, {0xC8E, 0xC90, TL}, {0xC92, 0xCA8, TL},
    {0xCAA, 0xCB3, TL}, {0xCB5, 0xCB9, TL}, {0xCBD, 0xCBD, TL}, {0xCDD, 0xCDE, TL},
    {0xCE0, 0xCE1, TL}, {0xCE6, 0xCEF, TN}, {0xCF1, 0xCF2, TL}, {0xD04, 0xD0C, TL},
    {0xD0E, 0xD10, TL}, {0xD12, 0xD3A, TL}, {0xD3D, 0xD3D, TL}, {0xD4E, 0xD4E, TL},
    {0xD54, 0xD56, TL}, {0xD58, 0xD5E, TN}, {0xD5F, 0xD61, TL}, {0xD66, 0xD78, TN},
    {0xD7A, 0xD7F, TL}, {0xD85, 0xD96, TL}, {0xD9A, 0xDB1, TL}, {0xDB3, 0xDBB, TL},
    {0xDBD, 0xDBD, TL}, {0xDC0, 0xDC6, TL}, {0xDE6, 0xDEF, TN}, {0xE01, 0xE30, TL},
    {0xE32, 0xE33, TL}, {0xE40, 0xE46, TL}, {0xE50, 0xE59, TN}, {0xE81, 0xE82, TL},
    {0xE84, 0xE84, TL}, {0xE86, 0xE8A, TL}, {0xE8C, 0xEA3, TL}, {0xEA5, 0xEA5, TL},
    {0xEA7, 0xEB0, TL}, {0xEB2, 0xEB3, TL}, {0xEBD, 0xEBD, TL}, {0xEC0, 0xEC4, TL},
    {0xEC6, 0xEC6, TL}, {0xED0, 0xED9, TN}, {0xEDC, 0xEDF, TL}, {0xF00, 0xF00, TL},
    {0xF20, 0xF33, TN}, {0xF40, 0xF47, TL}, {0xF49, 0xF6C, TL}, {0xF88, 0xF8C, TL},
    {0x1000, 0x102A, TL}, {0x103F, 0x103F, TL}, {0x1040, 0x1049, TN}, {0x1050, 0x1055, TL},
    {0x105A, 0x105D, TL}, {0x1061, 0x1061, TL}, {0x1065, 0x1066, TL}, {0x106E, 0x1070, TL},
    {0x1075, 0x1081, TL}, {0x108E, 0x108E, TL}, {0x1090, 0x1099, TN}, {0x10A0, 0x10C5, TL},
    {0x10C7, 0x10C7, TL}, {0x10CD, 0x10CD, TL}, {0x10D0, 0x10FA, TL}, {0x10FC, 0x1248, TL},
    {0x124A, 0x124D, TL}, {0x1250, 0x1256, TL}, {0x1258, 0x1258, TL}, {0x125A, 0x125D, TL},
    {0x1260, 0x1288, TL}, {0x128A, 0x128D, TL}, {0x1290, 0x12B0, TL}, {0x12B2, 0x12B5, TL},
    {0x12B8, 0x12BE, TL}, {0x12C0, 0x12C0, TL}, {0x12C2, 0x12C5, TL}, {0x12C8, 0x12D6, TL},
    {0x12D8, 0x1310, TL}, {0x1312, 0x1315, TL}, {0x1318, 0x135A, TL}, {0x1369, 0x137C, TN},
    {0x1380, 0x138F, TL}, {0x13A0, 0x13F5, TL}, {0x13F8, 0x13FD, TL}, {0x1401, 0x166C, TL},
    {0x166F, 0x167F, TL}, {0x1680, 0x1680, TS}, {0x1681, 0x169A, TL}, {0x16A0, 0x16EA, TL},
    {0x16EE, 0x16F0, TN}, {0x16F1, 0x16F8, TL}, {0x1700, 0x1711, TL}, {0x171F, 0x1731, TL},
    {0x1740, 0x1751, TL}, {0x1760, 0x176C, TL}, {0x176E, 0x1770, TL}, {0x1780, 0x17B3, TL},
    {0x17D7, 0x17D7, TL}, {0x17DC, 0x17DC, TL}, {0x17E0, 0x17E9, TN}, {0x17F0, 0x17F9, TN},
    {0x1810, 0x1819, TN}, {0x1820, 0x1878, TL}, {0x1880, 0x1884, TL}, {0x1887, 0x18A8, TL},
    {0x18AA, 0x18AA, TL}, {0x18B0, 0x18F5, TL}, {0x1900, 0x191E, TL}, {0x1946, 0x194F, TN},
    {0x1950, 0x196D, TL}, {0x1970, 0x1974, TL}, {0x1980, 0x19AB, TL}, {0x19B0, 0x19C9, TL},
    {0x19D0, 0x19DA, TN}, {0x1A00, 0x1A16, TL}, {0x1A20, 0x1A54, TL}, {0x1A80, 0x1A89, TN},
    {0x1A90, 0x1A99, TN}, {0x1AA7, 0x1AA7, TL}, {0x1B05, 0x1B33, TL}, {0x1B45, 0x1B4C, TL},
    {0x1B50, 0x1B59, TN}, {0x1B83, 0x1BA0, TL}, {0x1BAE, 0x1BAF, TL}, {0x1BB0, 0x1BB9, TN},
    {0x1BBA, 0x1BE5, TL}, {0x1C00, 0x1C23, TL}, {0x1C40, 0x1C49, TN}, {0x1C4D, 0x1C4F, TL},
    {0x1C50, 0x1C59, TN}, {0x1C5A, 0x1C7D, TL}, {0x1C80, 0x1C8A, TL}, {0x1C90, 0x1CBA, TL},
    {0x1CBD, 0x1CBF, TL}, {0x1CE9, 0x1CEC, TL}, {0x1CEE, 0x1CF3, TL}, {0x1CF5, 0x1CF6, TL},
    {0x1CFA, 0x1CFA, TL}, {0x1D00, 0x1DBF, TL}, {0x1E00, 0x1F15, TL}, {0x1F18, 0x1F1D, TL},
    {0x1F20, 0x1F45, TL}, {0x1F48, 0x1F4D, TL}, {0x1F50, 0x1F57, TL}, {0x1F59, 0x1F59, TL},
    {0x1F5B, 0x1F5B, TL}, {0x1F5D, 0x1F5D, TL}, {0x1F5F, 0x1F7D, TL}, {0x1F80, 0x1FB4, TL},
    {0x1FB6, 0x1FBC, TL}, {0x1FBE, 0x1FBE, TL}, {0x1FC2, 0x1FC4, TL}, {0x1FC6, 0x1FCC, TL},
    {0x1FD0, 0x1FD3, TL}, {0x1FD6, 0x1FDB, TL}, {0x1FE0, 0x1FEC, TL}, {0x1FF2, 0x1FF4, TL},
    {0x1FF6, 0x1FFC, TL}, {0x2000, 0x200A, TS}, {0x2028, 0x2029, TS}, {0x202F, 0x202F, TS},
    {0x205F, 0x205F, TS}, {0x2070, 0x2070, TN}, {0x2071, 0x2071, TL}, {0x2074, 0x2079, TN},
    {0x207F, 0x207F, TL}, {0x2080, 0x2089, TN}, {0x2090, 0x209C, TL}, {0x2102, 0x2102, TL},
    {0x2107, 0x2107, TL}, {0x210A, 0x2113, TL}, {0x2115, 0x2115, TL}, {0x2119, 0x211D, TL},
    {0x2124, 0x2124, TL}, {0x2126, 0x2126, TL}, {0x2128, 0x2128, TL}, {0x212A, 0x212D, TL},
    {0x212F, 0x2139, TL}, {0x213C, 0x213F, TL}, {0x2145, 0x2149, TL}, {0x214E, 0x214E, TL},
    {0x2150, 0x2182, TN}, {0x2183, 0x2184, TL}, {0x2185, 0x2189, TN}, {0x2460, 0x249B, TN},
    {0x24EA, 0x24FF, TN}, {0x2776, 0x2793, TN}, {0x2C00, 0x2CE4, TL}, {0x2CEB, 0x2CEE, TL},
    {0x2CF2, 0x2CF3, TL}, {0x2CFD, 0x2CFD, TN}, {0x2D00, 0x2D25, TL}, {0x2D27, 0x2D27, TL},
    {0x2D2D, 0x2D2D, TL}, {0x2D30, 0x2D67, TL}, {0x2D6F, 0x2D6F, TL}, {0x2D80, 0x2D96, TL},
    {0x2DA0, 0x2DA6, TL}, {0x2DA8, 0x2DAE, TL}, {0x2DB0, 0x2DB6, TL}, {0x2DB8, 0x2DBE, TL},
    {0x2DC0, 0x2DC6, TL}, {0x2DC8, 0x2DCE, TL}, {0x2DD0, 0x2DD6, TL}, {0x2DD8, 0x2DDE, TL},
    {0x2E2F, 0x2E2F, TL}, {0x3000, 0x3000, TS}, {0x3005, 0x3006, TL}, {0x3007, 0x3007, TN},
    {0x3021, 0x3029, TN}, {0x3031, 0x3035, TL}, {0x3038, 0x303A, TN}, {0x303B, 0x303C, TL},
    {0x3041, 0x3096, TL}, {0x309D, 0x309F, TL}, {0x30A1, 0x30FA, TL}, {0x30FC, 0x30FF, TL},
    {0x3105, 0x312F, TL}, {0x3131, 0x318E, TL}, {0x3192, 0x3195, TN}, {0x31A0, 0x31BF, TL},
    {0x31F0, 0x31FF, TL}, {0x3220, 0x3229, TN}, {0x3248, 0x324F, TN}, {0x3251, 0x325F, TN},
    {0x3280, 0x3289, TN}, {0x32B1, 0x32BF, TN}, {0x3400, 0x4DBF, TL}, {0x4E00, 0xA48C, TL},
    {0xA4D0, 0xA4FD, TL}, {0xA500, 0xA60C, TL}, {0xA610, 0xA61F, TL}, {0xA620, 0xA629, TN},
    {0xA62A, 0xA62B, TL}, {0xA640, 0xA66E, TL}, {0xA67F, 0xA69D, TL}, {0xA6A0, 0xA6E5, TL},
    {0xA6E6, 0xA6EF, TN}, {0xA717, 0xA71F, TL}, {0xA722, 0xA788, TL}, {0xA78B, 0xA7CD, TL},
    {0xA7D0, 0xA7D1, TL}, {0xA7D3, 0xA7D3, TL}, {0xA7D5, 0xA7DC, TL}, {0xA7F2, 0xA801, TL},
    {0xA803, 0xA805, TL}, {0xA807, 0xA80A, TL}, {0xA80C, 0xA822, TL}, {0xA830, 0xA835, TN},
    {0xA840, 0xA873, TL}, {0xA882, 0xA8B3, TL}, {0xA8D0, 0xA8D9, TN}, {0xA8F2, 0xA8F7, TL},
    {0xA8FB, 0xA8FB, TL}, {0xA8FD, 0xA8FE, TL}, {0xA900, 0xA909, TN}, {0xA90A, 0xA925, TL},
    {0xA930, 0xA946, TL}, {0xA960, 0xA97C, TL}, {0xA984, 0xA9B2, TL}, {0xA9CF, 0xA9CF, TL},
    {0xA9D0, 0xA9D9, TN}, {0xA9E0, 0xA9E4, TL}, {0xA9E6, 0xA9EF, TL}, {0xA9F0, 0xA9F9, TN},
    {0xA9FA, 0xA9FE, TL}, {0xAA00, 0xAA28, TL}, {0xAA40, 0xAA42, TL}, {0xAA44, 0xAA4B, TL},
    {0xAA50, 0xAA59, TN}, {0xAA60, 0xAA76, TL}, {0xAA7A, 0xAA7A, TL}, {0xAA7E, 0xAAAF, TL},
    {0xAAB1, 0xAAB1, TL}, {0xAAB5, 0xAAB6, TL}, {0xAAB9, 0xAABD, TL}, {0xAAC0, 0xAAC0, TL},
    {0xAAC2, 0xAAC2, TL}, {0xAADB, 0xAADD, TL}, {0xAAE0, 0xAAEA, TL}, {0xAAF2, 0xAAF4, TL},
    {0xAB01, 0xAB06, TL}, {0xAB09, 0xAB0E, TL}, {0xAB11, 0xAB16, TL}, {0xAB20, 0xAB26, TL},
    {0xAB28, 0xAB2E, TL}, {0xAB30, 0xAB5A, TL}, {0xAB5C, 0xAB69, TL}, {0xAB70, 0xABE2, TL},
    {0xABF0, 0xABF9, TN}, {0xAC00, 0xD7A3, TL}, {0xD7B0, 0xD7C6, TL}, {0xD7CB, 0xD7FB, TL},
    {0xF900, 0xFA6D, TL}, {0xFA70, 0xFAD9, TL}, {0xFB00, 0xFB06, TL}, {0xFB13, 0xFB17, TL},
    {0xFB1D, 0xFB1D, TL}, {0xFB1F, 0xFB28, TL}, {0xFB2A, 0xFB36, TL}, {0xFB38, 0xFB3C, TL},
    {0xFB3E, 0xFB3E, TL}, {0xFB40, 0xFB41, TL}, {0xFB43, 0xFB44, TL}, {0xFB46, 0xFBB1, TL},
    {0xFBD3, 0xFD3D, TL}, {0xFD50, 0xFD8F, TL}, {0xFD92, 0xFDC7, TL}, {0xFDF0, 0xFDFB, TL},
    {0xFE70, 0xFE74, TL}, {0xFE76, 0xFEFC, TL}, {0xFF10, 0xFF19, TN}, {0xFF21, 0xFF3A, TL},
    {0xFF41, 0xFF5A, TL}, {0xFF66, 0xFFBE, TL}, {0xFFC2, 0xFFC7, TL}, {0xFFCA, 0xFFCF, TL},
    {0xFFD2, 0xFFD7, TL}, {0xFFDA, 0xFFDC, TL}, {0x10000, 0x1000B, TL}, {0x1000D, 0x10026, TL},
    {0x10028, 0x1003A, TL}, {0x1003C, 0x1003D, TL}, {0x1003F, 0x1004D, TL},
    {0x10050, 0x1005D, TL}, {0x10080, 0x100FA, TL}, {0x10107, 0x10133, TN},
    {0x10140, 0x10178, TN}, {0x1018A, 0x1018B, TN}, {0x10280, 0x1029C, TL},
    {0x102A0, 0x102D0, TL}, {0x102E1, 0x102FB, TN}, {0x10300, 0x1031F, TL},
    {0x10320, 0x10323, TN}, {0x1032D, 0x10340, TL}, {0x10341, 0x10341, TN},
    {0x10342, 0x10349, TL}, {0x1034A, 0x1034A, TN}, {0x10350, 0x10375, TL},
    {0x10380, 0x1039D, TL}, {0x103A0, 0x103C3, TL}, {0x103C8, 0x103CF, TL},
    {0x103D1, 0x103D5, TN}, {0x10400, 0x1049D, TL}, {0x104A0, 0x104A9, TN},
    {0x104B0, 0x104D3, TL}, {0x104D8, 0x104FB, TL}, {0x10500, 0x10527, TL},
    {0x10530, 0x10563, TL}, {0x10570, 0x1057A, TL}, {0x1057C, 0x1058A, TL},
    {0x1058C, 0x10592, TL}, {0x10594, 0x10595, TL}, {0x10597, 0x105A1, TL},
    {0x105A3, 0x105B1, TL}, {0x105B3, 0x105B9, TL}, {0x105BB, 0x105BC, TL},
    {0x105C0, 0x105F3, TL}, {0x10600, 0x10736, TL}, {0x10740, 0x10755, TL},
    {0x10760, 0x10767, TL}, {0x10780, 0x10785, TL}, {0x10787, 0x107B0, TL},
    {0x107B2, 0x107BA, TL}, {0x10800, 0x10805, TL}, {0x10808, 0x10808, TL},
    {0x1080A, 0x10835, TL}, {0x10837, 0x10838, TL}, {0x1083C, 0x1083C, TL},
    {0x1083F, 0x10855, TL}, {0x10858, 0x1085F, TN}, {0x10860, 0x10876, TL},
    {0x10879, 0x1087F, TN}, {0x10880, 0x1089E, TL}, {0x108A7, 0x108AF, TN},
    {0x108E0, 0x108F2, TL}, {0x108F4, 0x108F5, TL}, {0x108FB, 0x108FF, TN},
    {0x10900, 0x10915, TL}, {0x10916, 0x1091B, TN}, {0x10920, 0x10939, TL},
    {0x10980, 0x109B7, TL}, {0x109BC, 0x109BD, TN}, {0x109BE, 0x109BF, TL},
    {0x109C0, 0x109CF, TN}, {0x109D2, 0x109FF, TN}, {0x10A00, 0x10A00, TL},
    {0x10A10, 0x10A13, TL}, {0x10A15, 0x10A17, TL}, {0x10A19, 0x10A35, TL},
    {0x10A40, 0x10A48, TN}, {0x10A60, 0x10A7C, TL}, {0x10A7D, 0x10A7E, TN},
    {0x10A80, 0x10A9C, TL}, {0x10A9D, 0x10A9F, TN}, {0x10AC0, 0x10AC7, TL},
    {0x10AC9, 0x10AE4, TL}, {0x10AEB, 0x10AEF, TN}, {0x10B00, 0x10B35, TL},
    {0x10B40, 0x10B55, TL}, {0x10B58, 0x10B5F, TN}, {0x10B60, 0x10B72, TL},
    {0x10B78, 0x10B7F, TN}, {0x10B80, 0x10B91, TL}, {0x10BA9, 0x10BAF, TN},
    {0x10C00, 0x10C48, TL}, {0x10C80, 0x10CB2, TL}, {0x10CC0, 0x10CF2, TL},
    {0x10CFA, 0x10CFF, TN}, {0x10D00, 0x10D23, TL}, {0x10D30, 0x10D39, TN},
    {0x10D40, 0x10D49, TN}, {0x10D4A, 0x10D65, TL}, {0x10D6F, 0x10D85, TL},
    {0x10E60, 0x10E7E, TN}, {0x10E80, 0x10EA9, TL}, {0x10EB0, 0x10EB1, TL},
    {0x10EC2, 0x10EC4, TL}, {0x10F00, 0x10F1C, TL}, {0x10F1D, 0x10F26, TN},
    {0x10F27, 0x10F27, TL}, {0x10F30, 0x10F45, TL}, {0x10F51, 0x10F54, TN},
    {0x10F70, 0x10F81, TL}, {0x10FB0, 0x10FC4, TL}, {0x10FC5, 0x10FCB, TN},
    {0x10FE0, 0x10FF6, TL}, {0x11003, 0x11037, TL}, {0x11052, 0x1106F, TN},
    {0x11071, 0x11072, TL}, {0x11075, 0x11075, TL}, {0x11083, 0x110AF, TL},
    {0x110D0, 0x110E8, TL}, {0x110F0, 0x110F9, TN}, {0x11103, 0x11126, TL},
    {0x11136, 0x1113F, TN}, {0x11144, 0x11144, TL}, {0x11147, 0x11147, TL},
    {0x11150, 0x11172, TL}, {0x11176, 0x11176, TL}, {0x11183, 0x111B2, TL},
    {0x111C1, 0x111C4, TL}, {0x111D0, 0x111D9, TN}, {0x111DA, 0x111DA, TL},
    {0x111DC, 0x111DC, TL}, {0x111E1, 0x111F4, TN}, {0x11200, 0x11211, TL},
    {0x11213, 0x1122B, TL}, {0x1123F, 0x11240, TL}, {0x11280, 0x11286, TL},
    {0x11288, 0x11288, TL}, {0x1128A, 0x1128D, TL}, {0x1128F, 0x1129D, TL},
    {0x1129F, 0x112A8, TL}, {0x112B0, 0x112DE, TL}, {0x112F0, 0x112F9, TN},
    {0x11305, 0x1130C, TL}, {0x1130F, 0x11310, TL}, {0x11313, 0x11328, TL},
    {0x1132A, 0x11330, TL}, {0x11332, 0x11333, TL}, {0x11335, 0x11339, TL},
    {0x1133D, 0x1133D, TL}, {0x11350, 0x11350, TL}, {0x1135D, 0x11361, TL},
    {0x11380, 0x11389, TL}, {0x1138B, 0x1138B, TL}, {0x1138E, 0x1138E, TL},
    {0x11390, 0x113B5, TL}, {0x113B7, 0x113B7, TL}, {0x113D1, 0x113D1, TL},
    {0x113D3, 0x113D3, TL}, {0x11400, 0x11434, TL}, {0x11447, 0x1144A, TL},
    {0x11450, 0x11459, TN}, {0x1145F, 0x11461, TL}, {0x11480, 0x114AF, TL},
    {0x114C4, 0x114C5, TL}, {0x114C7, 0x114C7, TL}, {0x114D0, 0x114D9, TN},
    {0x11580, 0x115AE, TL}, {0x115D8, 0x115DB, TL}, {0x11600, 0x1162F, TL},
    {0x11644, 0x11644, TL}, {0x11650, 0x11659, TN}, {0x11680, 0x116AA, TL},
    {0x116B8, 0x116B8, TL}, {0x116C0, 0x116C9, TN}, {0x116D0, 0x116E3, TN},
    {0x11700, 0x1171A, TL}, {0x11730, 0x1173B, TN}, {0x11740, 0x11746, TL},
    {0x11800, 0x1182B, TL}, {0x118A0, 0x118DF, TL}, {0x118E0, 0x118F2, TN},
    {0x118FF, 0x11906, TL}, {0x11909, 0x11909, TL}, {0x1190C, 0x11913, TL},
    {0x11915, 0x11916, TL}, {0x11918, 0x1192F, TL}, {0x1193F, 0x1193F, TL},
    {0x11941, 0x11941, TL}, {0x11950, 0x11959, TN}, {0x119A0, 0x119A7, TL},
    {0x119AA, 0x119D0, TL}, {0x119E1, 0x119E1, TL}, {0x119E3, 0x119E3, TL},
    {0x11A00, 0x11A00, TL}, {0x11A0B, 0x11A32, TL}, {0x11A3A, 0x11A3A, TL},
    {0x11A50, 0x11A50, TL}, {0x11A5C, 0x11A89, TL}, {0x11A9D, 0x11A9D, TL},
    {0x11AB0, 0x11AF8, TL}, {0x11BC0, 0x11BE0, TL}, {0x11BF0, 0x11BF9, TN},
    {0x11C00, 0x11C08, TL}, {0x11C0A, 0x11C2E, TL}, {0x11C40, 0x11C40, TL},
    {0x11C50, 0x11C6C, TN}, {0x11C72, 0x11C8F, TL}, {0x11D00, 0x11D06, TL},
    {0x11D08, 0x11D09, TL}, {0x11D0B, 0x11D30, TL}, {0x11D46, 0x11D46, TL},
    {0x11D50, 0x11D59, TN}, {0x11D60, 0x11D65, TL}, {0x11D67, 0x11D68, TL},
    {0x11D6A, 0x11D89, TL}, {0x11D98, 0x11D98, TL}, {0x11DA0, 0x11DA9, TN},
    {0x11EE0, 0x11EF2, TL}, {0x11F02, 0x11F02, TL}, {0x11F04, 0x11F10, TL},
    {0x11F12, 0x11F33, TL}, {0x11F50, 0x11F59, TN}, {0x11FB0, 0x11FB0, TL},
    {0x11FC0, 0x11FD4, TN}, {0x12000, 0x12399, TL}, {0x12400, 0x1246E, TN},
    {0x12480, 0x12543, TL}, {0x12F90, 0x12FF0, TL}, {0x13000, 0x1342F, TL},
    {0x13441, 0x13446, TL}, {0x13460, 0x143FA, TL}, {0x14400, 0x14646, TL},
    {0x16100, 0x1611D, TL}, {0x16130, 0x16139, TN}, {0x16800, 0x16A38, TL},
    {0x16A40, 0x16A5E, TL}, {0x16A60, 0x16A69, TN}, {0x16A70, 0x16ABE, TL},
    {0x16AC0, 0x16AC9, TN}, {0x16AD0, 0x16AED, TL}, {0x16B00, 0x16B2F, TL},
    {0x16B40, 0x16B43, TL}, {0x16B50, 0x16B59, TN}, {0x16B5B, 0x16B61, TN},
    {0x16B63, 0x16B77, TL}, {0x16B7D, 0x16B8F, TL}, {0x16D40, 0x16D6C, TL},
    {0x16D70, 0x16D79, TN}, {0x16E40, 0x16E7F, TL}, {0x16E80, 0x16E96, TN},
    {0x16F00, 0x16F4A, TL}, {0x16F50, 0x16F50, TL}, {0x16F93, 0x16F9F, TL},
    {0x16FE0, 0x16FE1, TL}, {0x16FE3, 0x16FE3, TL}, {0x17000, 0x187F7, TL},
    {0x18800, 0x18CD5, TL}, {0x18CFF, 0x18D08, TL}, {0x1AFF0, 0x1AFF3, TL},
    {0x1AFF5, 0x1AFFB, TL}, {0x1AFFD, 0x1AFFE, TL}, {0x1B000, 0x1B122, TL},
    {0x1B132, 0x1B132, TL}, {0x1B150, 0x1B152, TL}, {0x1B155, 0x1B155, TL},
    {0x1B164, 0x1B167, TL}, {0x1B170, 0x1B2FB, TL}, {0x1BC00, 0x1BC6A, TL},
    {0x1BC70, 0x1BC7C, TL}, {0x1BC80, 0x1BC88, TL}, {0x1BC90, 0x1BC99, TL},
    {0x1CCF0, 0x1CCF9, TN}, {0x1D2C0, 0x1D2D3, TN}, {0x1D2E0, 0x1D2F3, TN},
    {0x1D360, 0x1D378, TN}, {0x1D400, 0x1D454, TL}, {0x1D456, 0x1D49C, TL},
    {0x1D49E, 0x1D49F, TL}, {0x1D4A2, 0x1D4A2, TL}, {0x1D4A5, 0x1D4A6, TL},
    {0x1D4A9, 0x1D4AC, TL}, {0x1D4AE, 0x1D4B9, TL}, {0x1D4BB, 0x1D4BB, TL},
    {0x1D4BD, 0x1D4C3, TL}, {0x1D4C5, 0x1D505, TL}, {0x1D507, 0x1D50A, TL},
    {0x1D50D, 0x1D514, TL}, {0x1D516, 0x1D51C, TL}, {0x1D51E, 0x1D539, TL},
    {0x1D53B, 0x1D53E, TL}, {0x1D540, 0x1D544, TL}, {0x1D546, 0x1D546, TL},
    {0x1D54A, 0x1D550, TL}, {0x1D552, 0x1D6A5, TL}, {0x1D6A8, 0x1D6C0, TL},
    {0x1D6C2, 0x1D6DA, TL}, {0x1D6DC, 0x1D6FA, TL}, {0x1D6FC, 0x1D714, TL},
    {0x1D716, 0x1D734, TL}, {0x1D736, 0x1D74E, TL}, {0x1D750, 0x1D76E, TL},
    {0x1D770, 0x1D788, TL}, {0x1D78A, 0x1D7A8, TL}, {0x1D7AA, 0x1D7C2, TL},
    {0x1D7C4, 0x1D7CB, TL}, {0x1D7CE, 0x1D7FF, TN}, {0x1DF00, 0x1DF1E, TL},
    {0x1DF25, 0x1DF2A, TL}, {0x1E030, 0x1E06D, TL}, {0x1E100, 0x1E12C, TL},
    {0x1E137, 0x1E13D, TL}, {0x1E140, 0x1E149, TN}, {0x1E14E, 0x1E14E, TL},
    {0x1E290, 0x1E2AD, TL}, {0x1E2C0, 0x1E2EB, TL}, {0x1E2F0, 0x1E2F9, TN},
    {0x1E4D0, 0x1E4EB, TL}, {0x1E4F0, 0x1E4F9, TN}, {0x1E5D0, 0x1E5ED, TL},
    {0x1E5F0, 0x1E5F0, TL}, {0x1E5F1, 0x1E5FA, TN}, {0x1E7E0, 0x1E7E6, TL},
    {0x1E7E8, 0x1E7EB, TL}, {0x1E7ED, 0x1E7EE, TL}, {0x1E7F0, 0x1E7FE, TL},
    {0x1E800, 0x1E8C4, TL}, {0x1E8C7, 0x1E8CF, TN}, {0x1E900, 0x1E943, TL},
    {0x1E94B, 0x1E94B, TL}, {0x1E950, 0x1E959, TN}, {0x1EC71, 0x1ECAB, TN},
    {0x1ECAD, 0x1ECAF, TN}, {0x1ECB1, 0x1ECB4, TN}, {0x1ED01, 0x1ED2D, TN},
    {0x1ED2F, 0x1ED3D, TN}, {0x1EE00, 0x1EE03, TL}, {0x1EE05, 0x1EE1F, TL},
    {0x1EE21, 0x1EE22, TL}, {0x1EE24, 0x1EE24, TL}, {0x1EE27, 0x1EE27, TL},
    {0x1EE29, 0x1EE32, TL}, {0x1EE34, 0x1EE37, TL}, {0x1EE39, 0x1EE39, TL},
    {0x1EE3B, 0x1EE3B, TL}, {0x1EE42, 0x1EE42, TL}, {0x1EE47, 0x1EE47, TL},
    {0x1EE49, 0x1EE49, TL}, {0x1EE4B, 0x1EE4B, TL}, {0x1EE4D, 0x1EE4F, TL},
    {0x1EE51, 0x1EE52, TL}, {0x1EE54, 0x1EE54, TL}, {0x1EE57, 0x1EE57, TL},
    {0x1EE59, 0x1EE59, TL}, {0x1EE5B, 0x1EE5B, TL}, {0x1EE5D, 0x1EE5D, TL},
    {0x1EE5F, 0x1EE5F, TL}, {0x1EE61, 0x1EE62, TL}, {0x1EE64, 0x1EE64, TL},
    {0x1EE67, 0x1EE6A, TL}, {0x1EE6C, 0x1EE72, TL}, {0x1EE74, 0x1EE77, TL},
    {0x1EE79, 0x1EE7C, TL}, {0x1EE7E, 0x1EE7E, TL}, {0x1EE80, 0x1EE89, TL},
    {0x1EE8B, 0x1EE9B, TL}, {0x1EEA1, 0x1EEA3, TL}, {0x1EEA5, 0x1EEA9, TL},
    {0x1EEAB, 0x1EEBB, TL}, {0x1F100, 0x1F10C, TN}, {0x1FBF0, 0x1FBF9, TN},
    {0x20000, 0x2A6DF, TL}, {0x2A700, 0x2B739, TL}, {0x2B740, 0x2B81D, TL},
    {0x2B820, 0x2CEA1, TL}, {0x2CEB0, 0x2EBE0, TL}, {0x2EBF0, 0x2EE5D, TL},
    {0x2F800, 0x2FA1D, TL}, {0x30000, 0x3134A, TL}, {0x31350, 0x323AF, TL},
};

static int tok_class(uint32_t cp)
{
    if (cp < 0x80) {
        if ((cp >= '\t' && cp <= '\r') || cp == ' ')
            return TS;
        if (cp >= '0' && cp <= '9')
            return TN;
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z'))
            return TL;
        return TO;
    }
    if (cp == HX_TOK_BADCP)
        return TO;
    size_t lo = 0, hi = sizeof tok_classes / sizeof tok_classes[0];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < tok_classes[mid].lo)
            hi = mid;
        else if (cp > tok_classes[mid].hi)
            lo = mid + 1;
        else
            return tok_classes[mid].cls;
    }
    return TO;
}

/*
 * Reads one UTF-8 character of s[0..len) (len >= 1). Returns its length; a
 * byte that does not start a valid, shortest-form character is one
 * "character" of length 1 with *cp = HX_TOK_BADCP.
 */
static size_t tok_utf8_get(const unsigned char *s, size_t len, uint32_t *cp)
{
    unsigned c = s[0];
    size_t n;
    uint32_t v, min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
        n = 2, v = c & 0x1F, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3, v = c & 0x0F, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4, v = c & 0x07, min = 0x10000;
    } else {
        *cp = HX_TOK_BADCP;
        return 1;
    }
    if (n > len)
        goto bad;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            goto bad;
        v = (v << 6) | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        goto bad;
    *cp = v;
    return n;
bad:
    *cp = HX_TOK_BADCP;
    return 1;
}

static size_t tok_utf8_put(uint32_t cp, unsigned char out[4])
{
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | (cp >> 18));
    out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/*
 * GPT-2's bytes_to_unicode: printable Latin-1 bytes ('!'..'~', '¡'..'¬',
 * '®'..'ÿ') map to themselves, the other 68 bytes to U+0100.. in byte order.
 */
static void tok_bytes_to_unicode(uint32_t cp_of[256])
{
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        cp_of[b] = printable ? b : next++;
    }
}

/* ------------------------------------------------------------------------ */
/* The pre-tokenizer splits, coded by hand                                  */
/* ------------------------------------------------------------------------ */

/* Class and length of the character at s[pos] (pos < len). */
static int tok_class_at(const unsigned char *s, size_t len, size_t pos, uint32_t *cp,
                        size_t *n)
{
    *n = tok_utf8_get(s + pos, len - pos, cp);
    return tok_class(*cp);
}

/* End of the run of characters of class `cls` that starts at pos. */
static size_t tok_run_end(const unsigned char *s, size_t len, size_t pos, int cls)
{
    while (pos < len) {
        uint32_t cp;
        size_t n;
        if (tok_class_at(s, len, pos, &cp, &n) != cls)
            break;
        pos += n;
    }
    return pos;
}

/*
 * The end of a whitespace run at pos, matched by `\s+(?!\S)|\s+`: the whole
 * run when it ends the text or is one character, else the run without its
 * last character (which then starts the next pre-token, e.g. " word").
 */
static size_t tok_space_end(const unsigned char *s, size_t len, size_t pos)
{
    size_t end = pos, last = pos;
    while (end < len) {
        uint32_t cp;
        size_t n;
        if (tok_class_at(s, len, end, &cp, &n) != TS)
            break;
        last = end;
        end += n;
    }
    if (end == len || last == pos)
        return end;
    return last;
}

/* 2 or 3 when s[pos..] starts with 's 't 'm 'd / 're 've 'll, else 0. */
static size_t tok_contraction(const unsigned char *s, size_t len, size_t pos, int any_case)
{
    if (s[pos] != '\'' || pos + 1 >= len)
        return 0;
    unsigned c1 = s[pos + 1], c2 = pos + 2 < len ? s[pos + 2] : 0;
    if (any_case) {
        if (c1 >= 'A' && c1 <= 'Z')
            c1 += 'a' - 'A';
        if (c2 >= 'A' && c2 <= 'Z')
            c2 += 'a' - 'A';
    }
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd')
        return 2;
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l'))
        return 3;
    return 0;
}

/*
 * GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * Returns the end of the pre-token that starts at pos (< len).
 */
static size_t tok_split_gpt2(const unsigned char *s, size_t len, size_t pos)
{
    size_t k = tok_contraction(s, len, pos, 0);
    if (k)
        return pos + k;
    uint32_t cp;
    size_t n;
    int cls = tok_class_at(s, len, pos, &cp, &n);
    if (cp == ' ' && pos + 1 < len) {
        uint32_t cp2;
        size_t n2;
        int cls2 = tok_class_at(s, len, pos + 1, &cp2, &n2);
        if (cls2 != TS)
            return tok_run_end(s, len, pos + 1, cls2);
    }
    if (cls != TS)
        return tok_run_end(s, len, pos, cls);
    return tok_space_end(s, len, pos);
}

/*
 * Llama-3 (max_digits 3) and Qwen2 (max_digits 1):
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *   ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 */
static size_t tok_split_llama3(const unsigned char *s, size_t len, size_t pos, int max_digits)
{
    size_t k = tok_contraction(s, len, pos, 1);
    if (k)
        return pos + k;
    uint32_t cp;
    size_t n;
    int cls = tok_class_at(s, len, pos, &cp, &n);
    if (cls == TL)
        return tok_run_end(s, len, pos, TL);
    if (cls != TN && cp != '\r' && cp != '\n' && pos + n < len) {
        uint32_t cp2;
        size_t n2;
        if (tok_class_at(s, len, pos + n, &cp2, &n2) == TL)
            return tok_run_end(s, len, pos + n, TL);
    }
    if (cls == TN) {
        size_t end = pos;
        for (int d = 0; d < max_digits && end < len; d++) {
            if (tok_class_at(s, len, end, &cp, &n) != TN)
                break;
            end += n;
        }
        return end;
    }
    size_t p = pos;
    if (cp == ' ' && pos + 1 < len) {
        uint32_t cp2;
        size_t n2;
        if (tok_class_at(s, len, pos + 1, &cp2, &n2) == TO)
            p = pos + 1;
    }
    if (p > pos || cls == TO) {
        size_t end = tok_run_end(s, len, p, TO);
        while (end < len && (s[end] == '\r' || s[end] == '\n'))
            end++;
        return end;
    }
    /* whitespace: \s*[\r\n]+ ends after the run's last newline, if any */
    size_t end = pos, after_nl = 0;
    while (end < len) {
        if (tok_class_at(s, len, end, &cp, &n) != TS)
            break;
        end += n;
        if (cp == '\r' || cp == '\n')
            after_nl = end;
    }
    if (after_nl)
        return after_nl;
    return tok_space_end(s, len, pos);
}

/* ------------------------------------------------------------------------ */
/* Growable buffers and hash tables                                         */
/* ------------------------------------------------------------------------ */

typedef struct hx_tok_buf {
    char *p; /* owned */
    size_t len, cap;
} hx_tok_buf;

static int tok_buf_reserve(hx_tok_buf *b, size_t extra)
{
    if (extra <= b->cap - b->len)
        return 0;
    if (extra > SIZE_MAX / 2 - b->len)
        return -1;
    size_t cap = b->cap ? b->cap : 64;
    while (cap - b->len < extra)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int tok_buf_add(hx_tok_buf *b, const void *data, size_t n)
{
    if (tok_buf_reserve(b, n + 1) != 0)
        return -1;
    if (n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

/* Appends src[0..n) with every occurrence of pat replaced by rep. */
static int tok_buf_replace(hx_tok_buf *b, const char *src, size_t n, const char *pat,
                           size_t plen, const char *rep, size_t rlen)
{
    size_t i = 0, from = 0;
    if (tok_buf_reserve(b, n + 1) != 0)
        return -1;
    while (plen && i + plen <= n) {
        if (src[i] == pat[0] && memcmp(src + i, pat, plen) == 0) {
            if (tok_buf_add(b, src + from, i - from) != 0 || tok_buf_add(b, rep, rlen) != 0)
                return -1;
            i += plen;
            from = i;
        } else {
            i++;
        }
    }
    return tok_buf_add(b, src + from, n - from);
}

typedef struct hx_tok_span {
    uint32_t off; /* into an arena; HX_TOK_NONE: no string */
    uint32_t len;
} hx_tok_span;

static uint64_t tok_hash_bytes(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

static uint64_t tok_hash_u64(uint64_t x)
{
    x ^= x >> 30; /* splitmix64 finalizer */
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static size_t tok_table_cap(size_t n)
{
    size_t cap = 16;
    while (cap < n * 2)
        cap *= 2;
    return cap;
}

/* String -> index, open addressing; the strings live in (spans, arena). */
typedef struct hx_tok_strmap {
    uint32_t *slots; /* owned; [mask + 1]; index + 1, 0 = empty */
    size_t mask;
} hx_tok_strmap;

static int tok_strmap_init(hx_tok_strmap *m, size_t n)
{
    size_t cap = tok_table_cap(n);
    m->slots = calloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    return m->slots ? 0 : -1;
}

static int32_t tok_strmap_find(const hx_tok_strmap *m, const hx_tok_span *spans,
                               const char *arena, const char *key, size_t len)
{
    if (!m->slots)
        return -1;
    size_t i = (size_t)tok_hash_bytes(key, len) & m->mask;
    for (;;) {
        uint32_t s = m->slots[i];
        if (s == 0)
            return -1;
        const hx_tok_span *sp = &spans[s - 1];
        if (sp->len == len && memcmp(arena + sp->off, key, len) == 0)
            return (int32_t)(s - 1);
        i = (i + 1) & m->mask;
    }
}

/* Inserts index idx (whose string is spans[idx]); returns the index already there, or idx. */
static int32_t tok_strmap_insert(hx_tok_strmap *m, const hx_tok_span *spans, const char *arena,
                                 uint32_t idx)
{
    const char *key = arena + spans[idx].off;
    size_t len = spans[idx].len;
    size_t i = (size_t)tok_hash_bytes(key, len) & m->mask;
    for (;;) {
        uint32_t s = m->slots[i];
        if (s == 0) {
            m->slots[i] = idx + 1;
            return (int32_t)idx;
        }
        const hx_tok_span *sp = &spans[s - 1];
        if (sp->len == len && memcmp(arena + sp->off, key, len) == 0)
            return (int32_t)(s - 1);
        i = (i + 1) & m->mask;
    }
}

/* (left id, right id) -> (rank, merged id). */
typedef struct hx_tok_merge {
    uint64_t key; /* ((left + 1) << 32) | right; 0 = empty slot */
    uint32_t rank;
    int32_t id;
} hx_tok_merge;

static uint64_t tok_merge_key(int32_t left, int32_t right)
{
    return ((uint64_t)(uint32_t)left + 1) << 32 | (uint32_t)right;
}

/* ------------------------------------------------------------------------ */
/* The tokenizer                                                            */
/* ------------------------------------------------------------------------ */

enum { OP_PREPEND, OP_REPLACE, OP_BYTE_FALLBACK, OP_BYTE_LEVEL, OP_METASPACE };

/*
 * A normalizer or decoder step. OP_METASPACE (decoder) is Replace(a -> " "),
 * except that in the first token of a text every `a` is dropped when `drop_first`
 * (Hugging Face's Metaspace decoder with a prepend scheme).
 */
typedef struct hx_tok_op {
    int kind;
    char *a, *b; /* owned; PREPEND: a; REPLACE: a -> b; METASPACE: a */
    size_t alen, blen;
    int drop_first;
} hx_tok_op;

enum { SPLIT_NONE, SPLIT_GPT2, SPLIT_LLAMA3 };
enum { PREPEND_NEVER, PREPEND_FIRST, PREPEND_ALWAYS };

typedef struct hx_tok_added {
    int32_t id;
    hx_tok_span content; /* into added_arena */
    uint8_t lstrip, rstrip;
} hx_tok_added;

struct hx_tokenizer {
    char *path; /* owned; the tokenizer.json read, for messages */
    int vocab_size;

    char *vocab_arena;     /* owned */
    hx_tok_span *vocab;    /* owned; [vocab_size] model vocab string per id */
    hx_tok_strmap vocab_map;

    hx_tok_merge *merges; /* owned; [merge_mask + 1] */
    size_t merge_mask;

    hx_tok_added *added;   /* owned; [n_added] */
    size_t n_added;
    char *added_arena;     /* owned */
    hx_tok_span *added_content; /* owned; [n_added], for added_map */
    hx_tok_strmap added_map;
    int32_t *added_of_id;   /* owned; [vocab_size] index into added, -1 */
    uint32_t *added_order;  /* owned; [n_added] by first byte, longest first */
    uint32_t added_bucket[257];

    char *piece_arena;  /* owned */
    hx_tok_span *piece; /* owned; [vocab_size] decoded bytes */

    hx_tok_op *norm; /* owned; normalizer steps */
    size_t n_norm;
    hx_tok_op *dec;  /* owned; per-token decoder steps */
    size_t n_dec;
    int strip_spaces; /* leading spaces decode strips (Strip after Fuse) */
    int first_differs; /* an OP_METASPACE step decodes the first token its own way */
    int16_t byte_of[324]; /* inverse of bytes_to_unicode, -1 */

    int split;       /* SPLIT_* */
    int split_digits; /* SPLIT_LLAMA3: max digits per pre-token */
    int byte_level;
    int prefix_space; /* ByteLevel add_prefix_space */
    int metaspace;
    char ms_repl[8];
    size_t ms_repl_len;
    int ms_prepend; /* PREPEND_* */
    int ms_split;

    int32_t byte_id[256];     /* byte-level: id of each byte's character, -1 */
    int byte_fallback;
    int32_t fallback_id[256]; /* id of <0xHH>, -1 */
    int32_t unk_id;
    int fuse_unk;
    int ignore_merges;

    int bos, eos, adds_bos;
};

static int32_t tok_vocab_find(const hx_tokenizer *t, const char *s, size_t len)
{
    return tok_strmap_find(&t->vocab_map, t->vocab, t->vocab_arena, s, len);
}

static const hx_tok_merge *tok_merge_find(const hx_tokenizer *t, int32_t left, int32_t right)
{
    if (!t->merges)
        return NULL;
    uint64_t key = tok_merge_key(left, right);
    size_t i = (size_t)tok_hash_u64(key) & t->merge_mask;
    for (;;) {
        const hx_tok_merge *m = &t->merges[i];
        if (m->key == key)
            return m;
        if (m->key == 0)
            return NULL;
        i = (i + 1) & t->merge_mask;
    }
}

void hx_tokenizer_free(hx_tokenizer *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->n_norm; i++) {
        free(t->norm[i].a);
        free(t->norm[i].b);
    }
    for (size_t i = 0; i < t->n_dec; i++) {
        free(t->dec[i].a);
        free(t->dec[i].b);
    }
    free(t->norm);
    free(t->dec);
    free(t->piece);
    free(t->piece_arena);
    free(t->added_order);
    free(t->added_of_id);
    free(t->added_map.slots);
    free(t->added_content);
    free(t->added_arena);
    free(t->added);
    free(t->merges);
    free(t->vocab_map.slots);
    free(t->vocab);
    free(t->vocab_arena);
    free(t->path);
    free(t);
}

int hx_tokenizer_vocab_size(const hx_tokenizer *t)
{
    return t ? t->vocab_size : 0;
}

int hx_tokenizer_bos(const hx_tokenizer *t)
{
    return t ? t->bos : -1;
}

int hx_tokenizer_eos(const hx_tokenizer *t)
{
    return t ? t->eos : -1;
}

int hx_tokenizer_adds_bos(const hx_tokenizer *t)
{
    return t ? t->adds_bos : 0;
}

int hx_tokenizer_strips_leading_space(const hx_tokenizer *t)
{
    return t ? t->strip_spaces + t->first_differs : 0;
}

int hx_tokenizer_token_id(const hx_tokenizer *t, const char *token)
{
    if (!t || !token)
        return -1;
    size_t len = strlen(token);
    int32_t a = tok_strmap_find(&t->added_map, t->added_content, t->added_arena, token, len);
    if (a >= 0)
        return t->added[a].id;
    return tok_vocab_find(t, token, len);
}

hx_status hx_tokenizer_token_bytes(const hx_tokenizer *t, int id, const char **bytes,
                                   size_t *len)
{
    if (!t || !bytes || !len || id < 0 || id >= t->vocab_size ||
        t->piece[id].off == HX_TOK_NONE)
        return HX_EINVAL;
    *bytes = t->piece_arena + t->piece[id].off;
    *len = t->piece[id].len;
    return HX_OK;
}

static int tok_hex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* The string of token `id` as the file spells it (an added token's content first); 0 if none. */
static int tok_token_string(const hx_tokenizer *t, int id, const char **s, size_t *n)
{
    if (t->added_of_id[id] >= 0) {
        const hx_tok_added *a = &t->added[t->added_of_id[id]];
        *s = t->added_arena + a->content.off;
        *n = a->content.len;
        return 1;
    }
    if (t->vocab[id].off == HX_TOK_NONE)
        return 0;
    *s = t->vocab_arena + t->vocab[id].off;
    *n = t->vocab[id].len;
    return 1;
}

/*
 * Runs the per-token decoder steps on s[0..n); the result is left in x or y
 * (the caller's scratch buffers) and returned in *out / *out_len. `first`:
 * the token starts the text. Returns -1 when out of memory.
 */
static int tok_decode_token(const hx_tokenizer *t, const char *s, size_t n, int first,
                            hx_tok_buf *x, hx_tok_buf *y, const char **out_s, size_t *out_n)
{
    for (size_t k = 0; k < t->n_dec; k++) {
        const hx_tok_op *op = &t->dec[k];
        hx_tok_buf *out = s == x->p ? y : x;
        out->len = 0;
        if (op->kind == OP_REPLACE || op->kind == OP_METASPACE) {
            size_t blen = op->kind == OP_METASPACE && first && op->drop_first ? 0 : op->blen;
            if (tok_buf_replace(out, s, n, op->a, op->alen, op->b, blen) != 0)
                return -1;
        } else if (op->kind == OP_BYTE_FALLBACK) {
            /* exactly "<0xHH>": that byte */
            int hi = n == 6 ? tok_hex(s[3]) : -1, lo = n == 6 ? tok_hex(s[4]) : -1;
            if (n == 6 && !memcmp(s, "<0x", 3) && s[5] == '>' && hi >= 0 && lo >= 0) {
                unsigned char byte = (unsigned char)(hi * 16 + lo);
                if (tok_buf_add(out, &byte, 1) != 0)
                    return -1;
            } else if (tok_buf_add(out, s, n) != 0) {
                return -1;
            }
        } else { /* OP_BYTE_LEVEL: every character back to its byte, else the token as is */
            int all = 1;
            for (size_t i = 0; i < n && all;) {
                uint32_t cp;
                size_t k2 = tok_utf8_get((const unsigned char *)s + i, n - i, &cp);
                all = cp < 324 && t->byte_of[cp] >= 0;
                if (all) {
                    unsigned char byte = (unsigned char)t->byte_of[cp];
                    if (tok_buf_add(out, &byte, 1) != 0)
                        return -1;
                }
                i += k2;
            }
            if (!all) {
                out->len = 0;
                if (tok_buf_add(out, s, n) != 0)
                    return -1;
            }
        }
        s = out->p;
        n = out->len;
    }
    *out_s = s;
    *out_n = n;
    return 0;
}

hx_status hx_tokenizer_decode(const hx_tokenizer *t, const int *ids, size_t n, char **text,
                              size_t *len, hx_err *err)
{
    if (!t || (!ids && n) || !text || !len)
        return hx_err_set(err, HX_EINVAL, "tokenizer decode: invalid arguments");
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        int id = ids[i];
        if (id < 0 || id >= t->vocab_size)
            return hx_err_set(err, HX_EINVAL,
                              "tokenizer '%s': cannot decode token id %d (at position %zu): "
                              "out of range [0, %d)",
                              t->path, id, i, t->vocab_size);
        if (t->piece[id].off == HX_TOK_NONE)
            return hx_err_set(err, HX_EINVAL,
                              "tokenizer '%s': cannot decode token id %d (at position %zu): "
                              "no token has this id",
                              t->path, id, i);
        total += t->piece[id].len;
    }
    /* a Metaspace decoder treats the first token on its own */
    hx_tok_buf x = {0}, y = {0};
    const char *first = NULL;
    size_t first_len = 0;
    int own_first = n && t->first_differs;
    if (own_first) {
        const char *s = NULL;
        size_t sn = 0;
        tok_token_string(t, ids[0], &s, &sn);
        if (tok_decode_token(t, s, sn, 1, &x, &y, &first, &first_len) != 0) {
            free(x.p);
            free(y.p);
            return hx_err_set(err, HX_ENOMEM, "tokenizer decode: out of memory");
        }
        total = total - t->piece[ids[0]].len + first_len;
    }
    char *out = malloc(total + 1);
    if (!out) {
        free(x.p);
        free(y.p);
        return hx_err_set(err, HX_ENOMEM, "tokenizer decode: out of memory (%zu bytes)", total);
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const hx_tok_span *p = &t->piece[ids[i]];
        if (i == 0 && own_first) {
            memcpy(out, first, first_len);
            k = first_len;
            continue;
        }
        memcpy(out + k, t->piece_arena + p->off, p->len);
        k += p->len;
    }
    free(x.p);
    free(y.p);
    size_t skip = 0;
    while (skip < k && skip < (size_t)t->strip_spaces && out[skip] == ' ')
        skip++;
    if (skip)
        memmove(out, out + skip, k - skip);
    k -= skip;
    out[k] = '\0';
    *text = out;
    *len = k;
    return HX_OK;
}

/* ------------------------------------------------------------------------ */
/* Encoding                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct hx_tok_sym {
    int32_t id; /* -1: merged into its left neighbour */
    int32_t prev, next;
} hx_tok_sym;

/*
 * A candidate merge of symbol pos with its next. It is stale once either side
 * has merged since: then the pair at pos is another one, with another rank
 * (every pair has its own rank).
 */
typedef struct hx_tok_cand {
    uint32_t rank;
    uint32_t pos;
} hx_tok_cand;

/* Per-call workspace; every buffer grows geometrically and is reused across pre-tokens. */
typedef struct hx_tok_ws {
    hx_tok_buf a, b; /* stretch of text being normalized (ping-pong) */
    hx_tok_buf key;  /* byte-level string of one pre-token (ignore_merges) */
    hx_tok_sym *syms;
    size_t syms_cap;
    hx_tok_cand *heap;
    size_t heap_len, heap_cap;
    int *ids;
    size_t n_ids, ids_cap;
} hx_tok_ws;

static void tok_ws_release(hx_tok_ws *ws)
{
    free(ws->a.p);
    free(ws->b.p);
    free(ws->key.p);
    free(ws->syms);
    free(ws->heap);
    free(ws->ids);
}

static int tok_grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    if (c > SIZE_MAX / elem)
        return -1;
    void *q = realloc(*p, c * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = c;
    return 0;
}

static hx_status tok_emit(hx_tok_ws *ws, int id, hx_err *err)
{
    if (ws->n_ids == ws->ids_cap &&
        tok_grow((void **)&ws->ids, &ws->ids_cap, ws->n_ids + 1, sizeof *ws->ids) != 0)
        return hx_err_set(err, HX_ENOMEM, "tokenizer encode: out of memory");
    ws->ids[ws->n_ids++] = id;
    return HX_OK;
}

static int tok_cand_less(const hx_tok_cand *x, const hx_tok_cand *y)
{
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void tok_heap_push(hx_tok_ws *ws, hx_tok_cand c)
{
    if (ws->heap_len == ws->heap_cap)
        return; /* cannot happen (see tok_encode_piece); never write past the end */
    size_t i = ws->heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!tok_cand_less(&c, &ws->heap[parent]))
            break;
        ws->heap[i] = ws->heap[parent];
        i = parent;
    }
    ws->heap[i] = c;
}

static hx_tok_cand tok_heap_pop(hx_tok_ws *ws)
{
    hx_tok_cand top = ws->heap[0];
    hx_tok_cand last = ws->heap[--ws->heap_len];
    size_t i = 0, n = ws->heap_len;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && tok_cand_less(&ws->heap[c + 1], &ws->heap[c]))
            c++;
        if (!tok_cand_less(&ws->heap[c], &last))
            break;
        ws->heap[i] = ws->heap[c];
        i = c;
    }
    if (n)
        ws->heap[i] = last;
    return top;
}

/* Pushes the merge of symbol pos with its next neighbour, when there is one. */
static void tok_try_pair(const hx_tokenizer *t, hx_tok_ws *ws, int32_t pos)
{
    int32_t next = ws->syms[pos].next;
    if (next < 0)
        return;
    const hx_tok_merge *m = tok_merge_find(t, ws->syms[pos].id, ws->syms[next].id);
    if (!m)
        return;
    hx_tok_cand c = {m->rank, (uint32_t)pos};
    tok_heap_push(ws, c);
}

/* Adds a symbol for a character with no token: unk (fused when asked), or an error. */
static hx_status tok_add_unk(const hx_tokenizer *t, hx_tok_ws *ws, size_t *n,
                             const unsigned char *ch, size_t chlen, hx_err *err)
{
    if (t->unk_id < 0) {
        char shown[24];
        size_t k = 0;
        for (size_t i = 0; i < chlen && k + 5 < sizeof shown; i++)
            k += (size_t)snprintf(shown + k, sizeof shown - k, "\\x%02X", ch[i]);
        return hx_err_set(err, HX_EINVAL,
                          "tokenizer '%s': cannot encode '%s': no token for it, and the "
                          "tokenizer has neither byte_fallback nor unk_token",
                          t->path, shown);
    }
    if (t->fuse_unk && *n > 0 && ws->syms[*n - 1].id == t->unk_id)
        return HX_OK;
    ws->syms[(*n)++].id = t->unk_id;
    return HX_OK;
}

/* BPE of one pre-token s[0..len). */
static hx_status tok_encode_piece(const hx_tokenizer *t, hx_tok_ws *ws, const unsigned char *s,
                                  size_t len, hx_err *err)
{
    if (len == 0)
        return HX_OK;
    if (t->ignore_merges) {
        const char *key = (const char *)s;
        size_t klen = len;
        if (t->byte_level) {
            ws->key.len = 0;
            for (size_t i = 0; i < len && klen; i++) {
                int32_t bid = t->byte_id[s[i]];
                if (bid < 0) {
                    klen = 0; /* a byte without a token: no whole-word match */
                    break;
                }
                const hx_tok_span *sp = &t->vocab[bid];
                if (tok_buf_add(&ws->key, t->vocab_arena + sp->off, sp->len) != 0)
                    return hx_err_set(err, HX_ENOMEM, "tokenizer encode: out of memory");
            }
            key = ws->key.p;
            klen = klen ? ws->key.len : 0;
        }
        int32_t id = klen ? tok_vocab_find(t, key, klen) : -1;
        if (id >= 0)
            return tok_emit(ws, id, err);
    }
    if (tok_grow((void **)&ws->syms, &ws->syms_cap, len, sizeof *ws->syms) != 0 ||
        tok_grow((void **)&ws->heap, &ws->heap_cap, 2 * len, sizeof *ws->heap) != 0)
        return hx_err_set(err, HX_ENOMEM, "tokenizer encode: out of memory");
    size_t n = 0;
    hx_status st;
    if (t->byte_level) {
        for (size_t i = 0; i < len; i++) {
            int32_t id = t->byte_id[s[i]];
            if (id >= 0)
                ws->syms[n++].id = id;
            else if ((st = tok_add_unk(t, ws, &n, s + i, 1, err)) != HX_OK)
                return st;
        }
    } else {
        for (size_t i = 0; i < len;) {
            uint32_t cp;
            size_t k = tok_utf8_get(s + i, len - i, &cp);
            int32_t id = tok_vocab_find(t, (const char *)s + i, k);
            if (id >= 0) {
                ws->syms[n++].id = id;
            } else {
                int all = t->byte_fallback;
                for (size_t j = 0; all && j < k; j++)
                    all = t->fallback_id[s[i + j]] >= 0;
                if (all) {
                    for (size_t j = 0; j < k; j++)
                        ws->syms[n++].id = t->fallback_id[s[i + j]];
                } else if ((st = tok_add_unk(t, ws, &n, s + i, k, err)) != HX_OK) {
                    return st;
                }
            }
            i += k;
        }
    }
    if (n == 0)
        return HX_OK;
    for (size_t i = 0; i < n; i++) {
        ws->syms[i].prev = (int32_t)i - 1;
        ws->syms[i].next = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    ws->heap_len = 0;
    for (size_t i = 0; i + 1 < n; i++)
        tok_try_pair(t, ws, (int32_t)i);
    /* at most 2n - 2 candidates are queued at once: n - 1 first, then each merge
       pops one and pushes at most two */
    while (ws->heap_len) {
        hx_tok_cand c = tok_heap_pop(ws);
        hx_tok_sym *sym = &ws->syms[c.pos];
        if (sym->id < 0 || sym->next < 0)
            continue;
        const hx_tok_merge *m = tok_merge_find(t, sym->id, ws->syms[sym->next].id);
        if (!m || m->rank != c.rank)
            continue; /* stale: one side has merged since */
        int32_t gone = sym->next;
        sym->id = m->id;
        sym->next = ws->syms[gone].next;
        if (sym->next >= 0)
            ws->syms[sym->next].prev = (int32_t)c.pos;
        ws->syms[gone].id = -1;
        if (sym->prev >= 0)
            tok_try_pair(t, ws, sym->prev);
        tok_try_pair(t, ws, (int32_t)c.pos);
    }
    for (int32_t i = 0; i >= 0; i = ws->syms[i].next)
        if ((st = tok_emit(ws, ws->syms[i].id, err)) != HX_OK)
            return st;
    return HX_OK;
}

/* Offset of the first occurrence of pat in s[from..len), or len. */
static size_t tok_find(const char *s, size_t len, size_t from, const char *pat, size_t plen)
{
    for (size_t i = from; plen && i + plen <= len; i++)
        if (s[i] == pat[0] && memcmp(s + i, pat, plen) == 0)
            return i;
    return len;
}

/* Normalizes, pre-tokenizes and merges one stretch of text between added tokens. */
static hx_status tok_encode_stretch(const hx_tokenizer *t, hx_tok_ws *ws, const char *s,
                                    size_t len, int at_start, hx_err *err)
{
    const char *cur = s;
    size_t n = len;
    if (n == 0)
        return HX_OK;
    for (size_t i = 0; i < t->n_norm; i++) {
        const hx_tok_op *op = &t->norm[i];
        hx_tok_buf *out = cur == ws->a.p ? &ws->b : &ws->a;
        out->len = 0;
        int bad;
        if (op->kind == OP_PREPEND)
            bad = tok_buf_add(out, op->a, op->alen) != 0 || tok_buf_add(out, cur, n) != 0;
        else
            bad = tok_buf_replace(out, cur, n, op->a, op->alen, op->b, op->blen) != 0;
        if (bad)
            return hx_err_set(err, HX_ENOMEM, "tokenizer encode: out of memory");
        cur = out->p;
        n = out->len;
    }
    if (t->metaspace || t->prefix_space) {
        hx_tok_buf *out = cur == ws->a.p ? &ws->b : &ws->a;
        out->len = 0;
        const char *pre = t->metaspace ? t->ms_repl : " ";
        size_t plen = t->metaspace ? t->ms_repl_len : 1;
        int want = t->metaspace ? t->ms_prepend == PREPEND_ALWAYS ||
                                      (t->ms_prepend == PREPEND_FIRST && at_start)
                                : 1;
        int bad = 0;
        if (t->metaspace)
            bad = tok_buf_replace(out, cur, n, " ", 1, t->ms_repl, t->ms_repl_len) != 0;
        else
            bad = tok_buf_add(out, cur, n) != 0;
        if (!bad && want && (out->len < plen || memcmp(out->p, pre, plen) != 0)) {
            bad = tok_buf_reserve(out, plen + 1) != 0;
            if (!bad) {
                memmove(out->p + plen, out->p, out->len + 1);
                memcpy(out->p, pre, plen);
                out->len += plen;
            }
        }
        if (bad)
            return hx_err_set(err, HX_ENOMEM, "tokenizer encode: out of memory");
        cur = out->p;
        n = out->len;
    }
    const unsigned char *u = (const unsigned char *)cur;
    for (size_t pos = 0; pos < n;) {
        size_t end;
        if (t->split == SPLIT_GPT2)
            end = tok_split_gpt2(u, n, pos);
        else if (t->split == SPLIT_LLAMA3)
            end = tok_split_llama3(u, n, pos, t->split_digits);
        else if (t->metaspace && t->ms_split)
            end = tok_find(cur, n, pos + 1, t->ms_repl, t->ms_repl_len);
        else
            end = n;
        hx_status st = tok_encode_piece(t, ws, u + pos, end - pos, err);
        if (st != HX_OK)
            return st;
        pos = end;
    }
    return HX_OK;
}

/* ASCII whitespace, for the lstrip / rstrip of added tokens (HF strips Unicode whitespace). */
static int tok_is_space(char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* The leftmost, longest added token in s[from..len): 1 and its index and start, or 0. */
static int tok_find_added(const hx_tokenizer *t, const char *s, size_t len, size_t from,
                          size_t *start, uint32_t *which)
{
    if (t->n_added == 0)
        return 0;
    for (size_t i = from; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        for (uint32_t k = t->added_bucket[c]; k < t->added_bucket[c + 1]; k++) {
            const hx_tok_added *a = &t->added[t->added_order[k]];
            if (a->content.len <= len - i &&
                memcmp(s + i, t->added_arena + a->content.off, a->content.len) == 0) {
                *start = i;
                *which = t->added_order[k];
                return 1;
            }
        }
    }
    return 0;
}

hx_status hx_tokenizer_encode(const hx_tokenizer *t, const char *text, size_t len, int **ids,
                              size_t *n, hx_err *err)
{
    if (!t || (!text && len) || !ids || !n)
        return hx_err_set(err, HX_EINVAL, "tokenizer encode: invalid arguments");
    hx_tok_ws ws;
    memset(&ws, 0, sizeof ws);
    hx_status st = HX_OK;
    if (tok_grow((void **)&ws.ids, &ws.ids_cap, len / 4 + 16, sizeof *ws.ids) != 0) {
        st = hx_err_set(err, HX_ENOMEM, "tokenizer encode: out of memory");
        goto out_release;
    }
    size_t seg = 0, pos = 0;
    for (;;) {
        size_t at = len;
        uint32_t which = 0;
        int found = tok_find_added(t, text, len, pos, &at, &which);
        size_t seg_end = at;
        if (found && t->added[which].lstrip)
            while (seg_end > seg && tok_is_space(text[seg_end - 1]))
                seg_end--;
        st = tok_encode_stretch(t, &ws, text + seg, seg_end - seg, seg == 0, err);
        if (st != HX_OK || !found)
            break;
        if ((st = tok_emit(&ws, t->added[which].id, err)) != HX_OK)
            break;
        pos = at + t->added[which].content.len;
        if (t->added[which].rstrip)
            while (pos < len && tok_is_space(text[pos]))
                pos++;
        seg = pos;
    }
    if (st != HX_OK)
        goto out_release;
    *ids = ws.ids;
    *n = ws.n_ids;
    ws.ids = NULL;
out_release:
    tok_ws_release(&ws);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Loading                                                                  */
/* ------------------------------------------------------------------------ */

#define HX_TOK_MAX_DEPTH 8 /* nesting of Sequence steps */

static const char tok_re_gpt2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char tok_re_llama3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char tok_re_qwen2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static hx_status tok_fail(hx_err *err, hx_status code, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* "tokenizer 'PATH': " + the message. */
static hx_status tok_fail(hx_err *err, hx_status code, const char *path, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return hx_err_set(err, code, "tokenizer '%s': %s", path, msg);
}

static char *tok_memdup(const char *s, size_t n)
{
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

static char *tok_join(const char *dir, size_t dlen, const char *name)
{
    size_t nlen = strlen(name);
    char *p = malloc(dlen + nlen + 2);
    if (!p)
        return NULL;
    memcpy(p, dir, dlen);
    size_t k = dlen;
    if (k && p[k - 1] != '/')
        p[k++] = '/';
    memcpy(p + k, name, nlen + 1);
    return p;
}

/* A token shown in a message: at most 60 bytes of it. */
#define TOKFMT "'%.*s'"
#define TOKARG(s, n) (int)((n) < 60 ? (n) : 60), (s)

/* Field `key` of `obj` as a string: 1 found, 0 absent or null, -1 another type. */
static int tok_str_field(const json_t *obj, const char *key, const char **s, size_t *len)
{
    const json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return -1;
    *s = json_string_value(v);
    *len = json_string_length(v);
    return 1;
}

/* Boolean field: HX_OK with *out (default kept when absent or null), else HX_EPARSE. */
static hx_status tok_bool_field(const hx_tokenizer *t, const json_t *obj, const char *field,
                                const char *key, int *out, hx_err *err)
{
    const json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return HX_OK;
    if (!json_is_boolean(v))
        return tok_fail(err, HX_EPARSE, t->path, "%s.%s: expected true or false", field, key);
    *out = json_is_true(v);
    return HX_OK;
}

/* The "type" of a step object, or NULL after setting err. */
static const char *tok_step_type(const hx_tokenizer *t, const json_t *step, const char *field,
                                 hx_err *err)
{
    const char *s;
    size_t n;
    if (!json_is_object(step)) {
        tok_fail(err, HX_EPARSE, t->path, "%s: expected an object or null", field);
        return NULL;
    }
    if (tok_str_field(step, "type", &s, &n) != 1) {
        tok_fail(err, HX_EPARSE, t->path, "%s.type: expected a string", field);
        return NULL;
    }
    return s;
}

/* "<field>.<key>[i]" into buf. */
static void tok_subfield(char *buf, size_t size, const char *field, const char *key, size_t i)
{
    int k = snprintf(buf, size, "%s.%s[%zu]", field, key, i);
    if (k < 0 || (size_t)k >= size)
        buf[size - 1] = '\0'; /* a long path is cut; the message still says where */
}

/* A Sequence's array of steps, or NULL after setting err. */
static const json_t *tok_seq_items(const hx_tokenizer *t, const json_t *step, const char *field,
                                   const char *key, int depth, hx_err *err)
{
    const json_t *arr = json_object_get(step, key);
    if (depth >= HX_TOK_MAX_DEPTH) {
        tok_fail(err, HX_ENOTSUP, t->path, "%s: Sequence nested more than %d deep", field,
                 HX_TOK_MAX_DEPTH);
        return NULL;
    }
    if (!json_is_array(arr)) {
        tok_fail(err, HX_EPARSE, t->path, "%s.%s: expected an array", field, key);
        return NULL;
    }
    return arr;
}

static hx_status tok_add_op(hx_tokenizer *t, hx_tok_op **ops, size_t *n, int kind,
                            const char *a, size_t alen, const char *b, size_t blen, hx_err *err)
{
    hx_tok_op *grown = realloc(*ops, (*n + 1) * sizeof **ops);
    if (!grown)
        return tok_fail(err, HX_ENOMEM, t->path, "out of memory");
    *ops = grown;
    hx_tok_op *op = &grown[*n];
    memset(op, 0, sizeof *op);
    op->kind = kind;
    if (a && !(op->a = tok_memdup(a, alen)))
        return tok_fail(err, HX_ENOMEM, t->path, "out of memory");
    op->alen = alen;
    if (b && !(op->b = tok_memdup(b, blen))) {
        free(op->a);
        return tok_fail(err, HX_ENOMEM, t->path, "out of memory");
    }
    op->blen = blen;
    (*n)++;
    return HX_OK;
}

/* A Replace step's String pattern and content. */
static hx_status tok_replace_args(const hx_tokenizer *t, const json_t *step, const char *field,
                                  const char **pat, size_t *plen, const char **rep,
                                  size_t *rlen, hx_err *err)
{
    const json_t *pattern = json_object_get(step, "pattern");
    if (!json_is_object(pattern))
        return tok_fail(err, HX_EPARSE, t->path, "%s.pattern: expected an object", field);
    if (json_object_get(pattern, "Regex"))
        return tok_fail(err, HX_ENOTSUP, t->path,
                        "%s.pattern: Replace with a Regex is not supported; expected String",
                        field);
    if (tok_str_field(pattern, "String", pat, plen) != 1 || *plen == 0)
        return tok_fail(err, HX_EPARSE, t->path,
                        "%s.pattern.String: expected a non-empty string", field);
    if (tok_str_field(step, "content", rep, rlen) != 1)
        return tok_fail(err, HX_EPARSE, t->path, "%s.content: expected a string", field);
    return HX_OK;
}

static hx_status tok_parse_normalizer(hx_tokenizer *t, const json_t *step, const char *field,
                                      int depth, hx_err *err)
{
    if (!step || json_is_null(step))
        return HX_OK;
    const char *type = tok_step_type(t, step, field, err);
    if (!type)
        return err ? err->code : HX_EPARSE;
    if (!strcmp(type, "Sequence")) {
        const json_t *items = tok_seq_items(t, step, field, "normalizers", depth, err);
        if (!items)
            return err ? err->code : HX_EPARSE;
        for (size_t i = 0; i < json_array_size(items); i++) {
            char sub[160];
            tok_subfield(sub, sizeof sub, field, "normalizers", i);
            hx_status st = tok_parse_normalizer(t, json_array_get(items, i), sub, depth + 1, err);
            if (st != HX_OK)
                return st;
        }
        return HX_OK;
    }
    if (!strcmp(type, "Prepend")) {
        const char *s;
        size_t n;
        if (tok_str_field(step, "prepend", &s, &n) != 1)
            return tok_fail(err, HX_EPARSE, t->path, "%s.prepend: expected a string", field);
        return tok_add_op(t, &t->norm, &t->n_norm, OP_PREPEND, s, n, NULL, 0, err);
    }
    if (!strcmp(type, "Replace")) {
        const char *pat, *rep;
        size_t plen, rlen;
        hx_status st = tok_replace_args(t, step, field, &pat, &plen, &rep, &rlen, err);
        if (st != HX_OK)
            return st;
        return tok_add_op(t, &t->norm, &t->n_norm, OP_REPLACE, pat, plen, rep, rlen, err);
    }
    if (!strcmp(type, "NFC"))
        return HX_OK; /* text is taken as NFC already (see tokenizer.h) */
    return tok_fail(err, HX_ENOTSUP, t->path,
                    "%s.type: normalizer '%s' is not supported; expected Sequence, Prepend, "
                    "Replace or NFC",
                    field, type);
}

/* Metaspace's replacement and prepend scheme (pre-tokenizer and decoder alike). */
static hx_status tok_metaspace_args(const hx_tokenizer *t, const json_t *step, const char *field,
                                    char repl[8], size_t *repl_len, int *prepend, hx_err *err)
{
    const char *s;
    size_t n;
    int r = tok_str_field(step, "replacement", &s, &n);
    if (r < 0 || (r == 1 && (n == 0 || n >= 8)))
        return tok_fail(err, HX_EPARSE, t->path,
                        "%s.replacement: expected a string of 1 to 7 bytes", field);
    if (r == 0) {
        s = "\xE2\x96\x81"; /* ▁ */
        n = 3;
    }
    memcpy(repl, s, n);
    repl[n] = '\0';
    *repl_len = n;
    int add_prefix = 1;
    hx_status st = tok_bool_field(t, step, field, "add_prefix_space", &add_prefix, err);
    if (st != HX_OK)
        return st;
    *prepend = add_prefix ? PREPEND_ALWAYS : PREPEND_NEVER;
    r = tok_str_field(step, "prepend_scheme", &s, &n);
    if (r < 0)
        return tok_fail(err, HX_EPARSE, t->path, "%s.prepend_scheme: expected a string", field);
    if (r == 1) {
        if (!strcmp(s, "always"))
            *prepend = PREPEND_ALWAYS;
        else if (!strcmp(s, "first"))
            *prepend = PREPEND_FIRST;
        else if (!strcmp(s, "never"))
            *prepend = PREPEND_NEVER;
        else
            return tok_fail(err, HX_EPARSE, t->path,
                            "%s.prepend_scheme: '%s' is not one of always, first, never",
                            field, s);
    }
    return HX_OK;
}

static hx_status tok_set_split(hx_tokenizer *t, int kind, int digits, const char *field,
                               hx_err *err)
{
    if (t->split != SPLIT_NONE && (t->split != kind || t->split_digits != digits))
        return tok_fail(err, HX_ENOTSUP, t->path,
                        "%s: a second, different split of the text is not supported", field);
    t->split = kind;
    t->split_digits = digits;
    return HX_OK;
}

static hx_status tok_parse_pretok(hx_tokenizer *t, const json_t *step, const char *field,
                                  int depth, hx_err *err)
{
    if (!step || json_is_null(step))
        return HX_OK;
    const char *type = tok_step_type(t, step, field, err);
    if (!type)
        return err ? err->code : HX_EPARSE;
    hx_status st;
    if (!strcmp(type, "Sequence")) {
        const json_t *items = tok_seq_items(t, step, field, "pretokenizers", depth, err);
        if (!items)
            return err ? err->code : HX_EPARSE;
        for (size_t i = 0; i < json_array_size(items); i++) {
            char sub[160];
            tok_subfield(sub, sizeof sub, field, "pretokenizers", i);
            if ((st = tok_parse_pretok(t, json_array_get(items, i), sub, depth + 1, err)) !=
                HX_OK)
                return st;
        }
        return HX_OK;
    }
    if (!strcmp(type, "ByteLevel")) {
        int use_regex = 1;
        t->byte_level = 1;
        if ((st = tok_bool_field(t, step, field, "add_prefix_space", &t->prefix_space, err)) !=
                HX_OK ||
            (st = tok_bool_field(t, step, field, "use_regex", &use_regex, err)) != HX_OK)
            return st;
        return use_regex ? tok_set_split(t, SPLIT_GPT2, 0, field, err) : HX_OK;
    }
    if (!strcmp(type, "Split")) {
        const json_t *pattern = json_object_get(step, "pattern");
        const char *re, *behavior;
        size_t relen, blen;
        int invert = 0;
        if (!json_is_object(pattern))
            return tok_fail(err, HX_EPARSE, t->path, "%s.pattern: expected an object", field);
        if (tok_str_field(pattern, "Regex", &re, &relen) != 1)
            return tok_fail(err, HX_ENOTSUP, t->path,
                            "%s.pattern: only a Regex pattern is supported", field);
        if (tok_str_field(step, "behavior", &behavior, &blen) != 1 ||
            strcmp(behavior, "Isolated") != 0)
            return tok_fail(err, HX_ENOTSUP, t->path,
                            "%s.behavior: only Isolated is supported", field);
        if ((st = tok_bool_field(t, step, field, "invert", &invert, err)) != HX_OK)
            return st;
        if (invert)
            return tok_fail(err, HX_ENOTSUP, t->path, "%s.invert: true is not supported",
                            field);
        if (relen == sizeof tok_re_gpt2 - 1 && !memcmp(re, tok_re_gpt2, relen))
            return tok_set_split(t, SPLIT_GPT2, 0, field, err);
        if (relen == sizeof tok_re_llama3 - 1 && !memcmp(re, tok_re_llama3, relen))
            return tok_set_split(t, SPLIT_LLAMA3, 3, field, err);
        if (relen == sizeof tok_re_qwen2 - 1 && !memcmp(re, tok_re_qwen2, relen))
            return tok_set_split(t, SPLIT_LLAMA3, 1, field, err);
        return tok_fail(err, HX_ENOTSUP, t->path,
                        "%s.pattern.Regex: " TOKFMT " is not a split this reader implements "
                        "(GPT-2, Llama-3 or Qwen2)",
                        field, TOKARG(re, relen));
    }
    if (!strcmp(type, "Metaspace")) {
        t->metaspace = 1;
        t->ms_split = 1;
        if ((st = tok_metaspace_args(t, step, field, t->ms_repl, &t->ms_repl_len,
                                     &t->ms_prepend, err)) != HX_OK)
            return st;
        return tok_bool_field(t, step, field, "split", &t->ms_split, err);
    }
    return tok_fail(err, HX_ENOTSUP, t->path,
                    "%s.type: pre-tokenizer '%s' is not supported; expected Sequence, "
                    "ByteLevel, Split or Metaspace",
                    field, type);
}

static hx_status tok_parse_decoder(hx_tokenizer *t, const json_t *step, const char *field,
                                   int depth, int *fused, hx_err *err)
{
    if (!step || json_is_null(step))
        return HX_OK;
    const char *type = tok_step_type(t, step, field, err);
    if (!type)
        return err ? err->code : HX_EPARSE;
    hx_status st;
    if (!strcmp(type, "Sequence")) {
        const json_t *items = tok_seq_items(t, step, field, "decoders", depth, err);
        if (!items)
            return err ? err->code : HX_EPARSE;
        for (size_t i = 0; i < json_array_size(items); i++) {
            char sub[160];
            tok_subfield(sub, sizeof sub, field, "decoders", i);
            if ((st = tok_parse_decoder(t, json_array_get(items, i), sub, depth + 1, fused,
                                        err)) != HX_OK)
                return st;
        }
        return HX_OK;
    }
    if (!strcmp(type, "ByteLevel"))
        return tok_add_op(t, &t->dec, &t->n_dec, OP_BYTE_LEVEL, NULL, 0, NULL, 0, err);
    if (!strcmp(type, "ByteFallback"))
        return tok_add_op(t, &t->dec, &t->n_dec, OP_BYTE_FALLBACK, NULL, 0, NULL, 0, err);
    if (!strcmp(type, "Fuse")) {
        *fused = 1;
        return HX_OK;
    }
    if (!strcmp(type, "Replace")) {
        const char *pat, *rep;
        size_t plen, rlen;
        if ((st = tok_replace_args(t, step, field, &pat, &plen, &rep, &rlen, err)) != HX_OK)
            return st;
        /* after a Fuse it would see the whole text; per token is the same unless
           the pattern spans two tokens */
        return tok_add_op(t, &t->dec, &t->n_dec, OP_REPLACE, pat, plen, rep, rlen, err);
    }
    if (!strcmp(type, "Strip")) {
        const char *c;
        size_t clen;
        long long start = 0, stop = 0;
        if (tok_str_field(step, "content", &c, &clen) != 1 || clen != 1 || c[0] != ' ')
            return tok_fail(err, HX_ENOTSUP, t->path,
                            "%s.content: only Strip of ' ' is supported", field);
        if (hx_json_get_int(step, "start", &start) == HX_EINVAL ||
            hx_json_get_int(step, "stop", &stop) == HX_EINVAL || start < 0 || start > 8 ||
            stop != 0)
            return tok_fail(err, HX_ENOTSUP, t->path,
                            "%s: only Strip with start 0..8 and stop 0 is supported", field);
        if (!*fused && start > 0)
            return tok_fail(err, HX_ENOTSUP, t->path,
                            "%s: Strip of every token (no Fuse before it) is not supported",
                            field);
        t->strip_spaces += (int)start;
        return HX_OK;
    }
    if (!strcmp(type, "Metaspace")) {
        char repl[8];
        size_t repl_len;
        int prepend;
        if ((st = tok_metaspace_args(t, step, field, repl, &repl_len, &prepend, err)) != HX_OK ||
            (st = tok_add_op(t, &t->dec, &t->n_dec, OP_METASPACE, repl, repl_len, " ", 1,
                             err)) != HX_OK)
            return st;
        t->dec[t->n_dec - 1].drop_first = prepend != PREPEND_NEVER;
        t->first_differs |= prepend != PREPEND_NEVER;
        return HX_OK;
    }
    return tok_fail(err, HX_ENOTSUP, t->path,
                    "%s.type: decoder '%s' is not supported; expected Sequence, ByteLevel, "
                    "ByteFallback, Fuse, Replace, Strip or Metaspace",
                    field, type);
}

/* added_tokens: validates, copies and returns the largest id (-1 when none). */
static hx_status tok_load_added(hx_tokenizer *t, const json_t *root, long long *max_id,
                                hx_err *err)
{
    const json_t *arr = json_object_get(root, "added_tokens");
    *max_id = -1;
    if (!arr || json_is_null(arr))
        return HX_OK;
    if (!json_is_array(arr))
        return tok_fail(err, HX_EPARSE, t->path, "added_tokens: expected an array");
    size_t n = json_array_size(arr), bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(arr, i);
        json_t *idv = json_object_get(e, "id");
        const char *s;
        size_t len;
        if (!json_is_object(e))
            return tok_fail(err, HX_EPARSE, t->path, "added_tokens[%zu]: expected an object",
                            i);
        if (!json_is_integer(idv) || json_integer_value(idv) < 0 ||
            json_integer_value(idv) > HX_TOKENIZER_MAX_ID)
            return tok_fail(err, HX_EPARSE, t->path,
                            "added_tokens[%zu].id: expected an integer in [0, %d]", i,
                            HX_TOKENIZER_MAX_ID);
        if (tok_str_field(e, "content", &s, &len) != 1 || len == 0)
            return tok_fail(err, HX_EPARSE, t->path,
                            "added_tokens[%zu].content: expected a non-empty string", i);
        bytes += len;
        if (json_integer_value(idv) > *max_id)
            *max_id = json_integer_value(idv);
    }
    t->added = calloc(n ? n : 1, sizeof *t->added);
    t->added_content = calloc(n ? n : 1, sizeof *t->added_content);
    t->added_arena = malloc(bytes + 1);
    if (!t->added || !t->added_content || !t->added_arena ||
        tok_strmap_init(&t->added_map, n) != 0)
        return tok_fail(err, HX_ENOMEM, t->path, "out of memory");
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(arr, i);
        const char *s = "";
        size_t len = 0;
        int lstrip = 0, rstrip = 0;
        char field[48];
        snprintf(field, sizeof field, "added_tokens[%zu]", i);
        hx_status st;
        if ((st = tok_bool_field(t, e, field, "lstrip", &lstrip, err)) != HX_OK ||
            (st = tok_bool_field(t, e, field, "rstrip", &rstrip, err)) != HX_OK)
            return st;
        tok_str_field(e, "content", &s, &len);
        memcpy(t->added_arena + off, s, len);
        hx_tok_added *a = &t->added[t->n_added];
        a->id = (int32_t)json_integer_value(json_object_get(e, "id"));
        a->content.off = (uint32_t)off;
        a->content.len = (uint32_t)len;
        a->lstrip = (uint8_t)lstrip;
        a->rstrip = (uint8_t)rstrip;
        t->added_content[t->n_added] = a->content;
        off += len;
        if (tok_strmap_insert(&t->added_map, t->added_content, t->added_arena,
                              (uint32_t)t->n_added) == (int32_t)t->n_added)
            t->n_added++; /* a repeated content keeps its first entry */
    }
    return HX_OK;
}

typedef struct hx_tok_order {
    unsigned char first;
    uint32_t len, idx;
} hx_tok_order;

static int tok_order_cmp(const void *x, const void *y)
{
    const hx_tok_order *a = x, *b = y;
    if (a->first != b->first)
        return a->first < b->first ? -1 : 1;
    if (a->len != b->len)
        return a->len > b->len ? -1 : 1; /* longest first */
    return a->idx < b->idx ? -1 : (a->idx > b->idx);
}

/* added_of_id and the first-byte index of added tokens (after vocab_size is known). */
static hx_status tok_index_added(hx_tokenizer *t, hx_err *err)
{
    size_t n = t->n_added;
    hx_tok_order *ord = malloc((n ? n : 1) * sizeof *ord);
    t->added_order = malloc((n ? n : 1) * sizeof *t->added_order);
    t->added_of_id = malloc((size_t)t->vocab_size * sizeof *t->added_of_id);
    if (!ord || !t->added_order || !t->added_of_id) {
        free(ord);
        return tok_fail(err, HX_ENOMEM, t->path, "out of memory");
    }
    for (int i = 0; i < t->vocab_size; i++)
        t->added_of_id[i] = -1;
    for (size_t i = 0; i < n; i++) {
        const hx_tok_added *a = &t->added[i];
        if (t->added_of_id[a->id] < 0)
            t->added_of_id[a->id] = (int32_t)i;
        ord[i].first = (unsigned char)t->added_arena[a->content.off];
        ord[i].len = a->content.len;
        ord[i].idx = (uint32_t)i;
    }
    qsort(ord, n, sizeof *ord, tok_order_cmp);
    memset(t->added_bucket, 0, sizeof t->added_bucket);
    for (size_t i = 0; i < n; i++) {
        t->added_order[i] = ord[i].idx;
        t->added_bucket[ord[i].first + 1]++;
    }
    for (int c = 0; c < 256; c++)
        t->added_bucket[c + 1] += t->added_bucket[c];
    free(ord);
    return HX_OK;
}

static hx_status tok_load_vocab(hx_tokenizer *t, const json_t *model, long long max_added,
                                hx_err *err)
{
    const json_t *vocab = json_object_get(model, "vocab");
    const char *key;
    size_t klen;
    json_t *v;
    if (!json_is_object(vocab))
        return tok_fail(err, HX_EPARSE, t->path,
                        "model.vocab: expected an object mapping tokens to ids");
    size_t bytes = 0;
    long long max_id = max_added;
    json_object_keylen_foreach((json_t *)vocab, key, klen, v)
    {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > HX_TOKENIZER_MAX_ID)
            return tok_fail(err, HX_EPARSE, t->path,
                            "model.vocab[" TOKFMT "]: expected an id in [0, %d]",
                            TOKARG(key, klen), HX_TOKENIZER_MAX_ID);
        bytes += klen;
        if (json_integer_value(v) > max_id)
            max_id = json_integer_value(v);
    }
    if (max_id < 0)
        return tok_fail(err, HX_EPARSE, t->path, "model.vocab: empty, and no added_tokens");
    t->vocab_size = (int)max_id + 1;
    t->vocab = malloc((size_t)t->vocab_size * sizeof *t->vocab);
    t->vocab_arena = malloc(bytes + 1);
    if (!t->vocab || !t->vocab_arena ||
        tok_strmap_init(&t->vocab_map, json_object_size(vocab)) != 0)
        return tok_fail(err, HX_ENOMEM, t->path, "out of memory");
    for (int i = 0; i < t->vocab_size; i++)
        t->vocab[i].off = HX_TOK_NONE, t->vocab[i].len = 0;
    size_t off = 0;
    json_object_keylen_foreach((json_t *)vocab, key, klen, v)
    {
        int id = (int)json_integer_value(v);
        hx_tok_span *sp = &t->vocab[id];
        if (sp->off != HX_TOK_NONE)
            return tok_fail(err, HX_EPARSE, t->path,
                            "model.vocab: id %d is given to both " TOKFMT " and " TOKFMT, id,
                            TOKARG(t->vocab_arena + sp->off, sp->len), TOKARG(key, klen));
        memcpy(t->vocab_arena + off, key, klen);
        sp->off = (uint32_t)off;
        sp->len = (uint32_t)klen;
        off += klen;
        tok_strmap_insert(&t->vocab_map, t->vocab, t->vocab_arena, (uint32_t)id);
    }
    return HX_OK;
}

static hx_status tok_load_merges(hx_tokenizer *t, const json_t *model, hx_err *err)
{
    const json_t *merges = json_object_get(model, "merges");
    if (!merges || json_is_null(merges))
        return HX_OK;
    if (!json_is_array(merges))
        return tok_fail(err, HX_EPARSE, t->path, "model.merges: expected an array");
    size_t n = json_array_size(merges);
    if (n > UINT32_MAX - 1)
        return tok_fail(err, HX_EPARSE, t->path, "model.merges: too many (%zu)", n);
    size_t cap = tok_table_cap(n);
    t->merges = calloc(cap, sizeof *t->merges);
    if (!t->merges)
        return tok_fail(err, HX_ENOMEM, t->path, "out of memory");
    t->merge_mask = cap - 1;
    hx_tok_buf cat = {0};
    hx_status st = HX_OK;
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(merges, i);
        const char *a = NULL, *b = NULL;
        size_t alen = 0, blen = 0;
        if (json_is_string(e)) {
            const char *s = json_string_value(e);
            size_t slen = json_string_length(e);
            const char *sp = memchr(s, ' ', slen);
            if (!sp || memchr(sp + 1, ' ', slen - (size_t)(sp + 1 - s)) || sp == s ||
                sp + 1 == s + slen) {
                st = tok_fail(err, HX_EPARSE, t->path,
                              "model.merges[%zu]: " TOKFMT
                              " is not two tokens separated by one space",
                              i, TOKARG(s, slen));
                goto out_free;
            }
            a = s, alen = (size_t)(sp - s), b = sp + 1, blen = slen - alen - 1;
        } else if (json_is_array(e) && json_array_size(e) == 2 &&
                   json_is_string(json_array_get(e, 0)) && json_is_string(json_array_get(e, 1))) {
            a = json_string_value(json_array_get(e, 0));
            alen = json_string_length(json_array_get(e, 0));
            b = json_string_value(json_array_get(e, 1));
            blen = json_string_length(json_array_get(e, 1));
        } else {
            st = tok_fail(err, HX_EPARSE, t->path,
                          "model.merges[%zu]: expected \"A B\" or [\"A\", \"B\"]", i);
            goto out_free;
        }
        int32_t ia = tok_vocab_find(t, a, alen), ib = tok_vocab_find(t, b, blen);
        if (ia < 0 || ib < 0) {
            const char *miss = ia < 0 ? a : b;
            size_t mlen = ia < 0 ? alen : blen;
            st = tok_fail(err, HX_EPARSE, t->path,
                          "model.merges[%zu]: token " TOKFMT " is not in the vocab", i,
                          TOKARG(miss, mlen));
            goto out_free;
        }
        cat.len = 0;
        if (tok_buf_add(&cat, a, alen) != 0 || tok_buf_add(&cat, b, blen) != 0) {
            st = tok_fail(err, HX_ENOMEM, t->path, "out of memory");
            goto out_free;
        }
        int32_t ir = tok_vocab_find(t, cat.p, cat.len);
        if (ir < 0) {
            st = tok_fail(err, HX_EPARSE, t->path,
                          "model.merges[%zu]: merged token " TOKFMT " is not in the vocab", i,
                          TOKARG(cat.p, cat.len));
            goto out_free;
        }
        uint64_t key = tok_merge_key(ia, ib);
        size_t j = (size_t)tok_hash_u64(key) & t->merge_mask;
        while (t->merges[j].key != 0 && t->merges[j].key != key)
            j = (j + 1) & t->merge_mask;
        if (t->merges[j].key == 0) { /* a repeated pair keeps its first (lowest) rank */
            t->merges[j].key = key;
            t->merges[j].rank = (uint32_t)i;
            t->merges[j].id = ir;
        }
    }
out_free:
    free(cat.p);
    return st;
}

static hx_status tok_load_model(hx_tokenizer *t, const json_t *root, hx_err *err)
{
    const json_t *model = json_object_get(root, "model");
    if (!model)
        return tok_fail(err, HX_EPARSE, t->path, "missing 'model'");
    if (!json_is_object(model))
        return tok_fail(err, HX_EPARSE, t->path, "model: expected an object");
    const char *s;
    size_t n;
    int r = tok_str_field(model, "type", &s, &n);
    if (r < 0)
        return tok_fail(err, HX_EPARSE, t->path, "model.type: expected a string");
    if (r == 1 && strcmp(s, "BPE") != 0)
        return tok_fail(err, HX_ENOTSUP, t->path,
                        "model.type: " TOKFMT " is not supported; expected BPE", TOKARG(s, n));
    if (r == 0 && !json_object_get(model, "merges"))
        return tok_fail(err, HX_ENOTSUP, t->path,
                        "model.type: missing, and no model.merges; expected a BPE model");
    static const char *const unsupported[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        r = tok_str_field(model, unsupported[i], &s, &n);
        if (r < 0 || (r == 1 && n > 0))
            return tok_fail(err, HX_ENOTSUP, t->path, "model.%s is not supported",
                            unsupported[i]);
    }
    long long max_added;
    hx_status st;
    if ((st = tok_load_added(t, root, &max_added, err)) != HX_OK ||
        (st = tok_load_vocab(t, model, max_added, err)) != HX_OK ||
        (st = tok_index_added(t, err)) != HX_OK || (st = tok_load_merges(t, model, err)) != HX_OK)
        return st;
    if ((st = tok_bool_field(t, model, "model", "byte_fallback", &t->byte_fallback, err)) !=
            HX_OK ||
        (st = tok_bool_field(t, model, "model", "fuse_unk", &t->fuse_unk, err)) != HX_OK ||
        (st = tok_bool_field(t, model, "model", "ignore_merges", &t->ignore_merges, err)) !=
            HX_OK)
        return st;
    t->unk_id = -1;
    r = tok_str_field(model, "unk_token", &s, &n);
    if (r < 0)
        return tok_fail(err, HX_EPARSE, t->path, "model.unk_token: expected a string or null");
    if (r == 1)
        t->unk_id = tok_vocab_find(t, s, n); /* absent from the vocab: as if none, like HF */
    return HX_OK;
}

/* Runs the decoder steps on every token and stores the bytes. */
static hx_status tok_build_pieces(hx_tokenizer *t, hx_err *err)
{
    hx_tok_buf arena = {0}, x = {0}, y = {0};
    hx_status st = HX_OK;
    t->piece = malloc((size_t)t->vocab_size * sizeof *t->piece);
    if (!t->piece)
        goto out_nomem;
    for (int id = 0; id < t->vocab_size; id++) {
        const char *s;
        size_t n;
        if (!tok_token_string(t, id, &s, &n)) {
            t->piece[id].off = HX_TOK_NONE;
            t->piece[id].len = 0;
            continue;
        }
        if (tok_decode_token(t, s, n, 0, &x, &y, &s, &n) != 0)
            goto out_nomem;
        if (arena.len + n > UINT32_MAX - 1 || tok_buf_add(&arena, s, n) != 0)
            goto out_nomem;
        t->piece[id].off = (uint32_t)(arena.len - n);
        t->piece[id].len = (uint32_t)n;
    }
    t->piece_arena = arena.p ? arena.p : malloc(1);
    arena.p = NULL;
    if (!t->piece_arena)
        goto out_nomem;
    goto out_free;
out_nomem:
    st = tok_fail(err, HX_ENOMEM, t->path, "out of memory");
out_free:
    free(arena.p);
    free(x.p);
    free(y.p);
    return st;
}

/* The TemplateProcessing of a post_processor (alone or inside a Sequence), or NULL. */
static const json_t *tok_find_template(const json_t *pp, int depth)
{
    const char *type;
    size_t n;
    if (!json_is_object(pp) || depth > HX_TOK_MAX_DEPTH ||
        tok_str_field(pp, "type", &type, &n) != 1)
        return NULL;
    if (!strcmp(type, "TemplateProcessing"))
        return pp;
    if (!strcmp(type, "Sequence")) {
        const json_t *arr = json_object_get(pp, "processors");
        for (size_t i = 0; i < json_array_size(arr); i++) {
            const json_t *r = tok_find_template(json_array_get(arr, i), depth + 1);
            if (r)
                return r;
        }
    }
    return NULL;
}

static int tok_has_piece(const hx_tokenizer *t, long long id)
{
    return id >= 0 && id < t->vocab_size && t->piece[id].off != HX_TOK_NONE;
}

/* The special tokens a TemplateProcessing puts before and after "$A" in "single". */
static hx_status tok_load_template(hx_tokenizer *t, const json_t *root, int *bos, int *eos,
                                   hx_err *err)
{
    *bos = *eos = -1;
    const json_t *tp = tok_find_template(json_object_get(root, "post_processor"), 0);
    if (!tp)
        return HX_OK;
    const json_t *single = json_object_get(tp, "single");
    const json_t *specials = json_object_get(tp, "special_tokens");
    if (!json_is_array(single))
        return tok_fail(err, HX_EPARSE, t->path,
                        "post_processor: TemplateProcessing.single: expected an array");
    int seen_a = 0;
    for (size_t i = 0; i < json_array_size(single); i++) {
        const json_t *item = json_array_get(single, i);
        const json_t *sp = json_object_get(item, "SpecialToken");
        const char *name;
        size_t nlen;
        long long id;
        if (json_object_get(item, "Sequence")) {
            seen_a = 1;
            continue;
        }
        if (!json_is_object(sp) || tok_str_field(sp, "id", &name, &nlen) != 1)
            return tok_fail(err, HX_EPARSE, t->path,
                            "post_processor: single[%zu]: expected {\"SpecialToken\": "
                            "{\"id\": NAME}} or {\"Sequence\": ...}",
                            i);
        const json_t *entry = json_object_get(specials, name);
        if (entry) {
            const json_t *ids = json_object_get(entry, "ids");
            if (!json_is_array(ids) || json_array_size(ids) < 1 ||
                !json_is_integer(json_array_get(ids, 0)))
                return tok_fail(err, HX_EPARSE, t->path,
                                "post_processor: special_tokens[" TOKFMT
                                "].ids: expected an array of ids",
                                TOKARG(name, nlen));
            id = json_integer_value(json_array_get(ids, 0));
        } else {
            id = hx_tokenizer_token_id(t, name);
        }
        if (!tok_has_piece(t, id))
            return tok_fail(err, HX_EPARSE, t->path,
                            "post_processor: single[%zu]: special token " TOKFMT
                            " (id %lld) is not a token",
                            i, TOKARG(name, nlen), id);
        if (!seen_a && *bos < 0)
            *bos = (int)id;
        else if (seen_a && *eos < 0)
            *eos = (int)id;
    }
    return HX_OK;
}

/* bos_token / eos_token of tokenizer_config.json: a string or {"content": ...}. */
static hx_status tok_config_token(const hx_tokenizer *t, const json_t *cfg, const char *cfg_path,
                                  const char *key, int *out, hx_err *err)
{
    const json_t *v = json_object_get(cfg, key);
    const char *name;
    if (!v || json_is_null(v))
        return HX_OK;
    if (json_is_string(v))
        name = json_string_value(v);
    else if (json_is_object(v) && json_is_string(json_object_get(v, "content")))
        name = json_string_value(json_object_get(v, "content"));
    else
        return hx_err_set(err, HX_EPARSE,
                          "tokenizer config '%s': %s: expected a string or an object with "
                          "\"content\"",
                          cfg_path, key);
    int id = hx_tokenizer_token_id(t, name);
    if (id < 0)
        return hx_err_set(err, HX_EPARSE, "tokenizer config '%s': %s '%.60s' is not a token of '%s'",
                          cfg_path, key, name, t->path);
    *out = id;
    return HX_OK;
}

static int tok_first_token(const hx_tokenizer *t, const char *const *names)
{
    for (size_t i = 0; names[i]; i++) {
        int id = hx_tokenizer_token_id(t, names[i]);
        if (id >= 0)
            return id;
    }
    return -1;
}

static hx_status tok_load_bos_eos(hx_tokenizer *t, const json_t *root, const char *cfg_path,
                                  hx_err *err)
{
    static const char *const bos_names[] = {"<s>", "<|begin_of_text|>", "<bos>", NULL};
    static const char *const eos_names[] = {"</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>",
                                            NULL};
    int tbos, teos, cbos = -1, ceos = -1;
    hx_status st = tok_load_template(t, root, &tbos, &teos, err);
    if (st != HX_OK)
        return st;
    if (hx_file_is_regular(cfg_path)) {
        json_t *cfg = NULL;
        if ((st = hx_json_load_file(cfg_path, "tokenizer config", &cfg, err)) != HX_OK)
            return st;
        if (!json_is_object(cfg))
            st = hx_err_set(err, HX_EPARSE,
                            "tokenizer config '%s': expected a JSON object at the top level",
                            cfg_path);
        if (st == HX_OK)
            st = tok_config_token(t, cfg, cfg_path, "bos_token", &cbos, err);
        if (st == HX_OK)
            st = tok_config_token(t, cfg, cfg_path, "eos_token", &ceos, err);
        json_decref(cfg);
        if (st != HX_OK)
            return st;
    }
    t->adds_bos = tbos >= 0;
    t->bos = tbos >= 0 ? tbos : cbos >= 0 ? cbos : tok_first_token(t, bos_names);
    t->eos = ceos >= 0 ? ceos : teos >= 0 ? teos : tok_first_token(t, eos_names);
    return HX_OK;
}

/* A file with no normalizer or pre_tokenizer whose vocab holds all 256 byte-level characters. */
static void tok_guess_byte_level(hx_tokenizer *t, const json_t *root)
{
    const json_t *norm = json_object_get(root, "normalizer");
    const json_t *pre = json_object_get(root, "pre_tokenizer");
    const json_t *dec = json_object_get(root, "decoder");
    const char *type;
    size_t n;
    if ((norm && !json_is_null(norm)) || (pre && !json_is_null(pre)))
        return;
    if (dec && !json_is_null(dec) &&
        (tok_str_field(dec, "type", &type, &n) != 1 || strcmp(type, "ByteLevel") != 0))
        return;
    uint32_t cp_of[256];
    tok_bytes_to_unicode(cp_of);
    for (int b = 0; b < 256; b++) {
        unsigned char u[4];
        size_t k = tok_utf8_put(cp_of[b], u);
        if (tok_vocab_find(t, (const char *)u, k) < 0)
            return;
    }
    t->byte_level = 1;
    t->split = SPLIT_GPT2;
}

hx_status hx_tokenizer_load(const char *path, hx_tokenizer **out, hx_err *err)
{
    if (!path || !out)
        return hx_err_set(err, HX_EINVAL, "tokenizer load: invalid arguments");
    *out = NULL;
    hx_status st = HX_OK;
    json_t *root = NULL;
    char *cfg_path = NULL;
    hx_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return hx_err_set(err, HX_ENOMEM, "cannot load tokenizer '%s': out of memory", path);
    size_t plen = strlen(path);
    const char *slash = strrchr(path, '/');
    if (hx_file_is_dir(path)) {
        t->path = tok_join(path, plen, "tokenizer.json");
        cfg_path = tok_join(path, plen, "tokenizer_config.json");
    } else {
        t->path = tok_memdup(path, plen);
        cfg_path = tok_join(path, slash ? (size_t)(slash - path + 1) : 0, "tokenizer_config.json");
    }
    if (!t->path || !cfg_path) {
        st = hx_err_set(err, HX_ENOMEM, "cannot load tokenizer '%s': out of memory", path);
        goto out_free;
    }
    if ((st = hx_json_load_file(t->path, "tokenizer", &root, err)) != HX_OK)
        goto out_free;
    if (!json_is_object(root)) {
        st = tok_fail(err, HX_EPARSE, t->path, "expected a JSON object at the top level");
        goto out_free;
    }
    if ((st = tok_load_model(t, root, err)) != HX_OK ||
        (st = tok_parse_normalizer(t, json_object_get(root, "normalizer"), "normalizer", 0,
                                   err)) != HX_OK ||
        (st = tok_parse_pretok(t, json_object_get(root, "pre_tokenizer"), "pre_tokenizer", 0,
                               err)) != HX_OK)
        goto out_free;
    if (t->metaspace && (t->byte_level || t->split != SPLIT_NONE)) {
        st = tok_fail(err, HX_ENOTSUP, t->path,
                      "pre_tokenizer: Metaspace together with ByteLevel or Split is not "
                      "supported");
        goto out_free;
    }
    tok_guess_byte_level(t, root);
    const json_t *dec = json_object_get(root, "decoder");
    int fused = 0;
    if ((!dec || json_is_null(dec)) && t->byte_level)
        st = tok_add_op(t, &t->dec, &t->n_dec, OP_BYTE_LEVEL, NULL, 0, NULL, 0, err);
    else
        st = tok_parse_decoder(t, dec, "decoder", 0, &fused, err);
    if (st != HX_OK)
        goto out_free;

    uint32_t cp_of[256];
    tok_bytes_to_unicode(cp_of);
    for (size_t i = 0; i < 324; i++)
        t->byte_of[i] = -1;
    for (int b = 0; b < 256; b++)
        t->byte_of[cp_of[b]] = (int16_t)b;
    for (int b = 0; b < 256; b++) {
        t->byte_id[b] = -1;
        t->fallback_id[b] = -1;
        if (t->byte_level) {
            unsigned char u[4];
            size_t k = tok_utf8_put(cp_of[b], u);
            t->byte_id[b] = tok_vocab_find(t, (const char *)u, k);
        }
        if (t->byte_fallback) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", (unsigned)b);
            t->fallback_id[b] = tok_vocab_find(t, name, 6);
        }
    }
    if ((st = tok_build_pieces(t, err)) != HX_OK ||
        (st = tok_load_bos_eos(t, root, cfg_path, err)) != HX_OK)
        goto out_free;
    *out = t;
    t = NULL;
out_free:
    json_decref(root);
    free(cfg_path);
    hx_tokenizer_free(t);
    return st;
}
