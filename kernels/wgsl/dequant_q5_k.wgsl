// Q5_K super-blocks of 256 weights, 176 bytes (44 words) as in the file:
// word 0 = d | dmin (f16 pair), words 1..3 = 6-bit scales and mins (as Q4_K),
// words 4..11 = 32 bytes of high bits (bit j of byte l is weight l of sub-block j),
// words 12..43 = 128 bytes of low nibbles (laid out as Q4_K's).
@group(0) @binding(0) var<storage, read> W: array<u32>;

const SB_WORDS: u32 = 44u;

fn byte_at(word0: u32, k: u32) -> u32 {
    return (W[word0 + k / 4u] >> (8u * (k % 4u))) & 255u;
}

fn scale_min_k4(word0: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(word0, j) & 63u), f32(byte_at(word0, j + 4u) & 63u));
    }
    let sc = (byte_at(word0, j + 4u) & 15u) | ((byte_at(word0, j - 4u) >> 6u) << 4u);
    let m = (byte_at(word0, j + 4u) >> 4u) | ((byte_at(word0, j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

fn dequant(wrow: u32, drow: u32, u: u32) -> array<vec4<f32>, 8> {
    let base = wrow + (u / 8u) * SB_WORDS;
    let j = u % 8u;
    let dm = unpack2x16float(W[base]);
    let sm = scale_min_k4(base + 1u, j);
    let scale = dm.x * sm.x;
    let minv = dm.y * sm.y;
    let shift = 4u * (j % 2u);
    var o: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let q = W[base + 12u + 8u * (j / 2u) + i] >> shift;
        let h = W[base + 4u + i] >> j;
        let lo = vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u);
        let hi = vec4<u32>(h, h >> 8u, h >> 16u, h >> 24u) & vec4<u32>(1u);
        o[i] = vec4<f32>(lo + 16u * hi) * scale - minv;
    }
    return o;
}
