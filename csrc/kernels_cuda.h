// CUDA core: torch-free launchers over device pointers (contract: docs/kernels.md).
// Each launches on `stream` and covers all rows; shapes as in kernels_cpu.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common.h"

namespace saferlhf::cuda {

void logprobs_forward(const void* logits, ScalarKind kind, int64_t n, int64_t v, int64_t ld, const int64_t* labels,
                      float temperature, int64_t ignore_index, bool with_entropy, float* logp, float* lse,
                      float* entropy, cudaStream_t stream);

void logprobs_backward(const float* grad_logp, const float* grad_entropy, const void* logits, ScalarKind kind,
                       int64_t n, int64_t v, int64_t ld, const int64_t* labels, const float* lse,
                       const float* entropy, float temperature, int64_t ignore_index, void* grad_logits,
                       int64_t ld_out, cudaStream_t stream);

// rewards / values / outputs [rows, t] fp32; mask [mask_rows, t], fp32 or bool (mask_is_bool, one byte 0/1), row i
// using mask row i % mask_rows.
void gae_forward(const float* rewards, const float* values, const void* mask, bool mask_is_bool, int64_t mask_rows,
                 int64_t rows, int64_t t, float gamma, float lam, float* advantages, float* returns,
                 cudaStream_t stream);

void ppo_clip_objective(const float* logprobs, const float* old_logprobs, const float* reward_advantages,
                        const float* cost_advantages, const float* mask, int64_t rows, int64_t t, float multiplier,
                        float clip_range, float* row_loss, float* grad, cudaStream_t stream);

void clipped_value_objective(const float* values, const float* old_values, const float* returns, const float* mask,
                             int64_t rows, int64_t t, float clip_range, float* row_loss, float* grad,
                             cudaStream_t stream);

void kl_penalized_rewards(const float* reward, const float* cost, const float* logprobs, const float* ref_logprobs,
                          const float* mask, int64_t rows, int64_t t, float kl_coeff, float clip_range_score,
                          float* rewards, float* costs, cudaStream_t stream);

}  // namespace saferlhf::cuda
