// Causal grouped-query attention of token t (position IO[0] + t) for query head h over the
// cached keys 0..pos: one workgroup per (head, token), keys a tile of WG at a time with an
// online softmax (running max m and sum l; earlier tiles rescaled by exp(m_old - m_new)),
// so scratch does not grow with the context. Query head h reads kv head h / (n_head / n_kv).
// Scores are soft-capped (gemma2: s -> cap tanh(s / cap), after the KQ scale) and, on a
// sliding-window layer, keys at pos - window or earlier are masked. Grid: (n_head, T).

struct Params {
    n_head: u32,
    n_kv: u32,
    head_dim: u32,
    ld_q: u32,          // floats between tokens in Q
    kv_dim: u32,
    ld_o: u32,          // floats between tokens in O
    scale: f32,         // KQ scale
    softcap: f32,       // > 0: soft-cap the scores
    window: u32,        // > 0: a query at p sees keys p' with p - p' < window
}

@group(0) @binding(0) var<storage, read> Q: array<f32>;     // rotated q (rope_kv's QR)
@group(0) @binding(1) var<storage, read> KC: array<f32>;
@group(0) @binding(2) var<storage, read> VC: array<f32>;
@group(0) @binding(3) var<storage, read> IO: array<u32>;
@group(0) @binding(4) var<storage, read_write> O: array<f32>;
@group(0) @binding(5) var<uniform> P: Params;

const WG: u32 = 64u;
const DPT: u32 = 4u;                  // output dims a thread owns: head_dim <= WG * DPT
var<workgroup> q: array<f32, 256>;
var<workgroup> p: array<f32, 64>;     // the tile's scores, then its weights
var<workgroup> pos_shared: u32;

@compute @workgroup_size(64)
fn attention(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if (lid == 0u) {
        pos_shared = IO[0] + wid.y;
    }
    let pos = workgroupUniformLoad(&pos_shared);
    let h = wid.x;
    let hd = P.head_dim;
    let kv0 = (h / (P.n_head / P.n_kv)) * hd;
    for (var d = lid; d < hd; d += WG) {
        q[d] = Q[wid.y * P.ld_q + h * hd + d] * P.scale;
    }
    workgroupBarrier();
    var m = -1e30;
    var l = 0.0;
    var acc: array<f32, DPT>;
    var first = 0u;                      // the oldest key the query sees
    if (P.window > 0u && pos + 1u > P.window) {
        first = pos + 1u - P.window;
    }
    for (var k0 = first; k0 <= pos; k0 += WG) {
        let j = k0 + lid;
        var s = -1e30;
        if (j <= pos) {
            s = 0.0;
            for (var d = 0u; d < hd; d++) {
                s += q[d] * KC[j * P.kv_dim + kv0 + d];
            }
            if (P.softcap > 0.0) {
                s = P.softcap * tanh(s / P.softcap);
            }
        }
        p[lid] = s;
        workgroupBarrier();
        var mt = m;
        for (var i = 0u; i < WG; i++) {
            mt = max(mt, p[i]);
        }
        let e = select(0.0, exp(s - mt), j <= pos);
        workgroupBarrier();
        p[lid] = e;
        workgroupBarrier();
        let alpha = exp(m - mt);
        var sum = 0.0;
        for (var i = 0u; i < WG; i++) {
            sum += p[i];
        }
        l = l * alpha + sum;
        m = mt;
        let n = min(WG, pos + 1u - k0);
        for (var c = 0u; c < DPT; c++) {
            let d = lid + c * WG;
            if (d < hd) {
                var a = acc[c] * alpha;
                for (var i = 0u; i < n; i++) {
                    a += p[i] * VC[(k0 + i) * P.kv_dim + kv0 + d];
                }
                acc[c] = a;
            }
        }
        workgroupBarrier();
    }
    for (var c = 0u; c < DPT; c++) {
        let d = lid + c * WG;
        if (d < hd) {
            O[wid.y * P.ld_o + h * hd + d] = acc[c] / l;
        }
    }
}
