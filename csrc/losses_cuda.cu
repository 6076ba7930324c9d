// CUDA PPO-Lagrangian losses with their gradients, and the KL-penalised rewards (contract: docs/kernels.md).
//
// Parallel decomposition
// ----------------------
// * One block per row ([R, T] with T of a few hundred to a few thousand): the row's elements are strided over
//   the block (32..256 threads, about 4 elements per thread), so loads and stores are coalesced and the row
//   reductions (sum of obj * mask and of mask; the last masked index) are one warp-shuffle + shared-memory
//   reduction per row, with no atomics and no second launch.
// * The losses need the row's mask sum before the gradient can be scaled, so each thread first stores the
//   unscaled d obj / d x of its elements into grad, the block reduces, and the same thread then rescales the
//   elements it wrote (same index -> thread mapping, no extra synchronisation beyond the reduction's).
// * kl_penalized_rewards: a block max-reduction finds the row's last masked index, then one elementwise pass.
// * Rounding follows the reference op by op (__fmul_rn / __fadd_rn keep --use_fast_math from contracting into
//   fmas, exp is range-reduced rather than __expf, divisions are IEEE) so ties between the clipped and unclipped
//   branches fall exactly where torch puts them; tie gradients follow torch autograd (docs/kernels.md).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.cuh"
#include "kernels_cuda.h"

namespace saferlhf::cuda {
namespace {

constexpr int kMaxThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------------------------------------ math
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float pow2i(int k) { return __int_as_float((k + 127) << 23); }  // k in [-126, 127]

// exp(x) within ~2 ulp over the whole fp32 range (inf above ~88.72, 0 below ~-87.3 with FTZ, NaN -> NaN),
// independent of --use_fast_math (which would make expf the less accurate __expf).
__device__ __forceinline__ float exp_full(float x) {
  float xc = x < -104.0f ? -104.0f : x;  // compare-selects let NaN through
  xc = xc > 89.0f ? 89.0f : xc;
  const float k = rintf(xc * 1.4426950408889634f);  // [-150, 128]
  float r = fmaf(k, -0.693145751953125f, xc);
  r = fmaf(k, -1.4286068203094172e-06f, r);
  const float p = ex2_approx(r * 1.4426950408889634f);
  const int ki = static_cast<int>(k);  // NaN -> 0; p carries the NaN
  const int k1 = ki >> 1;               // ki = k1 + k2, both in [-75, 64]: normal powers of two
  return p * pow2i(k1) * pow2i(ki - k1);
}

// torch.clamp semantics: NaN stays NaN.
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// ------------------------------------------------------------------------------------------------ reductions
// Sums of (a, b) over the block, returned to every thread.  blockDim.x is a multiple of 32, at most 256.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 partial[kMaxThreads / 32];
  __shared__ float2 total;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(kFull, a, o);
    b += __shfl_xor_sync(kFull, b, o);
  }
  if (lane == 0) partial[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    const int nwarps = static_cast<int>(blockDim.x) >> 5;
    float2 p = lane < nwarps ? partial[lane] : make_float2(0.0f, 0.0f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      p.x += __shfl_xor_sync(kFull, p.x, o);
      p.y += __shfl_xor_sync(kFull, p.y, o);
    }
    if (lane == 0) total = p;
  }
  __syncthreads();
  return total;
}

__device__ __forceinline__ long long block_max(long long x) {
  __shared__ long long partial[kMaxThreads / 32];
  __shared__ long long total;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const long long y = __shfl_xor_sync(kFull, x, o);
    x = y > x ? y : x;
  }
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = static_cast<int>(blockDim.x) >> 5;
    long long p = lane < nwarps ? partial[lane] : -1;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const long long y = __shfl_xor_sync(kFull, p, o);
      p = y > p ? y : p;
    }
    if (lane == 0) total = p;
  }
  __syncthreads();
  return total;
}

