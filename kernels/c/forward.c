/* The whole decoder forward pass of a token batch, in C (decode = batch of 1).
 *
 * Written once for every architecture ember runs (llama, qwen2/3, phi3, gemma2/3,
 * smollm3, granite, olmo2, lfm2); they differ in switches (ember_hparams) and in
 * per-layer settings (kind, rope table), never in a copy of this pass:
 *
 *   x = token_embd[tokens] * embd_scale                              (B, E)
 *   per layer:
 *     h = pre_norms ? rmsnorm(x) : x
 *     attention layer (EMBER_LAYER_ATTN / _SWA):
 *       qkv = h @ [Wq|Wk|Wv] (+ b)                                   (B, Q + 2 KV)
 *       q, k = rmsnorm per head or over the whole q / k (qk_norm)
 *       rope(q, k) with the layer's table (none, global or swa base)
 *       cache[pos % rows] = f16(k), f16(v)      (a ring when the layer has a window)
 *       o = softmax(softcap(scale q.K), window mask) V @ Wo
 *     conv layer (lfm2): b | c | u = h @ Win;  in[pos] = b * u
 *       o = (c * sum_k w[k] in[pos - l_cache + 1 + k]) @ Wout
 *       (in: the layer's state, its last l_cache - 1 inputs, then the chunk's)
 *     x += residual_scale * (post_norms ? rmsnorm(o) : o)
 *     h = pre_norms ? rmsnorm(x) : x
 *     o = (act(h @ Wgate) * (h @ Wup)) @ Wdown       (act: silu or ggml's gelu)
 *     x += residual_scale * (post_norms ? rmsnorm(o) : o)
 *   logits = softcap(rmsnorm(x) @ output / logit_scale)
 *
 * Memory: weights are pointers into the read-only GGUF map (never copied); the
 * f16 KV caches, the conv states and every scratch buffer are allocated once in
 * ember_model_finish, sized for max_batch tokens, so a forward call allocates
 * nothing. Longer prompts run in max_batch chunks. A sliding-window layer keeps a
 * ring of window + max_batch - 1 rows: a chunk writes all its rows before any of
 * its tokens reads, and the oldest row a token of the chunk reads is never one the
 * chunk overwrites. A conv layer keeps only its last l_cache - 1 inputs (f32, as
 * llama.cpp's r_l state); a chunk computes from that state and its own inputs in
 * a shared window, then leaves its last inputs as the state. Either way chunks
 * compute exactly what one batch does.
 *
 * Threads: one pool run per chunk; every thread walks the same sequence of
 * stages. Work inside a stage (matrix rows, (token, head) pairs, token rows)
 * is handed out in chunks from an atomic counter, and a stage ends when all
 * its items are FINISHED (a second counter), not when all threads arrive: on
 * a busy machine a preempted thread's share is taken by the others and nobody
 * waits for it (a barrier per op would cost a scheduler slice per op). Each
 * stage uses the next counter pair of a per-run array (all threads count
 * stages identically), zeroed before the run once the previous run's
 * stragglers have left (ember_pool_wait): no reset races.
 */
#define _POSIX_C_SOURCE 200112L  /* posix_memalign */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ember_kernels.h"
#include "ember_ops.h"
#include "ember_forward.h"

#define MAX_STAGES_PER_LAYER 32  /* a layer takes <= 16: see attention_block, ffn_block */
#define ACT_ALIGN 64

/* ---- the model ------------------------------------------------------------------ */

/* one stage's work: items claimed and items finished, on separate cache lines */
typedef struct {
    _Atomic int64_t claim;
    char pad0[64 - sizeof(int64_t)];
    _Atomic int64_t done;
    char pad1[64 - sizeof(int64_t)];
} stage_ctr;

typedef struct {
    ember_mat m[EMBER_N_MATS];
    const float *v[EMBER_N_VECS];
    int kind;                         /* EMBER_LAYER_* */
    const float *rope_cs;             /* (n_ctx, rope_dim/2, 2) or NULL: no rope */
    int64_t rows;                     /* cache rows; position p lives in row p % rows */
    uint16_t *kc, *vc;                /* attention: (rows, kv_dim) f16 */
    float *conv;                      /* conv: (l_cache - 1, E) inputs b * u of the last positions */
} layer_t;

