// C++ CPU core: torch-free kernels over raw pointers (contract: docs/kernels.md).
// Each function processes the rows [row_begin, row_end); the caller parallelises over rows
// (the torch binding uses at::parallel_for, the standalone tests call them directly).
#pragma once
#include <cstdint>

#include "common.h"

namespace saferlhf::cpu {

// logits: n x v, element (i, j) at logits[i * ld + j] of type `kind`; labels [n].
// Writes logp[i], lse[i] and, when with_entropy, entropy[i] (entropy may be null otherwise).
void logprobs_forward(const void* logits, ScalarKind kind, int64_t v, int64_t ld, const int64_t* labels,
                      float temperature, int64_t ignore_index, bool with_entropy, float* logp, float* lse,
                      float* entropy, int64_t row_begin, int64_t row_end);

// grad_logits (same kind as logits, row stride ld_out) may alias logits (ld_out == ld).
// grad_entropy may be null (treated as zeros).
void logprobs_backward(const float* grad_logp, const float* grad_entropy, const void* logits, ScalarKind kind,
                       int64_t v, int64_t ld, const int64_t* labels, const float* lse, const float* entropy,
                       float temperature, int64_t ignore_index, void* grad_logits, int64_t ld_out,
                       int64_t row_begin, int64_t row_end);

// rewards / values / outputs [rows, t] row-major fp32; mask [mask_rows, t] (MaskT = float or uint8_t 0/1), row i
// using mask row i % mask_rows.  Instantiated for float and uint8_t.
template <typename MaskT>
void gae_forward(const float* rewards, const float* values, const MaskT* mask, int64_t mask_rows, int64_t t,
                 float gamma, float lam, float* advantages, float* returns, int64_t row_begin, int64_t row_end);

// cost_advantages may be null (plain PPO: A = reward_advantages).
void ppo_clip_objective(const float* logprobs, const float* old_logprobs, const float* reward_advantages,
                        const float* cost_advantages, const float* mask, int64_t t, float multiplier,
                        float clip_range, float* row_loss, float* grad, int64_t row_begin, int64_t row_end);

void clipped_value_objective(const float* values, const float* old_values, const float* returns, const float* mask,
                             int64_t t, float clip_range, float* row_loss, float* grad, int64_t row_begin,
                             int64_t row_end);

void kl_penalized_rewards(const float* reward, const float* cost, const float* logprobs, const float* ref_logprobs,
                          const float* mask, int64_t t, float kl_coeff, float clip_range_score, float* rewards,
                          float* costs, int64_t row_begin, int64_t row_end);

}  // namespace saferlhf::cpu
