// After the q|k|v projection of token t (position IO[0] + t), one workgroup a head
// (n_head query heads, then n_kv key heads, then n_kv value heads):
// add the bias (qwen2), RMS-normalize q and k per head (qwen3, gemma3) or over the whole q
// and the whole k projection (olmo2), rotate the first rope_dim dims of q and k (pairs
// (2i, 2i+1), or (i, i + rope_dim/2) for neox; rope_dim 0: a layer without rope, smollm3),
// then store q in QR and k and v in the caches' row for the position. (q does not go back into
// QKV: the full-projection norm of other heads' workgroups still reads it there.)
// Grid: (n_head + 2 n_kv, T).

struct Params {
    n_head: u32,
    n_kv: u32,
    head_dim: u32,
    rope_dim: u32,
    neox: u32,          // 1: neox halves, 0: interleaved pairs
    ld: u32,            // floats between tokens in QKV
    kv_dim: u32,        // n_kv * head_dim: floats a cache row
    has_bias: u32,
    qk_norm: u32,       // 1: RMS norm of each q and k head (weights: head_dim); 2: of all of q
                        // and all of k (weights: n_head * head_dim and n_kv * head_dim)
    eps: f32,
}

@group(0) @binding(0) var<storage, read> QKV: array<f32>;
@group(0) @binding(1) var<storage, read> CS: array<vec2<f32>>;   // (n_ctx, rope_dim / 2): cos, sin
@group(0) @binding(2) var<storage, read_write> KC: array<f32>;   // (n_ctx, kv_dim)
@group(0) @binding(3) var<storage, read_write> VC: array<f32>;
@group(0) @binding(4) var<storage, read> IO: array<u32>;
@group(0) @binding(5) var<storage, read> B: array<f32>;          // q | k | v bias (or a stand-in)
@group(0) @binding(6) var<storage, read> QN: array<f32>;         // q norm weight
@group(0) @binding(7) var<storage, read> KN: array<f32>;         // k norm weight
@group(0) @binding(8) var<uniform> P: Params;
@group(0) @binding(9) var<storage, read_write> QR: array<f32>;   // (T, n_head * head_dim): rotated q

const WG: u32 = 64u;
var<workgroup> v: array<f32, 256>;     // the head (head_dim <= 256)
var<workgroup> red: array<f32, 64>;
var<workgroup> pos_shared: u32;

@compute @workgroup_size(64)
fn rope_kv(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (lid == 0u) {
        pos_shared = IO[0] + wid.y;
    }
    let pos = workgroupUniformLoad(&pos_shared);
    let h = wid.x;
    let hd = P.head_dim;
    let is_q = h < P.n_head;
    let is_k = !is_q && h < P.n_head + P.n_kv;
    let col0 = h * hd;                  // heads are adjacent: q | k | v
    let base = wid.y * P.ld + col0;
    for (var d = lid; d < hd; d += WG) {
        v[d] = QKV[base + d] + select(0.0, B[col0 + d], P.has_bias != 0u);
    }
    workgroupBarrier();
    let q_dim = P.n_head * hd;
    if (P.qk_norm != 0u && (is_q || is_k)) {
        var ss = 0.0;
        var n = hd;
        if (P.qk_norm == 1u) {
            for (var d = lid; d < hd; d += WG) {
                ss += v[d] * v[d];
            }
        } else {            // the whole projection, read from QKV (biases: none in olmo2)
            let c0 = select(q_dim, 0u, is_q);
            n = select(P.kv_dim, q_dim, is_q);
            for (var d = lid; d < n; d += WG) {
                let e = QKV[wid.y * P.ld + c0 + d];
                ss += e * e;
            }
        }
        red[lid] = ss;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                red[lid] += red[lid + s];
            }
            workgroupBarrier();
        }
        let inv = inverseSqrt(red[0] / f32(n) + P.eps);
        workgroupBarrier();
        // per head: weight d; full: weight (column within q or k) = head offset + d
        let w0 = select(0u, select(col0 - q_dim, col0, is_q), P.qk_norm == 2u);
        for (var d = lid; d < hd; d += WG) {
            v[d] = v[d] * inv * select(KN[w0 + d], QN[w0 + d], is_q);
        }
        workgroupBarrier();
    }
    if (is_q || is_k) {
        let half = P.rope_dim / 2u;
        for (var i = lid; i < half; i += WG) {
            let a = select(2u * i, i, P.neox != 0u);
            let b = select(2u * i + 1u, i + half, P.neox != 0u);
            let cs = CS[pos * half + i];
            let xa = v[a];
            let xb = v[b];
            v[a] = xa * cs.x - xb * cs.y;
            v[b] = xa * cs.y + xb * cs.x;
        }
        workgroupBarrier();
    }
    for (var d = lid; d < hd; d += WG) {
        if (is_q) {
            QR[wid.y * q_dim + col0 + d] = v[d];
        } else if (is_k) {
            KC[pos * P.kv_dim + col0 - q_dim + d] = v[d];
        } else {
            VC[pos * P.kv_dim + col0 - q_dim - P.kv_dim + d] = v[d];
        }
    }
}