struct ember_model {
    ember_hparams hp;
    int64_t q_dim, kv_dim, qkv_dim;   /* n_head*hd, n_head_kv*hd, q_dim + 2 kv_dim */
    layer_t *layers;                  /* (n_layer) */
    layer_t top;                      /* token_embd, output, output_norm (layer -1) */
    const float *rope_cs, *rope_cs_swa;  /* (n_ctx, rope_dim/2, 2) cos, sin; caller-owned */
    const ember_ops *ops;
    ember_pool *pool;
    /* scratch, (max_batch, ...) */
    float *x;                         /* (B, E) residual stream */
    float *xn;                        /* (B, E) normed input / block output */
    float *qkv;                       /* (B, qkv_dim) */
    float *att;                       /* (B, q_dim) attention output */
    float *ffn;                       /* (B, 2 F) gate | up; act(gate)*up into gate */
    float *bcx;                       /* (B, 3 E) conv layers' b | c | u; c * conv into c */
    float *conv_win;                  /* (l_cache - 1 + B, E) a conv layer's state, then the chunk's inputs */
    uint8_t *xq;                      /* (B, xq_stride) quantized activations */
    size_t xq_stride;
    float *scores;                    /* (n_threads, EMBER_ATT_HEADS * n_ctx) */
    float *last;                      /* (E) normed last row for the logits */
    stage_ctr *stages;                /* (n_stages) work counters of one run */
    int64_t n_stages;
    /* the current chunk */
    const int32_t *tokens;
    int64_t n_tok, pos0;
    float *logits;                    /* (n_tok, n_vocab) if all_logits, else (n_vocab) or NULL */
    int all_logits;
};

/* ---- helpers ---------------------------------------------------------------------- */

static void *zalloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, ACT_ALIGN, n ? n : ACT_ALIGN) != 0) return NULL;
    memset(p, 0, n);
    return p;
}

static size_t act_bytes(const ember_mat *w) {
    return w->data ? ember_act_row_bytes(w->type, w->cols) : 0;
}

/* the widest quantized activation row any matrix of the model needs */
static size_t max_act_bytes(const ember_model *m) {
    size_t mx = act_bytes(&m->top.m[EMBER_M_OUTPUT]);
    for (int64_t l = 0; l < m->hp.n_layer; l++)
        for (int i = 0; i < EMBER_N_MATS; i++) {
            size_t b = act_bytes(&m->layers[l].m[i]);
            mx = b > mx ? b : mx;
        }
    return (mx + ACT_ALIGN - 1) / ACT_ALIGN * ACT_ALIGN;
}

/* ---- work distribution -------------------------------------------------------------- */

typedef struct {
    ember_model *m;
    int ith, nth;
    int64_t stage;        /* index of the next stage's counter */
} worker;

/* next chunk [*i0, *i1) of n items; 0 when the stage's items are exhausted */
static int next_chunk(worker *w, int64_t stage, int64_t n, int64_t chunk, int64_t *i0, int64_t *i1) {
    const int64_t c = atomic_fetch_add_explicit(&w->m->stages[stage].claim, chunk, memory_order_relaxed);
    if (c >= n) return 0;
    *i0 = c;
    *i1 = c + chunk < n ? c + chunk : n;
    return 1;
}

/* Guided variant for batches: each claim takes a share of what is left
 * (remaining / (2 nth), at least `min` items), so chunks shrink toward the
 * stage's end and threads finish it nearly together. With equal chunks the
 * first thread done idled for up to a whole chunk (4% of a prompt spun in
 * stage_wait); small chunks throughout would repeat the per-chunk activation
 * packing of the matmul kernels more often. */
static int next_chunk_guided(worker *w, int64_t stage, int64_t n, int64_t min, int64_t *i0, int64_t *i1) {
    _Atomic int64_t *claim = &w->m->stages[stage].claim;
    int64_t c = atomic_load_explicit(claim, memory_order_relaxed);
    for (;;) {
        if (c >= n) return 0;
        int64_t size = (n - c) / (2 * (int64_t)w->nth);
        size = size < min ? min : (size + 15) / 16 * 16;
        if (atomic_compare_exchange_weak_explicit(claim, &c, c + size, memory_order_relaxed, memory_order_relaxed)) {
            *i0 = c;
            *i1 = c + size < n ? c + size : n;
            return 1;
        }
    }
}

static int64_t take_stage(worker *w) { return w->stage++; }

/* record items [i0, i1) of a stage as finished (their results visible to acquirers) */
static void chunk_done(worker *w, int64_t stage, int64_t i0, int64_t i1) {
    atomic_fetch_add_explicit(&w->m->stages[stage].done, i1 - i0, memory_order_release);
}

/* Wait until all n items of the stage are finished. This replaces a barrier: a thread
 * waits for the WORK, not for the other threads, so a thread the OS has descheduled
 * between stages holds nobody up — its share is claimed by the others, and when it
 * runs again it finds every chunk taken and falls through to the current stage. */
static void stage_wait(worker *w, int64_t stage, int64_t n) {
    _Atomic int64_t *done = &w->m->stages[stage].done;
    for (int i = 1; atomic_load_explicit(done, memory_order_acquire) < n; i++) {
        ember_cpu_relax();
        if ((i & 4095) == 0) sched_yield();
    }
}

/* ---- stages ----------------------------------------------------------------------------- */

/* a (B, n) row-wise stage: fn(m, b) for every token row b */
typedef void (*row_fn)(ember_model *m, const void *arg, int64_t b);

