// H[t, i] = silu(G[t, i]) * G[t, n_ff + i]: the gated feed-forward's activation over the
// gate | up projections. Grid: (ceil(n_ff / 64), tokens).

struct Params {
    n_ff: u32,
    ldg: u32,
    ldh: u32,
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
    H[gid.y * P.ldh + i] = g / (1.0 + exp(-g)) * u;
}
