// lfm2's short convolution (ggml_ssm_conv) over a chunk of T tokens, one thread a channel:
// bx = b * x (the in-projection's first and last thirds, BCX = b | c | x), then
// y[t] = c[t] * sum_tap K[ch, tap] * seq[t + tap], where seq is the layer's last L - 1 inputs
// (zeros at position 0) followed by the chunk's bx; tap L - 1 is the current token. The
// state S keeps the last L - 1 inputs for the next chunk. Grid: (ceil(d / 64), 1).

struct Params {
    d: u32,
    taps: u32,          // L (at most 16)
    ld_in: u32,         // floats between tokens in BCX (3 d)
    ld_out: u32,
    n_tok: u32,
}

@group(0) @binding(0) var<storage, read> BCX: array<f32>;
@group(0) @binding(1) var<storage, read> K: array<f32>;           // (d, L)
@group(0) @binding(2) var<storage, read_write> S: array<f32>;     // (L - 1, d)
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;     // (T, ld_out)
@group(0) @binding(4) var<storage, read> IO: array<u32>;
@group(0) @binding(5) var<uniform> P: Params;

@compute @workgroup_size(64)
fn shortconv(@builtin(global_invocation_id) gid: vec3<u32>) {
    let ch = gid.x;
    if (ch >= P.d) {
        return;
    }
    let n = P.taps - 1u;
    let fresh = IO[0] == 0u;            // position 0: nothing before it
    var win: array<f32, 16>;            // the last n inputs, oldest first
    for (var i = 0u; i < n; i++) {
        win[i] = select(S[i * P.d + ch], 0.0, fresh);
    }
    for (var t = 0u; t < P.n_tok; t++) {
        let row = t * P.ld_in;
        let bx = BCX[row + ch] * BCX[row + 2u * P.d + ch];
        var acc = K[ch * P.taps + n] * bx;
        for (var tap = 0u; tap < n; tap++) {
            acc += K[ch * P.taps + tap] * win[tap];
        }
        Y[t * P.ld_out + ch] = BCX[row + P.d + ch] * acc;
        for (var i = 0u; i + 1u < n; i++) {
            win[i] = win[i + 1u];
        }
        if (n > 0u) {
            win[n - 1u] = bx;
        }
    }
    for (var i = 0u; i < n; i++) {
        S[i * P.d + ch] = win[i];
    }
}