static void for_rows(worker *w, int64_t nb, row_fn fn, const void *arg) {
    const int64_t st = take_stage(w);
    int64_t b0, b1;
    while (next_chunk(w, st, nb, 1, &b0, &b1)) {
        fn(w->m, arg, b0);
        chunk_done(w, st, b0, b1);
    }
    stage_wait(w, st, nb);
}

/* quantize rows of src (B, ld) for wtype into xq, one row per token */
typedef struct { int wtype; const float *src; int64_t ld, n; } quant_arg;

static void quant_row(ember_model *m, const void *arg, int64_t b) {
    const quant_arg *q = arg;
    ember_quantize_act(q->wtype, q->src + b * q->ld, m->xq + (size_t)b * m->xq_stride, q->n);
}

/* Y (B, ldy) at column offset = W @ xq for every matrix of a group sharing one input.
 * The group's rows are one work space, so threads balance across matrices. */
typedef struct { const ember_mat *w; float *y; } mm_target;

static void matmul_rows(ember_model *m, const mm_target *t, int64_t nb, int64_t ldy, int64_t r0, int64_t r1) {
    const ember_mat *w = t->w;
    if (nb == 1)
        ember_matvec(w->type, w->data, w->row_bytes, m->xq, t->y + r0, w->cols, r0, r1);
    else
        ember_matmul(w->type, w->data, w->row_bytes, m->xq, m->xq_stride, t->y, ldy,
                     w->cols, nb, r0, r1);
}

static int64_t row_chunk(int64_t rows, int nth) {
    /* decode: ~8 chunks per thread balance preemption; never below 16 rows (one
     * chunk of work must dwarf its atomic add). Batches claim guided chunks. */
    int64_t c = rows / ((int64_t)nth * 8);
    c = (c + 15) / 16 * 16;
    return c < 16 ? 16 : c;
}

static void matmul_group(worker *w, int64_t nb, const mm_target *t, int n_t, int64_t ldy) {
    const int64_t st = take_stage(w);
    int64_t total = 0, chunk = 0;
    for (int i = 0; i < n_t; i++) total += t[i].w->rows;
    chunk = row_chunk(total, w->nth);
    int64_t g0, g1;
    while (nb > 1 ? next_chunk_guided(w, st, total, 32, &g0, &g1) : next_chunk(w, st, total, chunk, &g0, &g1)) {
        const int64_t c0 = g0, c1 = g1;
        int64_t base = 0;  /* split the global range over the matrices it spans */
        for (int i = 0; i < n_t && g0 < g1; i++) {
            const int64_t rows = t[i].w->rows;
            if (g0 < base + rows) {
                const int64_t r0 = g0 - base, r1 = (g1 < base + rows ? g1 : base + rows) - base;
                matmul_rows(w->m, &t[i], nb, ldy, r0, r1);
                g0 = base + r1;
            }
            base += rows;
        }
        chunk_done(w, st, c0, c1);
    }
    stage_wait(w, st, total);
}

/* a row op fused in front of the first quantization (it produces the row quantized) */
typedef struct { row_fn prep; const void *prep_arg; quant_arg q; } prep_quant_arg;

static void prep_quant_row(ember_model *m, const void *arg, int64_t b) {
    const prep_quant_arg *a = arg;
    if (a->prep) a->prep(m, a->prep_arg, b);
    quant_row(m, &a->q, b);
}

/* prep(b) for every row (may be NULL), then quantize src once per activation format,
 * then every matrix of that format. Fusing prep saves a stage: the thread that
 * normalizes a row quantizes it, so no other thread needs to wait in between. */
static void project(worker *w, row_fn prep, const void *prep_arg, const float *src, int64_t ld,
                    int64_t nb, const mm_target *t, int n_t, int64_t ldy) {
    int done = 0;  /* bitmask of targets computed */
    for (int i = 0; i < n_t; i++) {
        if (done & (1 << i)) continue;
        const int act = ember_act_type(t[i].w->type);
        prep_quant_arg qa = { i == 0 ? prep : NULL, prep_arg, { t[i].w->type, src, ld, t[i].w->cols } };
        for_rows(w, nb, prep_quant_row, &qa);
        mm_target same[4];
        int n_same = 0;
        for (int j = i; j < n_t; j++)
            if (!(done & (1 << j)) && ember_act_type(t[j].w->type) == act) {
                same[n_same++] = t[j];
                done |= 1 << j;
            }
        matmul_group(w, nb, same, n_same, ldy);
    }
}

/* ---- the residual stream ------------------------------------------------------------------ */

static void scale_row(float *y, int64_t n, float s) {
    if (s != 1.0f)
        for (int64_t i = 0; i < n; i++) y[i] *= s;
}

static void embed_row(ember_model *m, const void *arg, int64_t b) {
    (void)arg;
    const ember_mat *e = &m->top.m[EMBER_M_TOK_EMBD];
    float *x = m->x + b * m->hp.n_embd;
    ember_get_rows(e->type, e->data, e->row_bytes, m->tokens + b, 1, x, m->hp.n_embd);
    scale_row(x, m->hp.n_embd, m->hp.embd_scale);
}

