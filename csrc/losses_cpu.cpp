// C++ CPU PPO / PPO-Lagrangian losses with their gradient in the same pass, and the KL-penalised rewards
// (contract: docs/kernels.md).  Rows of length t are independent; each row is walked once for the mask sum
// (den = sum_t mask, 0 -> 1) and once for the loss and the gradient.  Row sums accumulate in double.
//
// The gradients are those torch autograd gives for the reference expressions, tie rules included:
// torch.minimum / torch.maximum send half the gradient to each input on a tie, and clamp passes the gradient
// where min <= x <= max (closed interval).  minimum / maximum propagate NaN like torch.
#include <cmath>
#include <cstdint>

#include "kernels_cpu.h"

// Every multiply and add rounds to fp32 as in the reference's separate torch ops (no fma contraction).
#include "fp_contract_off.h"

namespace saferlhf::cpu {
namespace {

inline float minimum(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : (b < a ? b : a); }
inline float maximum(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : (b > a ? b : a); }
// torch.clamp(x, lo, hi) = min(max(x, lo), hi), NaN x stays NaN.
inline float clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

inline float row_den(const float* mask, int64_t t) {
  double den = 0.0;
  for (int64_t k = 0; k < t; ++k) den += mask[k];
  return den == 0.0 ? 1.0f : static_cast<float>(den);
}

}  // namespace

void ppo_clip_objective(const float* logprobs, const float* old_logprobs, const float* reward_advantages,
                        const float* cost_advantages, const float* mask, int64_t t, float multiplier,
                        float clip_range, float* row_loss, float* grad, int64_t row_begin, int64_t row_end) {
  const float lo = static_cast<float>(1.0 - static_cast<double>(clip_range));
  const float hi = static_cast<float>(1.0 + static_cast<double>(clip_range));
  const float one_plus_lam = static_cast<float>(1.0 + static_cast<double>(multiplier));
  for (int64_t i = row_begin; i < row_end; ++i) {
    const int64_t off = i * t;
    const float den = row_den(mask + off, t);
    double acc = 0.0;
    for (int64_t k = off; k < off + t; ++k) {
      // A = A_r, or (A_r - lam A_c) / (1 + lam) for PPO-Lagrangian.
      const float a = cost_advantages == nullptr
                          ? reward_advantages[k]
                          : (reward_advantages[k] - multiplier * cost_advantages[k]) / one_plus_lam;
      const float rho = std::exp(logprobs[k] - old_logprobs[k]);
      const float s1 = a * rho;
      const float s2 = a * clamp(rho, lo, hi);
      acc += static_cast<double>(minimum(s1, s2)) * mask[k];
      // d obj / d logp = A rho * (share of the gradient reaching s1 + share reaching s2 times clamp's pass-through)
      const float inr = (lo <= rho && rho <= hi) ? 1.0f : 0.0f;
      const float share = s1 < s2 ? 1.0f : (s1 == s2 ? 0.5f * (1.0f + inr) : inr);
      grad[k] = -(mask[k] / den) * (s1 * share);
    }
    row_loss[i] = static_cast<float>(-acc / den);
  }
}

void clipped_value_objective(const float* values, const float* old_values, const float* returns, const float* mask,
                             int64_t t, float clip_range, float* row_loss, float* grad, int64_t row_begin,
                             int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const int64_t off = i * t;
    const float den = row_den(mask + off, t);
    double acc = 0.0;
    for (int64_t k = off; k < off + t; ++k) {
      const float v = values[k], g = returns[k];
      const float lo = old_values[k] - clip_range, hi = old_values[k] + clip_range;
      const float vc = clamp(v, lo, hi);
      const float l1 = (v - g) * (v - g), l2 = (vc - g) * (vc - g);
      acc += static_cast<double>(maximum(l1, l2)) * mask[k];
      const float d1 = 2.0f * (v - g);
      const float d2 = (lo <= v && v <= hi) ? 2.0f * (vc - g) : 0.0f;
      const float dobj = l1 > l2 ? d1 : (l1 < l2 ? d2 : 0.5f * (d1 + d2));
      grad[k] = 0.5f * (mask[k] / den) * dobj;
    }
    row_loss[i] = static_cast<float>(0.5 * acc / den);
  }
}

void kl_penalized_rewards(const float* reward, const float* cost, const float* logprobs, const float* ref_logprobs,
                          const float* mask, int64_t t, float kl_coeff, float clip_range_score, float* rewards,
                          float* costs, int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const int64_t off = i * t;
    int64_t end = -1;  // last real token; -1 for a fully masked row (then every output is 0 * ... = 0)
    for (int64_t k = t - 1; k >= 0; --k) {
      if (mask[off + k] != 0.0f) {
        end = k;
        break;
      }
    }
    for (int64_t k = 0; k < t; ++k) {
      const float kl = logprobs[off + k] - ref_logprobs[off + k];
      float r = -kl_coeff * kl, c = kl_coeff * kl;
      if (k == end) {
        r += reward[i];
        c += cost[i];
      }
      rewards[off + k] = clamp(r, -clip_range_score, clip_range_score) * mask[off + k];
      costs[off + k] = clamp(c, -clip_range_score, clip_range_score) * mask[off + k];
    }
  }
}

}  // namespace saferlhf::cpu
