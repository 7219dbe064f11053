// Q6_K super-blocks of 256 weights, 210 bytes padded at load to 212 (53 words) so each
// starts on a word: words 0..31 = ql (low nibbles), 32..47 = qh (2 high bits each),
// 48..51 = 16 int8 scales, word 52 = d (f16, low half).
// Unit u is sub-block j = u % 8: half n = j / 4 (128 weights), quarter k = j % 4; weight
// l (0..31) takes nibble k / 2 of ql[64n + 32 (k % 2) + l], bits 2k of qh[32n + l], and
// scale sc[8n + l / 16 + 2k]; q - 32.
@group(0) @binding(0) var<storage, read> W: array<u32>;

const SB_WORDS: u32 = 53u;

fn dequant(wrow: u32, drow: u32, u: u32) -> array<vec4<f32>, 8> {
    let base = wrow + (u / 8u) * SB_WORDS;
    let j = u % 8u;
    let n = j / 4u;
    let k = j % 4u;
    let d = unpack2x16float(W[base + 52u]).x;
    var o: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let ql = W[base + 16u * n + 8u * (k % 2u) + i] >> (4u * (k / 2u));
        let qh = W[base + 32u + 8u * n + i] >> (2u * k);
        let lo = vec4<u32>(ql, ql >> 8u, ql >> 16u, ql >> 24u) & vec4<u32>(15u);
        let hi = vec4<u32>(qh, qh >> 8u, qh >> 16u, qh >> 24u) & vec4<u32>(3u);
        let s = 8u * n + i / 4u + 2u * k;            // weights 4i..4i+3 share one scale
        let sc = bitcast<i32>(W[base + 48u + s / 4u] << (24u - 8u * (s % 4u))) >> 24u;
        o[i] = (vec4<f32>(lo | (hi << vec4<u32>(4u))) - 32.0) * (d * f32(sc));
    }
    return o;
}
