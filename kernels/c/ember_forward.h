/* The decoder forward pass in C (forward.c): build a model from weight
 * pointers into the read-only GGUF map, then run token batches through it.
 * Python owns the map and the rope table and keeps them alive while the
 * model exists (kernels/forward.py). */
#ifndef EMBER_FORWARD_H
#define EMBER_FORWARD_H

#include <stddef.h>
#include <stdint.h>

#include "ember_ops.h"

/* the decoder's switches and sizes (plugins/arch.py ModelConfig) */
typedef struct {
    int64_t n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, rope_dim;
    int64_t n_ctx;       /* KV cache positions */
    int64_t max_batch;   /* tokens per pool run; scratch is sized for it */
    float rms_eps;
    int neox;            /* rope pairs (i, i + rope_dim/2) instead of (2i, 2i+1) */
    int qk_norm;         /* qwen3: per-head RMSNorm of q and k before rope */
    int fused_qkv;       /* phi3: one attn_qkv matrix */
    int fused_gate_up;   /* phi3: ffn_up holds gate | up */
} ember_hparams;

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
    EMBER_M_TOK_EMBD, EMBER_M_OUTPUT, EMBER_N_MATS
};

enum {  /* float32 vectors; layer -1 holds OUTPUT_NORM */
    EMBER_V_ATTN_NORM, EMBER_V_FFN_NORM, EMBER_V_Q_NORM, EMBER_V_K_NORM,
    EMBER_V_BQ, EMBER_V_BK, EMBER_V_BV, EMBER_V_OUTPUT_NORM, EMBER_N_VECS
};

typedef struct ember_model ember_model;

/* rope_cs: (n_ctx, rope_dim/2, 2) cos, sin, kept alive by the caller. isa: ops table
 * name, NULL for the kernels' current ISA. NULL on allocation failure. */
ember_model *ember_model_new(const ember_hparams *hp, const float *rope_cs, int n_threads, const char *isa);
/* 0 ok, -1 bad layer/slot, -2 weight type without kernels */
int     ember_model_set_mat(ember_model *m, int64_t layer, int which, const void *data, int type,
                            int64_t rows, int64_t cols, size_t row_bytes);
int     ember_model_set_vec(ember_model *m, int64_t layer, int which, const float *data);
int     ember_model_finish(ember_model *m);   /* allocates the scratch; 0 ok */
void    ember_model_free(ember_model *m);
size_t  ember_model_scratch_bytes(const ember_model *m);
const char *ember_model_ops_name(const ember_model *m);
int     ember_model_threads(const ember_model *m);
ember_pool *ember_model_pool(ember_model *m);

/* run n tokens at positions pos0.. through the model, filling the KV cache.
 * logits: (n, n_vocab) if all_logits, else (n_vocab) for the last token. */
void    ember_forward(ember_model *m, const int32_t *tokens, int64_t n, int64_t pos0,
                      float *logits, int all_logits);

#endif
