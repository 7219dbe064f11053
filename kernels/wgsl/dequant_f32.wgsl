// Float32 rows (F32 and BF16 tensors), padded with zeros to a multiple of 32: 32 words a unit.
@group(0) @binding(0) var<storage, read> W: array<u32>;

fn dequant(wrow: u32, drow: u32, u: u32) -> array<vec4<f32>, 8> {
    let b = wrow + u * 32u;
    var o: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let p = b + 4u * i;
        o[i] = bitcast<vec4<f32>>(vec4<u32>(W[p], W[p + 1u], W[p + 2u], W[p + 3u]));
    }
    return o;
}