/* The previous block's output (in xn) joins the stream, then the next block's input:
 * x += residual_scale * post_norm(xn); xn = pre_norm(x) (with no pre-norms the next
 * block reads x itself). */
typedef struct {
    const float *post;   /* the previous block's output norm, or NULL */
    const float *pre;    /* this block's input norm, or NULL */
    int add;             /* 0 before the first block: xn holds nothing yet */
} norm_arg;

static void residual_add_row(ember_model *m, const float *post, int64_t b) {
    const int64_t E = m->hp.n_embd;
    float *o = m->xn + b * E;
    if (post) m->ops->rmsnorm(o, post, o, E, m->hp.rms_eps);
    scale_row(o, E, m->hp.residual_scale);
    m->ops->add(m->x + b * E, o, E);
}

static void residual_norm_row(ember_model *m, const void *arg, int64_t b) {
    const norm_arg *a = arg;
    const int64_t E = m->hp.n_embd;
    if (a->add) residual_add_row(m, a->post, b);
    if (a->pre) m->ops->rmsnorm(m->x + b * E, a->pre, m->xn + b * E, E, m->hp.rms_eps);
}

/* the block input the projections read: the normed copy, or x itself (olmo2) */
static const float *block_input(const ember_model *m) { return m->hp.pre_norms ? m->xn : m->x; }

/* the norms around block `l`'s first half: the previous layer's FFN output norm */
static norm_arg attn_norms(const ember_model *m, int64_t l) {
    const float *post = l > 0 ? m->layers[l - 1].v[EMBER_V_POST_FFN_NORM] : NULL;
    return (norm_arg){ post, m->layers[l].v[EMBER_V_ATTN_NORM], l > 0 };
}

/* ---- the attention block ------------------------------------------------------------------- */

static void qk_norm(const ember_model *m, const layer_t *L, float *q, float *k) {
    const ember_hparams *hp = &m->hp;
    const float *wq = L->v[EMBER_V_Q_NORM], *wk = L->v[EMBER_V_K_NORM];
    if (hp->qk_norm == EMBER_QK_NORM_FULL) {   /* olmo2: one RMS over the whole projection */
        m->ops->rmsnorm(q, wq, q, m->q_dim, hp->rms_eps);
        m->ops->rmsnorm(k, wk, k, m->kv_dim, hp->rms_eps);
    } else if (hp->qk_norm == EMBER_QK_NORM_HEAD) {
        for (int64_t h = 0; h < hp->n_head; h++)
            m->ops->rmsnorm(q + h * hp->head_dim, wq, q + h * hp->head_dim, hp->head_dim, hp->rms_eps);
        for (int64_t h = 0; h < hp->n_head_kv; h++)
            m->ops->rmsnorm(k + h * hp->head_dim, wk, k + h * hp->head_dim, hp->head_dim, hp->rms_eps);
    }
}

/* biases, q/k norms, rope, and the K/V cache write for one token */
static void qkv_post_row(ember_model *m, const void *arg, int64_t b) {
    const layer_t *L = arg;
    const ember_hparams *hp = &m->hp;
    const ember_ops *ops = m->ops;
    float *q = m->qkv + b * m->qkv_dim, *k = q + m->q_dim, *v = k + m->kv_dim;
    if (L->v[EMBER_V_BQ]) ops->add(q, L->v[EMBER_V_BQ], m->q_dim);
    if (L->v[EMBER_V_BK]) ops->add(k, L->v[EMBER_V_BK], m->kv_dim);
    if (L->v[EMBER_V_BV]) ops->add(v, L->v[EMBER_V_BV], m->kv_dim);
    qk_norm(m, L, q, k);
    const int64_t pos = m->pos0 + b;
    if (L->rope_cs) {
        const float *cs = L->rope_cs + pos * hp->rope_dim;  /* rope_dim/2 (cos, sin) pairs */
        ops->rope(q, hp->n_head, hp->head_dim, hp->rope_dim, cs, hp->neox);
        ops->rope(k, hp->n_head_kv, hp->head_dim, hp->rope_dim, cs, hp->neox);
    }
    const size_t off = (size_t)(pos % L->rows) * m->kv_dim;
    ops->to_f16(k, L->kc + off, m->kv_dim);
    ops->to_f16(v, L->vc + off, m->kv_dim);
}

