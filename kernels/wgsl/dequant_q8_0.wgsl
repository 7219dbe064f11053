// Q8_0 as repacked at load: W holds each block's 32 int8 quants (8 words), D its scale as f32.
@group(0) @binding(0) var<storage, read> W: array<u32>;
@group(0) @binding(1) var<storage, read> D: array<f32>;

// The four signed bytes of a word, sign-extended by an arithmetic shift (portable: no
// packed-int8 extension needed).
fn i8x4(q: u32) -> vec4<f32> {
    let v = vec4<i32>(bitcast<i32>(q << 24u), bitcast<i32>(q << 16u), bitcast<i32>(q << 8u), bitcast<i32>(q));
    return vec4<f32>(v >> vec4<u32>(24u));
}

fn dequant(wrow: u32, drow: u32, u: u32) -> array<vec4<f32>, 8> {
    let d = D[drow + u];
    var o: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        o[i] = i8x4(W[wrow + u * 8u + i]) * d;
    }
    return o;
}