// ------------------------------------------------------------------------------------------------ PPO actor
// A = A_r (plain PPO) or (A_r - lam * A_c) / (1 + lam) (LAG).  rho = exp(logp - old),
// obj = min(A rho, A clamp(rho, lo, hi)), dobj = d obj / d logp with torch's tie rules.
template <bool LAG>
__global__ void __launch_bounds__(kMaxThreads)
    ppo_clip_kernel(const float* __restrict__ logprobs, const float* __restrict__ old_logprobs,
                    const float* __restrict__ reward_adv, const float* __restrict__ cost_adv,
                    const float* __restrict__ mask, int64_t T, float lam, float inv_one_plus_lam, float lo, float hi,
                    float* __restrict__ row_loss, float* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const int64_t off = row * T;
  float num = 0.0f, den = 0.0f;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t i = off + t;
    float A = reward_adv[i];
    if constexpr (LAG) A = __fmul_rn(__fsub_rn(A, __fmul_rn(lam, cost_adv[i])), inv_one_plus_lam);
    const float rho = exp_full(__fsub_rn(logprobs[i], old_logprobs[i]));
    const float s1 = __fmul_rn(A, rho);
    const float s2 = __fmul_rn(A, clamp_nan(rho, lo, hi));
    const float obj = isnan(s1) ? s1 : (s1 < s2 ? s1 : s2);  // torch.minimum propagates NaN
    const bool inr = lo <= rho && rho <= hi;
    // [s1 < s2] + [s1 == s2] * 0.5 * (1 + inr) + [s1 > s2] * inr
    const float w = s1 < s2 ? 1.0f : (s1 == s2 ? (inr ? 1.0f : 0.5f) : ((s1 > s2 && inr) ? 1.0f : 0.0f));
    const float m = mask[i];
    num += __fmul_rn(obj, m);
    den += m;
    grad[i] = __fmul_rn(s1, w);  // d obj / d logp = A * rho * w; scaled below
  }
  const float2 sums = block_sum2(num, den);
  const float d = sums.y == 0.0f ? 1.0f : sums.y;
  if (threadIdx.x == 0) row_loss[row] = -__fdiv_rn(sums.x, d);
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t i = off + t;
    grad[i] = __fmul_rn(-__fdiv_rn(mask[i], d), grad[i]);
  }
}

// ------------------------------------------------------------------------------------------------ critic
// vc = clamp(v, old - cv, old + cv), obj = max((v - G)^2, (vc - G)^2), dobj with torch's tie rules.
__global__ void __launch_bounds__(kMaxThreads)
    clipped_value_kernel(const float* __restrict__ values, const float* __restrict__ old_values,
                         const float* __restrict__ returns, const float* __restrict__ mask, int64_t T, float cv,
                         float* __restrict__ row_loss, float* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const int64_t off = row * T;
  float num = 0.0f, den = 0.0f;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t i = off + t;
    const float v = values[i], old = old_values[i], G = returns[i];
    const float lo = __fsub_rn(old, cv), hi = __fadd_rn(old, cv);
    const float vc = clamp_nan(v, lo, hi);
    const float e1 = __fsub_rn(v, G), e2 = __fsub_rn(vc, G);
    const float l1 = __fmul_rn(e1, e1), l2 = __fmul_rn(e2, e2);
    const float obj = isnan(l1) ? l1 : (l1 > l2 ? l1 : l2);  // torch.maximum propagates NaN
    const bool inr = lo <= v && v <= hi;
    const float d1 = 2.0f * e1;
    const float d2 = inr ? 2.0f * e2 : 0.0f;
    const float dobj = l1 > l2 ? d1 : (l1 < l2 ? d2 : (l1 == l2 ? 0.5f * __fadd_rn(d1, d2) : 0.0f));
    const float m = mask[i];
    num += __fmul_rn(obj, m);
    den += m;
    grad[i] = dobj;  // scaled below
  }
  const float2 sums = block_sum2(num, den);
  const float d = sums.y == 0.0f ? 1.0f : sums.y;
  if (threadIdx.x == 0) row_loss[row] = 0.5f * __fdiv_rn(sums.x, d);
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t i = off + t;
    grad[i] = __fmul_rn(0.5f * __fdiv_rn(mask[i], d), grad[i]);
  }
}