static void attend(worker *w, const layer_t *L) {
    ember_model *m = w->m;
    const ember_hparams *hp = &m->hp;
    const int64_t st = take_stage(w), n_items = m->n_tok * hp->n_head;
    float *scores = m->scores + (int64_t)w->ith * EMBER_ATT_HEADS * hp->n_ctx;
    const ember_att_args a = {
        .q = m->qkv, .ldq = m->qkv_dim, .K = L->kc, .V = L->vc, .kv_stride = m->kv_dim,
        .rows = L->rows, .window = L->kind == EMBER_LAYER_SWA ? hp->sliding_window : 0,
        .pos0 = m->pos0, .n_head = hp->n_head, .n_head_kv = hp->n_head_kv, .hd = hp->head_dim,
        .scale = hp->attn_scale, .softcap = hp->attn_softcap, .out = m->att, .ldo = m->q_dim };
    /* a chunk is one run of query heads sharing a KV head, which the kernel takes
     * together; items are (token, head), so chunks never straddle tokens */
    const int64_t chunk = ember_att_run(hp->n_head, hp->n_head_kv);
    int64_t i0, i1;
    while (next_chunk(w, st, n_items, chunk, &i0, &i1)) {
        m->ops->attention(&a, scores, i0, i1);
        chunk_done(w, st, i0, i1);
    }
    stage_wait(w, st, n_items);
}

static void attention_block(worker *w, int64_t l) {
    ember_model *m = w->m;
    const layer_t *L = &m->layers[l];
    norm_arg na = attn_norms(m, l);
    if (m->hp.fused_qkv) {
        mm_target t[1] = { { &L->m[EMBER_M_QKV], m->qkv } };
        project(w, residual_norm_row, &na, block_input(m), m->hp.n_embd, m->n_tok, t, 1, m->qkv_dim);
    } else {
        mm_target t[3] = { { &L->m[EMBER_M_Q], m->qkv }, { &L->m[EMBER_M_K], m->qkv + m->q_dim },
                           { &L->m[EMBER_M_V], m->qkv + m->q_dim + m->kv_dim } };
        project(w, residual_norm_row, &na, block_input(m), m->hp.n_embd, m->n_tok, t, 3, m->qkv_dim);
    }
    for_rows(w, m->n_tok, qkv_post_row, L);
    attend(w, L);
    mm_target o[1] = { { &L->m[EMBER_M_O], m->xn } };
    project(w, NULL, NULL, m->att, m->q_dim, m->n_tok, o, 1, m->hp.n_embd);
}

/* ---- the short-convolution block (lfm2) ------------------------------------------------------ */

/* Window row j holds the conv input of position pos0 - (l_cache - 1) + j: the layer's
 * state for j < l_cache - 1 (zeros before position 0: a sequence starts from a zero
 * state, whatever the previous one left), then b * u of each token of the chunk. */
static void conv_in_item(ember_model *m, const void *arg, int64_t j) {
    const layer_t *L = arg;
    const int64_t E = m->hp.n_embd, ns = m->hp.conv_l_cache - 1;
    float *win = m->conv_win + j * E;
    if (j < ns) {
        if (m->pos0 - ns + j < 0)
            memset(win, 0, (size_t)E * sizeof(float));
        else
            memcpy(win, L->conv + j * E, (size_t)E * sizeof(float));
        return;
    }
    const float *bcu = m->bcx + (j - ns) * 3 * E;   /* b | c | u */
    for (int64_t c = 0; c < E; c++) win[c] = bcu[c] * bcu[2 * E + c];
}

/* Items b < n_tok: c = c * (depthwise causal conv over the token's input and the
 * l_cache - 1 before it), in place; taps summed oldest first, as ggml_ssm_conv does.
 * Items after them: the chunk's last l_cache - 1 inputs become the state (nothing in
 * this stage reads the state, so the two share it). */
static void conv_out_item(ember_model *m, const void *arg, int64_t j) {
    const layer_t *L = arg;
    const int64_t E = m->hp.n_embd, nk = m->hp.conv_l_cache;
    if (j >= m->n_tok) {
        const int64_t i = j - m->n_tok;
        memcpy(L->conv + i * E, m->conv_win + (m->n_tok + i) * E, (size_t)E * sizeof(float));
        return;
    }
    const float *w = L->v[EMBER_V_CONV];       /* (E, nk) */
    const float *in = m->conv_win + j * E;     /* tap k reads row j + k */
    float *c = m->bcx + j * 3 * E + E;
    for (int64_t i = 0; i < E; i++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < nk; k++) acc += w[i * nk + k] * in[k * E + i];
        c[i] *= acc;
    }
}

static void conv_block(worker *w, int64_t l) {
    ember_model *m = w->m;
    const layer_t *L = &m->layers[l];
    const int64_t E = m->hp.n_embd;
    norm_arg na = attn_norms(m, l);
    mm_target t[1] = { { &L->m[EMBER_M_CONV_IN], m->bcx } };
    project(w, residual_norm_row, &na, block_input(m), E, m->n_tok, t, 1, 3 * E);
    const int64_t ns = m->hp.conv_l_cache - 1;
    for_rows(w, ns + m->n_tok, conv_in_item, L);   /* the whole window before any reads */
    for_rows(w, m->n_tok + ns, conv_out_item, L);
    mm_target o[1] = { { &L->m[EMBER_M_CONV_OUT], m->xn } };
    project(w, NULL, NULL, m->bcx + E, 3 * E, m->n_tok, o, 1, E);
}

/* ---- the feed-forward block --------------------------------------------------------------------- */

