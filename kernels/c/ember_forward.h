/* The decoder forward pass in C (forward.c): build a model from weight
 * pointers into the read-only GGUF map, then run token batches through it.
 * Python owns the map and the rope table and keeps them alive while the
 * model exists (kernels/forward.py). */
#ifndef EMBER_FORWARD_H
#define EMBER_FORWARD_H

#include <stddef.h>
#include <stdint.h>

#include "ember_ops.h"

/* the decoder's switches and sizes (formats/model_config.py ModelConfig); per-layer ones
 * (kind, window, rope) are set with ember_model_set_layer */
typedef struct {
    int64_t n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, rope_dim;
    int64_t n_ctx;       /* KV cache positions */
    int64_t max_batch;   /* tokens per pool run; scratch and rings are sized for it */
    float rms_eps;
    int neox;            /* rope pairs (i, i + rope_dim/2) instead of (2i, 2i+1) */
    int qk_norm;         /* EMBER_QK_NORM_*: RMSNorm of q and k before rope */
    int fused_qkv;       /* phi3: one attn_qkv matrix */
    int fused_gate_up;   /* phi3: ffn_up holds gate | up */
    int act;             /* EMBER_ACT_*: the gated FFN's activation */
    int pre_norms;       /* RMSNorm before attention and FFN (olmo2: 0); post-norms
                          * (gemma2/3, olmo2) are on where their vectors are set */
    float embd_scale;    /* token embeddings *= it (gemma: sqrt(n_embd); granite) */
    float residual_scale;/* block outputs *= it before the add (granite) */
    float attn_scale;    /* KQ scale */
    float attn_softcap;  /* scores -> cap * tanh(s / cap); 0 off (gemma2) */
    float final_softcap; /* logits likewise; 0 off */
    float logit_scale;   /* logits /= it (granite) */
    int64_t sliding_window;  /* window of the EMBER_LAYER_SWA layers */
    int64_t conv_l_cache;    /* lfm2: taps of the short convolution (current + previous) */
} ember_hparams;

enum { EMBER_QK_NORM_NONE, EMBER_QK_NORM_HEAD, EMBER_QK_NORM_FULL };
enum { EMBER_ACT_SILU, EMBER_ACT_GELU };
enum {  /* layer kinds */
    EMBER_LAYER_ATTN,   /* attention over every cached position */
    EMBER_LAYER_SWA,    /* attention over the last sliding_window positions (a ring cache) */
    EMBER_LAYER_CONV    /* lfm2 short convolution (a state of its last l_cache - 1 inputs) */
};
#define EMBER_CONV_MAX_TAPS 16   /* conv_l_cache limit (lfm2 uses 3) */
enum { EMBER_ROPE_NONE, EMBER_ROPE_GLOBAL, EMBER_ROPE_SWA };  /* a layer's rope table */

/* a weight matrix (rows = outputs, cols = inputs) in GGML type `type` */
typedef struct {
    const void *data;
    int type;
    int64_t rows, cols;
    size_t row_bytes;
} ember_mat;

enum {  /* matrices; layer -1 holds TOK_EMBD and OUTPUT */
    EMBER_M_Q, EMBER_M_K, EMBER_M_V, EMBER_M_QKV, EMBER_M_O,
    EMBER_M_GATE, EMBER_M_UP, EMBER_M_GATE_UP, EMBER_M_DOWN,
    EMBER_M_CONV_IN, EMBER_M_CONV_OUT,   /* lfm2: in_proj (3 E: B | C | x), out_proj */
    EMBER_M_TOK_EMBD, EMBER_M_OUTPUT, EMBER_N_MATS
};

enum {  /* float32 vectors; layer -1 holds OUTPUT_NORM */
    EMBER_V_ATTN_NORM, EMBER_V_FFN_NORM, EMBER_V_Q_NORM, EMBER_V_K_NORM,
    EMBER_V_BQ, EMBER_V_BK, EMBER_V_BV,
    EMBER_V_POST_ATTN_NORM, EMBER_V_POST_FFN_NORM,
    EMBER_V_CONV,                        /* lfm2: (E, conv_l_cache) kernel, oldest tap first */
    EMBER_V_OUTPUT_NORM, EMBER_N_VECS
};

typedef struct ember_model ember_model;

/* rope_cs, rope_cs_swa: (n_ctx, rope_dim/2, 2) cos, sin of the global and the
 * sliding-window layers (the same table where the file has one base), kept alive by
 * the caller. isa: ops table name, NULL for the kernels' current ISA. NULL on
 * allocation failure. Every layer starts as EMBER_LAYER_ATTN with the global rope. */
ember_model *ember_model_new(const ember_hparams *hp, const float *rope_cs, const float *rope_cs_swa,
                             int n_threads, const char *isa);
/* a layer's kind (EMBER_LAYER_*) and rope table (EMBER_ROPE_*); 0 ok, -1 bad value */
int     ember_model_set_layer(ember_model *m, int64_t layer, int kind, int rope);
/* rows of a layer's cache: K/V positions (attention; a ring when shorter than n_ctx)
 * or the conv state's inputs (conv: l_cache - 1) */
int64_t ember_model_cache_rows(const ember_model *m, int64_t layer);
/* 0 ok, -1 bad layer/slot, -2 weight type without kernels */
int     ember_model_set_mat(ember_model *m, int64_t layer, int which, const void *data, int type,
                            int64_t rows, int64_t cols, size_t row_bytes);
int     ember_model_set_vec(ember_model *m, int64_t layer, int which, const float *data);
int     ember_model_finish(ember_model *m);   /* allocates the caches and the scratch; 0 ok */
void    ember_model_free(ember_model *m);
size_t  ember_model_scratch_bytes(const ember_model *m);
size_t  ember_model_cache_bytes(const ember_model *m);   /* KV caches and rings + conv states */
const char *ember_model_ops_name(const ember_model *m);
int     ember_model_threads(const ember_model *m);
ember_pool *ember_model_pool(ember_model *m);

/* run n tokens at positions pos0.. through the model, filling the KV cache.
 * logits: (n, n_vocab) if all_logits, else (n_vocab) for the last token. */
void    ember_forward(ember_model *m, const int32_t *tokens, int64_t n, int64_t pos0,
                      float *logits, int all_logits);

#endif
