// Y[t, :n] = X[t, :n] * w / sqrt(mean(X[t, :n]^2) + eps), one workgroup a token.

struct Params {
    n: u32,
    ldx: u32,
    x_off: u32,
    ldy: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> X: array<f32>;
@group(0) @binding(1) var<storage, read> Wn: array<f32>;
@group(0) @binding(2) var<storage, read_write> Y: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn rmsnorm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let xb = P.x_off + wid.x * P.ldx;
    var ss = 0.0;
    for (var i = lid; i < P.n; i += WG) {
        ss += X[xb + i] * X[xb + i];
    }
    red[lid] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(red[0] / f32(P.n) + P.eps);
    for (var i = lid; i < P.n; i += WG) {
        Y[wid.x * P.ldy + i] = X[xb + i] * inv * Wn[i];
    }
}