static void gated_act_row(ember_model *m, const void *arg, int64_t b) {
    (void)arg;
    float *g = m->ffn + b * 2 * m->hp.n_ff;
    if (m->hp.act == EMBER_ACT_GELU)
        m->ops->geglu(g, g + m->hp.n_ff, g, m->hp.n_ff);
    else
        m->ops->swiglu(g, g + m->hp.n_ff, g, m->hp.n_ff);
}

static void ffn_block(worker *w, int64_t l) {
    ember_model *m = w->m;
    const layer_t *L = &m->layers[l];
    const int64_t F = m->hp.n_ff;
    norm_arg na = { L->v[EMBER_V_POST_ATTN_NORM], L->v[EMBER_V_FFN_NORM], 1 };
    if (m->hp.fused_gate_up) {  /* phi3: ffn_up holds gate | up */
        mm_target t[1] = { { &L->m[EMBER_M_GATE_UP], m->ffn } };
        project(w, residual_norm_row, &na, block_input(m), m->hp.n_embd, m->n_tok, t, 1, 2 * F);
    } else {
        mm_target t[2] = { { &L->m[EMBER_M_GATE], m->ffn }, { &L->m[EMBER_M_UP], m->ffn + F } };
        project(w, residual_norm_row, &na, block_input(m), m->hp.n_embd, m->n_tok, t, 2, 2 * F);
    }
    mm_target d[1] = { { &L->m[EMBER_M_DOWN], m->xn } };
    project(w, gated_act_row, NULL, m->ffn, 2 * F, m->n_tok, d, 1, m->hp.n_embd);
}

/* ---- logits --------------------------------------------------------------------------------------- */

static void final_norm_row(ember_model *m, const void *arg, int64_t b) {
    (void)arg;
    const int64_t E = m->hp.n_embd;
    residual_add_row(m, m->layers[m->hp.n_layer - 1].v[EMBER_V_POST_FFN_NORM], b);
    float *dst = m->all_logits ? m->xn + b * E : m->last;
    if (m->all_logits || b == m->n_tok - 1)
        m->ops->rmsnorm(m->x + b * E, m->top.v[EMBER_V_OUTPUT_NORM], dst, E, m->hp.rms_eps);
}

/* granite's logit scale, then gemma2's final soft cap */
static void logits_post_row(ember_model *m, const void *arg, int64_t b) {
    (void)arg;
    const int64_t V = m->hp.n_vocab;
    float *y = m->logits + b * V;
    scale_row(y, V, 1.0f / m->hp.logit_scale);
    ember_softcap(y, V, m->hp.final_softcap);
}

static void logits_stage(worker *w) {
    ember_model *m = w->m;
    for_rows(w, m->n_tok, final_norm_row, NULL);
    if (!m->logits) return;
    mm_target t[1] = { { &m->top.m[EMBER_M_OUTPUT], m->logits } };
    const int64_t n_rows = m->all_logits ? m->n_tok : 1;
    if (m->all_logits)
        project(w, NULL, NULL, m->xn, m->hp.n_embd, m->n_tok, t, 1, m->hp.n_vocab);
    else  /* only the last token's row, as a batch of 1 */
        project(w, NULL, NULL, m->last, m->hp.n_embd, 1, t, 1, m->hp.n_vocab);
    if (m->hp.logit_scale != 1.0f || m->hp.final_softcap > 0.0f)
        for_rows(w, n_rows, logits_post_row, NULL);
}

/* ---- the pass ----------------------------------------------------------------------------------------- */

static void forward_worker(void *ctx, int ith, int nth) {
    worker w = { ctx, ith, nth, 0 };
    for_rows(&w, w.m->n_tok, embed_row, NULL);
    for (int64_t l = 0; l < w.m->hp.n_layer; l++) {
        if (w.m->layers[l].kind == EMBER_LAYER_CONV)
            conv_block(&w, l);
        else
            attention_block(&w, l);
        ffn_block(&w, l);
    }
    logits_stage(&w);
}

static void run_chunk(ember_model *m, const int32_t *tokens, int64_t n, int64_t pos0, float *logits, int all) {
    /* A late worker may still be walking the previous run's stages, reading n_tok,
     * logits and the stage counters as it goes: wait for it BEFORE changing any of
     * them (setting n_tok first left it waiting for more items than that run had). */
    ember_pool_wait(m->pool);
    m->tokens = tokens;
    m->n_tok = n;
    m->pos0 = pos0;
    m->logits = logits;
    m->all_logits = all;
    for (int64_t i = 0; i < m->n_stages; i++) {
        atomic_store_explicit(&m->stages[i].claim, 0, memory_order_relaxed);
        atomic_store_explicit(&m->stages[i].done, 0, memory_order_relaxed);
    }
    ember_pool_run(m->pool, forward_worker, m);
}

