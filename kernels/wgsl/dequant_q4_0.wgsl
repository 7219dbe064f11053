// Q4_0 as repacked at load: W holds each block's 16 quant bytes (4 words), D its scale as f32.
// Block of 32: byte i holds weight i (low nibble) and weight i + 16 (high nibble), q - 8.
@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> D: array<f32>;

// 32 weights of unit u (one block) of the row starting at word wrow / scale drow.
fn dequant(wrow: u32, drow: u32, u: u32) -> array<vec4<f32>, 8> {
    let d = D[drow + u];
    var o: array<vec4<f32>, 8>;
    for (var i = 0u; i < 4u; i++) {
        let q = W[wrow + u * 4u + i];
        let lo = vec4<u32>(q, q >> 8u, q >> 16u, q >> 24u) & vec4<u32>(15u);
        let hi = vec4<u32>(q >> 4u, q >> 12u, q >> 20u, q >> 28u) & vec4<u32>(15u);
        o[i] = (vec4<f32>(lo) - 8.0) * d;
        o[i + 4u] = (vec4<f32>(hi) - 8.0) * d;
    }
    return o;
}
