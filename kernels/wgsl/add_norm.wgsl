// X[t, :n] += RMSNorm(H[t, :n]) * w * scale: a block's output added to the residual stream
// through a post-norm (gemma2/3, olmo2). One workgroup a token.

struct Params {
    n: u32,
    ldx: u32,
    ldh: u32,
    eps: f32,
    scale: f32,         // granite-style residual scale (1 elsewhere)
}

@group(0) @binding(0) var<storage, read_write> X: array<f32>;
@group(0) @binding(1) var<storage, read> H: array<f32>;
@group(0) @binding(2) var<storage, read> Wn: array<f32>;
@group(0) @binding(3) var<uniform> P: Params;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn add_norm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let hb = wid.x * P.ldh;
    var ss = 0.0;
    for (var i = lid; i < P.n; i += WG) {
        ss += H[hb + i] * H[hb + i];
    }
    red[lid] = ss;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(red[0] / f32(P.n) + P.eps) * P.scale;
    for (var i = lid; i < P.n; i += WG) {
        X[wid.x * P.ldx + i] += H[hb + i] * inv * Wn[i];
    }
}
