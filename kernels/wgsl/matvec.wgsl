// Quantized matrix x vector (TB = 1) and matrix x matrix (TB tokens a thread), and the
// embedding lookup, over one dequant_<kind>.wgsl (prepended by ember.kernels.wgsl_source):
// fn dequant(wrow, drow, u) -> the 32 weights of unit u of a row, as 8 vec4.
//
// matvec: Y[t, y_off + r] (+)= sum_u dequant(r, u) . x[t, 32u ..] for rows r, tokens t, where
// x = X, or (norm = 1) RMSNorm(X) * G: the norm is folded in, so it needs no dispatch of its
// own: each workgroup sums the squares of its tokens' rows of X (n floats), then
// W . (X * G / rms) = (W . (X * G)) / rms.
// A row is `group` threads (a power of two, at most WG), each summing every group-th unit;
// a workgroup takes WG / group rows at a time and strides over the rest, so the grid
// never needs more than 65535 workgroups. A thread multiplies each unit it dequantizes
// by TB tokens, so prefill reads and unpacks the weights once per TB tokens.

struct Params {
    rows: u32,          // rows of this piece of the matrix
    units: u32,         // 32-weight units a row (columns padded to 32)
    row_words: u32,     // words of W a row
    row_blocks: u32,    // entries of D a row (Q4_0 / Q8_0 scales), else 0
    ldx: u32,           // floats between tokens in X (a multiple of 32)
    x_off: u32,         // first float of token 0 in X (a multiple of 4)
    ldy: u32,           // floats between tokens in Y
    y_off: u32,         // column of row 0 in Y
    n_tok: u32,         // tokens
    group: u32,         // threads a row
    accumulate: u32,    // 1: Y += ..., 0: Y = ...
    row0: u32,          // embed: the first row of this piece
    norm: u32,          // 1: x = RMSNorm(X) * G over the first n floats of each token
    n: u32,
    eps: f32,
    scale: f32,         // each result times this (granite's residual and logit scales; embed: gemma's)
    softcap: f32,       // > 0: each result r -> softcap * tanh(r / softcap) (gemma2's logits)
}

@group(0) @binding(2) var<storage, read> X: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;
@group(0) @binding(4) var<uniform> P: Params;
@group(0) @binding(5) var<storage, read> IO: array<u32>;   // embed: [pos, token 0, token 1, ...]
@group(0) @binding(6) var<storage, read> G: array<vec4<f32>>; // the norm's weight (ones without a norm)

const WG: u32 = 64u;
const TB: u32 = 1u;
var<workgroup> red: array<f32, 512>;   // WG * TB partial sums (TB <= 8)
var<workgroup> inv_rms: array<f32, 8>;  // per token of the tile: 1 / rms (1 without a norm)

// inv_rms[j] for the tile's tokens: a workgroup-wide sum of squares per token.
fn tile_norms(lid: u32, t0: u32) {
    for (var j = 0u; j < TB; j++) {
        var ss = 0.0;
        let xb = (P.x_off + min(t0 + j, P.n_tok - 1u) * P.ldx) / 4u;
        for (var i = lid; i < P.n / 4u; i += WG) {
            ss += dot(X[xb + i], X[xb + i]);
        }
        red[j * WG + lid] = ss;
    }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            for (var j = 0u; j < TB; j++) {
                red[j * WG + lid] += red[j * WG + lid + s];
            }
        }
        workgroupBarrier();
    }
    if (lid < TB) {
        inv_rms[lid] = inverseSqrt(red[lid * WG] / f32(P.n) + P.eps);
    }
    workgroupBarrier();
}

@compute @workgroup_size(64)
fn matvec(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let per_wg = WG / P.group;
    let lane = lid % P.group;
    let r_in = lid / P.group;
    let t0 = wid.y * TB;
    if (P.norm != 0u) {
        tile_norms(lid, t0);
    } else if (lid < TB) {
        inv_rms[lid] = 1.0;
    }
    workgroupBarrier();
    for (var r0 = wid.x * per_wg; r0 < P.rows; r0 += nwg.x * per_wg) {
        let r = r0 + r_in;
        var acc: array<f32, TB>;
        if (r < P.rows) {
            for (var u = lane; u < P.units; u += P.group) {
                let w = dequant(r * P.row_words, r * P.row_blocks, u);
                for (var j = 0u; j < TB; j++) {
                    // past the last token: read the last one again (stores are guarded)
                    let xb = (P.x_off + min(t0 + j, P.n_tok - 1u) * P.ldx) / 4u + u * 8u;
                    var s = dot(w[0], X[xb] * G[u * 8u]);
                    for (var i = 1u; i < 8u; i++) {
                        s += dot(w[i], X[xb + i] * G[u * 8u + i]);
                    }
                    acc[j] += s;
                }
            }
        }
        for (var j = 0u; j < TB; j++) {
            red[j * WG + lid] = acc[j];
        }
        workgroupBarrier();
        for (var s = P.group / 2u; s > 0u; s >>= 1u) {
            if (lane < s) {
                for (var j = 0u; j < TB; j++) {
                    red[j * WG + lid] += red[j * WG + lid + s];
                }
            }
            workgroupBarrier();
        }
        if (lane == 0u && r < P.rows) {
            for (var j = 0u; j < TB; j++) {
                let t = t0 + j;
                if (t < P.n_tok) {
                    let o = t * P.ldy + P.y_off + r;
                    let prev = select(0.0, Y[o], P.accumulate != 0u);
                    var v = red[j * WG + lid] * inv_rms[j] * P.scale;
                    if (P.softcap > 0.0) {
                        v = P.softcap * tanh(v / P.softcap);
                    }
                    Y[o] = prev + v;
                }
            }
        }
        workgroupBarrier();
    }
}

// Y[t, :] = row IO[1 + t] of the matrix * scale, for the piece holding rows [row0, row0 + rows).
// Grid: (ceil(units / WG), tokens).
@compute @workgroup_size(64)
fn embed(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let u = wid.x * WG + lid;
    let t = wid.y;
    let token = IO[1u + t];
    if (u >= P.units || token < P.row0 || token >= P.row0 + P.rows) {
        return;
    }
    let r = token - P.row0;
    let w = dequant(r * P.row_words, r * P.row_blocks, u);
    for (var i = 0u; i < 8u; i++) {
        let o = t * P.ldy + u * 32u + 4u * i;
        Y[o] = w[i].x * P.scale;
        Y[o + 1u] = w[i].y * P.scale;
        Y[o + 2u] = w[i].z * P.scale;
        Y[o + 3u] = w[i].w * P.scale;
    }
}
