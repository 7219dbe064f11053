// Half-precision rows (F16 tensors, and types without a kernel dequantized at load),
// each padded with zeros to a multiple of 32 weights: 16 words a unit.
@group(0) @binding(0) var<storage, read> W: array<u32>;

fn dequant(wrow: u32, drow: u32, u: u32) -> array<vec4<f32>, 8> {
    let b = wrow + u * 16u;
    var o: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        o[i] = vec4<f32>(unpack2x16float(W[b + 2u * i]), unpack2x16float(W[b + 2u * i + 1u]));
    }
    return o;
}