// ------------------------------------------------------------------------------------------------ rewards
__global__ void __launch_bounds__(kMaxThreads)
    kl_rewards_kernel(const float* __restrict__ reward, const float* __restrict__ cost,
                      const float* __restrict__ logprobs, const float* __restrict__ ref_logprobs,
                      const float* __restrict__ mask, int64_t T, float kl_coeff, float clip,
                      float* __restrict__ rewards, float* __restrict__ costs) {
  const int64_t row = blockIdx.x;
  const int64_t off = row * T;
  long long last = -1;  // last t with mask != 0 (-1: fully masked row, nothing gets the score)
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    if (mask[off + t] != 0.0f) last = t;  // t increases per thread: the last hit is the thread's max
  }
  const long long end = block_max(last);
  const float R = reward[row], C = cost[row];
  const float neg_kc = -kl_coeff;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    const int64_t i = off + t;
    const float kl = __fsub_rn(logprobs[i], ref_logprobs[i]);
    float r = __fmul_rn(neg_kc, kl);
    float c = __fmul_rn(kl_coeff, kl);
    if (t == end) {
      r = __fadd_rn(r, R);
      c = __fadd_rn(c, C);
    }
    const float m = mask[i];
    rewards[i] = __fmul_rn(clamp_nan(r, -clip, clip), m);
    costs[i] = __fmul_rn(clamp_nan(c, -clip, clip), m);
  }
}

// ------------------------------------------------------------------------------------------------ launch helpers
// About 4 elements per thread, 32..256 threads (a multiple of 32, as the reductions require).
int threads_for(int64_t t) {
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * 4 < t) threads <<= 1;
  return threads;
}

unsigned grid_for(int64_t rows) {
  if (rows > static_cast<int64_t>(INT_MAX)) throw std::runtime_error("saferlhf: too many rows for one launch");
  return static_cast<unsigned>(rows);
}

}  // namespace

void ppo_clip_objective(const float* logprobs, const float* old_logprobs, const float* reward_advantages,
                        const float* cost_advantages, const float* mask, int64_t rows, int64_t t, float multiplier,
                        float clip_range, float* row_loss, float* grad, cudaStream_t stream) {
  if (rows <= 0) return;
  // Bounds as torch.clamp sees them: 1 -+ eps in double (Python floats), then rounded to fp32.
  const float lo = static_cast<float>(1.0 - static_cast<double>(clip_range));
  const float hi = static_cast<float>(1.0 + static_cast<double>(clip_range));
  // torch divides by the scalar (1 + lam) as a multiply by the fp32 reciprocal.
  const float inv_one_plus_lam = 1.0f / static_cast<float>(1.0 + static_cast<double>(multiplier));
  const unsigned grid = grid_for(rows);
  const int threads = threads_for(t);
  if (cost_advantages != nullptr) {
    ppo_clip_kernel<true><<<grid, threads, 0, stream>>>(logprobs, old_logprobs, reward_advantages, cost_advantages,
                                                         mask, t, multiplier, inv_one_plus_lam, lo, hi, row_loss,
                                                         grad);
  } else {
    ppo_clip_kernel<false><<<grid, threads, 0, stream>>>(logprobs, old_logprobs, reward_advantages, nullptr, mask,
                                                          t, 0.0f, 1.0f, lo, hi, row_loss, grad);
  }
  SAFERLHF_CUDA_CHECK(cudaGetLastError());
}

void clipped_value_objective(const float* values, const float* old_values, const float* returns, const float* mask,
                             int64_t rows, int64_t t, float clip_range, float* row_loss, float* grad,
                             cudaStream_t stream) {
  if (rows <= 0) return;
  clipped_value_kernel<<<grid_for(rows), threads_for(t), 0, stream>>>(values, old_values, returns, mask, t,
                                                                      clip_range, row_loss, grad);
  SAFERLHF_CUDA_CHECK(cudaGetLastError());
}

void kl_penalized_rewards(const float* reward, const float* cost, const float* logprobs, const float* ref_logprobs,
                          const float* mask, int64_t rows, int64_t t, float kl_coeff, float clip_range_score,
                          float* rewards, float* costs, cudaStream_t stream) {
  if (rows <= 0 || t <= 0) return;
  kl_rewards_kernel<<<grid_for(rows), threads_for(t), 0, stream>>>(reward, cost, logprobs, ref_logprobs, mask, t,
                                                                   kl_coeff, clip_range_score, rewards, costs);
  SAFERLHF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace saferlhf::cuda
