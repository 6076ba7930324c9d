// C++ CPU GAE (contract: docs/kernels.md): with r = rewards * mask, v = values * mask and v_T = A_T = 0,
//     delta_t = r_t + gamma * v_{t+1} - v_t,   A_t = delta_t + gamma * lam * A_{t+1},   returns_t = A_t + v_t,
// walked backwards in t exactly as the reference loop (same fp32 operations in the same order; the recursion runs
// through masked positions, it is not reset there).
//
// The mask is either fp32 or bool (one byte, 0/1) and may have fewer rows than the streams: row i uses mask row
// i % mask_rows, so the [2, B, T] reward + cost stack shares one [B, T] mask with no expanded or converted copy.
//
// The recursion is a dependent chain of a multiply and an add per step, so one row runs at the latency of that
// chain.  Rows are therefore walked kLanes at a time, interleaved step by step: the kLanes independent chains fill
// the pipeline (and the compiler may vectorise across them), while each row's arithmetic stays the reference's.
#include <cstdint>

#include "kernels_cpu.h"

// Every multiply and add rounds to fp32 as in the reference's separate torch ops (no fma contraction).
#include "fp_contract_off.h"

namespace saferlhf::cpu {
namespace {

constexpr int kLanes = 8;

template <int kRows, typename MaskT>
void gae_rows(const float* rewards, const float* values, const MaskT* mask, int64_t mask_rows, int64_t t,
              float gamma, float gl, float* advantages, float* returns, int64_t row0) {
  float next_v[kRows], last[kRows];
  const MaskT* mrow[kRows];
  for (int l = 0; l < kRows; ++l) {
    next_v[l] = last[l] = 0.0f;
    mrow[l] = mask + ((row0 + l) % mask_rows) * t;
  }
  for (int64_t k = t - 1; k >= 0; --k) {
    for (int l = 0; l < kRows; ++l) {
      const int64_t idx = (row0 + l) * t + k;
      const float m = static_cast<float>(mrow[l][k]);
      const float v = values[idx] * m;
      const float r = rewards[idx] * m;
      const float delta = r + gamma * next_v[l] - v;
      last[l] = delta + gl * last[l];
      advantages[idx] = last[l];
      returns[idx] = last[l] + v;
      next_v[l] = v;
    }
  }
}

}  // namespace

template <typename MaskT>
void gae_forward(const float* rewards, const float* values, const MaskT* mask, int64_t mask_rows, int64_t t,
                 float gamma, float lam, float* advantages, float* returns, int64_t row_begin, int64_t row_end) {
  // The reference multiplies A by the scalar gamma * lam (a Python product, rounded to fp32 by torch).
  const float gl = static_cast<float>(static_cast<double>(gamma) * static_cast<double>(lam));
  int64_t i = row_begin;
  for (; i + kLanes <= row_end; i += kLanes) {
    gae_rows<kLanes>(rewards, values, mask, mask_rows, t, gamma, gl, advantages, returns, i);
  }
  for (; i < row_end; ++i) gae_rows<1>(rewards, values, mask, mask_rows, t, gamma, gl, advantages, returns, i);
}

template void gae_forward<float>(const float*, const float*, const float*, int64_t, int64_t, float, float, float*,
                                 float*, int64_t, int64_t);
template void gae_forward<uint8_t>(const float*, const float*, const uint8_t*, int64_t, int64_t, float, float,
                                   float*, float*, int64_t, int64_t);

}  // namespace saferlhf::cpu