void ember_forward(ember_model *m, const int32_t *tokens, int64_t n, int64_t pos0, float *logits, int all_logits) {
    const int64_t B = m->hp.max_batch;
    for (int64_t c0 = 0; c0 < n; c0 += B) {
        const int64_t nc = n - c0 < B ? n - c0 : B, last = c0 + nc == n;
        float *out = all_logits ? logits + c0 * m->hp.n_vocab : (last ? logits : NULL);
        run_chunk(m, tokens + c0, nc, pos0 + c0, out, all_logits);
    }
}

/* ---- building a model ------------------------------------------------------------------------------------ */

ember_model *ember_model_new(const ember_hparams *hp, const float *rope_cs, const float *rope_cs_swa,
                             int n_threads, const char *isa) {
    ember_model *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->hp = *hp;
    m->q_dim = hp->n_head * hp->head_dim;
    m->kv_dim = hp->n_head_kv * hp->head_dim;
    m->qkv_dim = m->q_dim + 2 * m->kv_dim;
    m->rope_cs = rope_cs;
    m->rope_cs_swa = rope_cs_swa ? rope_cs_swa : rope_cs;
    m->ops = ember_ops_for(isa ? isa : ember_isa_name());
    m->layers = calloc((size_t)hp->n_layer, sizeof(layer_t));
    m->pool = ember_pool_new(n_threads);
    m->n_stages = (hp->n_layer + 1) * MAX_STAGES_PER_LAYER;
    m->stages = zalloc((size_t)m->n_stages * sizeof(stage_ctr));
    if (!m->layers || !m->pool || !m->stages) {
        ember_model_free(m);
        return NULL;
    }
    for (int64_t l = 0; l < hp->n_layer; l++) {
        m->layers[l].kind = EMBER_LAYER_ATTN;
        m->layers[l].rope_cs = rope_cs;
    }
    if (hp->act == EMBER_ACT_GELU) ember_gelu_init();
    return m;
}

int ember_model_set_layer(ember_model *m, int64_t layer, int kind, int rope) {
    if (layer < 0 || layer >= m->hp.n_layer || kind < EMBER_LAYER_ATTN || kind > EMBER_LAYER_CONV
        || rope < EMBER_ROPE_NONE || rope > EMBER_ROPE_SWA)
        return -1;
    if ((kind == EMBER_LAYER_SWA && m->hp.sliding_window <= 0)
        || (kind == EMBER_LAYER_CONV && (m->hp.conv_l_cache < 1 || m->hp.conv_l_cache > EMBER_CONV_MAX_TAPS)))
        return -1;
    layer_t *L = &m->layers[layer];
    L->kind = kind;
    L->rope_cs = rope == EMBER_ROPE_NONE ? NULL : rope == EMBER_ROPE_SWA ? m->rope_cs_swa : m->rope_cs;
    return 0;
}

int64_t ember_model_cache_rows(const ember_model *m, int64_t layer) {
    const ember_hparams *hp = &m->hp;
    if (layer < 0 || layer >= hp->n_layer) return -1;
    int64_t need = hp->n_ctx;   /* the rows a chunk's oldest token reads back + the chunk */
    if (m->layers[layer].kind == EMBER_LAYER_SWA) need = hp->sliding_window - 1 + hp->max_batch;
    if (m->layers[layer].kind == EMBER_LAYER_CONV) return hp->conv_l_cache - 1;   /* the state */
    return need < hp->n_ctx ? need : hp->n_ctx;
}

size_t ember_model_cache_row_bytes(const ember_model *m, int64_t layer) {
    if (layer < 0 || layer >= m->hp.n_layer) return 0;
    return m->layers[layer].kind == EMBER_LAYER_CONV ? (size_t)m->hp.n_embd * sizeof(float)
                                                     : 2 * (size_t)m->kv_dim * sizeof(uint16_t);
}

int ember_model_cache_copy(ember_model *m, int64_t layer, int64_t rows, void *buf, int to_cache) {
    if (layer < 0 || layer >= m->hp.n_layer || rows < 0 || rows > m->layers[layer].rows) return -1;
    const layer_t *L = &m->layers[layer];
    if (L->kind == EMBER_LAYER_CONV) {
        const size_t n = (size_t)rows * m->hp.n_embd * sizeof(float);
        if (to_cache) memcpy(L->conv, buf, n); else memcpy(buf, L->conv, n);
        return 0;
    }
    const size_t n = (size_t)rows * m->kv_dim * sizeof(uint16_t);   /* K, then V */
    uint8_t *b = (uint8_t *)buf;
    if (to_cache) { memcpy(L->kc, b, n); memcpy(L->vc, b + n, n); }
    else          { memcpy(b, L->kc, n); memcpy(b + n, L->vc, n); }
    return 0;
}

int ember_model_set_mat(ember_model *m, int64_t layer, int which, const void *data, int type,
                        int64_t rows, int64_t cols, size_t row_bytes) {
    if (which < 0 || which >= EMBER_N_MATS || layer < -1 || layer >= m->hp.n_layer) return -1;
    if (ember_act_type(type) < 0) return -2;
    layer_t *L = layer < 0 ? &m->top : &m->layers[layer];
    L->m[which] = (ember_mat){ data, type, rows, cols, row_bytes };
    return 0;
}

