// H[t, i] = act(G[t, i]) * G[t, n_ff + i]: the gated feed-forward's activation over the
// gate | up projections; act is silu (SwiGLU) or ggml's tanh GELU (GeGLU, gemma).
// Grid: (ceil(n_ff / 64), tokens).

struct Params {
    n_ff: u32,
    ldg: u32,
    ldh: u32,
    gelu: u32,          // 1: 0.5 g (1 + tanh(sqrt(2/pi) g (1 + 0.044715 g^2))), 0: g / (1 + exp(-g))
}

@group(0) @binding(0) var<storage, read> G: array<f32>;
@group(0) @binding(1) var<storage, read_write> H: array<f32>;
@group(0) @binding(2) var<uniform> P: Params;

@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= P.n_ff) {
        return;
    }
    let g = G[gid.y * P.ldg + i];
    let u = G[gid.y * P.ldg + P.n_ff + i];
    var a: f32;
    if (P.gelu != 0u) {
        a = 0.5 * g * (1.0 + tanh(0.7978845608028654 * g * (1.0 + 0.044715 * g * g)));
    } else {
        a = g / (1.0 + exp(-g));
    }
    H[gid.y * P.ldh + i] = a * u;
}
