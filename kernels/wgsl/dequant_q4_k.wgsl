// Q4_K super-blocks of 256 weights, 144 bytes (36 words) as in the file:
// word 0 = d | dmin (f16 pair), words 1..3 = 12 bytes of 6-bit scales and mins,
// words 4..35 = 128 quant bytes. Unit u is sub-block j = u % 8 (32 weights): pair
// p = j / 2 of 32 bytes, low nibbles for even j, high for odd.
@group(0) @binding(0) var<storage, read> W: array<u32>;

const SB_WORDS: u32 = 36u;

fn byte_at(word0: u32, k: u32) -> u32 {
    return (W[word0 + k / 4u] >> (8u * (k % 4u))) & 255u;
}

// ggml's get_scale_min_k4: (scale, min) of sub-block j from the 12 packed bytes at word0.
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
        let q = W[base + 4u + 8u * (j / 2u) + i] >> shift;
        let v = vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u);
        o[i] = vec4<f32>(v) * scale - minv;
    }
    return o;
}