int ember_model_set_vec(ember_model *m, int64_t layer, int which, const float *data) {
    if (which < 0 || which >= EMBER_N_VECS || layer < -1 || layer >= m->hp.n_layer) return -1;
    (layer < 0 ? &m->top : &m->layers[layer])->v[which] = data;
    return 0;
}

static int alloc_caches(ember_model *m) {
    for (int64_t l = 0; l < m->hp.n_layer; l++) {
        layer_t *L = &m->layers[l];
        L->rows = ember_model_cache_rows(m, l);
        if (L->kind == EMBER_LAYER_CONV) {
            if (!(L->conv = zalloc((size_t)L->rows * m->hp.n_embd * sizeof(float)))) return -1;
        } else {
            L->kc = zalloc((size_t)L->rows * m->kv_dim * sizeof(uint16_t));
            L->vc = zalloc((size_t)L->rows * m->kv_dim * sizeof(uint16_t));
            if (!L->kc || !L->vc) return -1;
        }
    }
    return 0;
}

static int has_conv(const ember_model *m) {
    for (int64_t l = 0; l < m->hp.n_layer; l++)
        if (m->layers[l].kind == EMBER_LAYER_CONV) return 1;
    return 0;
}

/* after every weight and layer kind is set: the caches, and the scratch sized by the
 * widest activation row */
int ember_model_finish(ember_model *m) {
    const ember_hparams *hp = &m->hp;
    const int64_t B = hp->max_batch, E = hp->n_embd;
    if (alloc_caches(m) != 0) return -1;
    m->xq_stride = max_act_bytes(m);
    m->x = zalloc((size_t)B * E * sizeof(float));
    m->xn = zalloc((size_t)B * E * sizeof(float));
    m->qkv = zalloc((size_t)B * m->qkv_dim * sizeof(float));
    m->att = zalloc((size_t)B * m->q_dim * sizeof(float));
    m->ffn = zalloc((size_t)B * 2 * hp->n_ff * sizeof(float));
    m->bcx = has_conv(m) ? zalloc((size_t)B * 3 * E * sizeof(float)) : NULL;
    m->conv_win = has_conv(m) ? zalloc((size_t)(hp->conv_l_cache - 1 + B) * E * sizeof(float)) : NULL;
    m->xq = zalloc((size_t)B * m->xq_stride);
    m->scores = zalloc((size_t)ember_pool_size(m->pool) * EMBER_ATT_HEADS * hp->n_ctx * sizeof(float));
    m->last = zalloc((size_t)E * sizeof(float));
    return (m->x && m->xn && m->qkv && m->att && m->ffn && m->xq && m->scores && m->last
            && ((m->bcx && m->conv_win) || !has_conv(m))) ? 0 : -1;
}

size_t ember_model_scratch_bytes(const ember_model *m) {
    const ember_hparams *hp = &m->hp;
    const size_t B = (size_t)hp->max_batch;
    return B * sizeof(float) * (2 * hp->n_embd + m->qkv_dim + m->q_dim + 2 * hp->n_ff
                                + (has_conv(m) ? 4 * hp->n_embd : 0))
         + (has_conv(m) ? (size_t)(hp->conv_l_cache - 1) * hp->n_embd * sizeof(float) : 0)
         + B * m->xq_stride + (size_t)ember_pool_size(m->pool) * EMBER_ATT_HEADS * hp->n_ctx * sizeof(float)
         + hp->n_embd * sizeof(float) + (size_t)m->n_stages * sizeof(stage_ctr);
}

size_t ember_model_cache_bytes(const ember_model *m) {
    size_t n = 0;
    for (int64_t l = 0; l < m->hp.n_layer; l++) {
        const layer_t *L = &m->layers[l];
        const int64_t rows = ember_model_cache_rows(m, l);
        n += L->kind == EMBER_LAYER_CONV ? (size_t)rows * m->hp.n_embd * sizeof(float)
                                         : 2 * (size_t)rows * m->kv_dim * sizeof(uint16_t);
    }
    return n;
}

const char *ember_model_ops_name(const ember_model *m) { return m->ops->name; }
int ember_model_threads(const ember_model *m) { return ember_pool_size(m->pool); }
ember_pool *ember_model_pool(ember_model *m) { return m->pool; }

void ember_model_free(ember_model *m) {
    if (!m) return;
    ember_pool_free(m->pool);
    for (int64_t l = 0; m->layers && l < m->hp.n_layer; l++) {
        free(m->layers[l].kc); free(m->layers[l].vc); free(m->layers[l].conv);
    }
    free(m->layers);
    free(m->stages);
    free(m->x); free(m->xn); free(m->qkv); free(m->att); free(m->ffn); free(m->bcx); free(m->conv_win);
    free(m->xq); free(m->scores); free(m->last);
    free(m);
}
