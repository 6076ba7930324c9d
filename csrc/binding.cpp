// The op library saferlhf (TORCH_LIBRARY), the kernel-contract ops' schemas, their CPU and CUDA tensor glue
// (namespaces saferlhf::binding::cpu_ops / cuda_ops, calling the torch-free cores of <family>_cpu.cpp and
// <family>_cuda.cu) and the Python module with its API version.  The other families declare their schemas beside
// their kernels (<family>_ops.cpp, TORCH_LIBRARY_FRAGMENT); torch's dispatcher picks the kernel by tensor device.
//
// Contract shared by every backend (C++ CPU, CUDA, Triton in kernels/): see docs/kernels.md.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(saferlhf, m) {
  // logits [N, V] (fp32/bf16/fp16, stride(1) == 1), labels [N] int64 ->
  //   logp [N] fp32, lse [N] fp32 (logsumexp of logits / temperature), entropy [N] fp32 (zeros unless with_entropy).
  m.def(
      "logprobs_forward(Tensor logits, Tensor labels, float temperature, int ignore_index, bool with_entropy)"
      " -> (Tensor, Tensor, Tensor)");
  // Writes d(sum g_logp*logp + g_entropy*entropy)/d logits into grad_logits ([N, V], logits' dtype).
  // grad_logits may be logits itself (in-place, used by the chunked linear path).
  m.def(
      "logprobs_backward(Tensor grad_logp, Tensor? grad_entropy, Tensor logits, Tensor labels, Tensor lse,"
      " Tensor entropy, float temperature, int ignore_index, Tensor(a!) grad_logits) -> ()");
  // rewards, values [R, T] fp32 contiguous; mask [M, T] fp32 or bool contiguous with R % M == 0 (row i uses mask
  // row i % M) -> advantages, returns [R, T] fp32.
  m.def("gae_forward(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // [R, T] fp32 contiguous -> row_loss [R], grad [R, T] = d row_loss / d logprobs.
  m.def(
      "ppo_clip_objective(Tensor logprobs, Tensor old_logprobs, Tensor reward_advantages, Tensor? cost_advantages,"
      " Tensor mask, float multiplier, float clip_range) -> (Tensor, Tensor)");
  // [R, T] fp32 contiguous -> row_loss [R], grad [R, T] = d row_loss / d values.
  m.def(
      "clipped_value_objective(Tensor values, Tensor old_values, Tensor returns, Tensor mask, float clip_range)"
      " -> (Tensor, Tensor)");
  // reward, cost [R]; logprobs, ref_logprobs, mask [R, T] fp32 contiguous -> rewards, costs [R, T] fp32.
  m.def(
      "kl_penalized_rewards(Tensor reward, Tensor cost, Tensor logprobs, Tensor ref_logprobs, Tensor mask,"
      " float kl_coeff, float clip_range_score) -> (Tensor, Tensor)");
}

namespace saferlhf::binding {

// GAE mask: [mask_rows, t], float32 or bool, contiguous, with rows % mask_rows == 0 (row i uses mask row
// i % mask_rows: one [B, T] mask serves the stacked [S * B, T] streams).
void check_gae_mask(const at::Tensor& mask, const at::Device& device, int64_t rows, int64_t t) {
  TORCH_CHECK(mask.device() == device, "saferlhf: mask must be on ", device, ", got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kFloat || mask.scalar_type() == at::kBool,
              "saferlhf: mask must be float32 or bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(1) == t, "saferlhf: mask must be 2-D [mask_rows, ", t, "], got ",
              mask.sizes());
  TORCH_CHECK(mask.is_contiguous(), "saferlhf: mask must be contiguous");
  const int64_t mask_rows = mask.size(0);
  TORCH_CHECK(rows == 0 ? mask_rows >= 0 : (mask_rows > 0 && rows % mask_rows == 0), "saferlhf: mask has ",
              mask_rows, " rows, which does not divide the ", rows, " rows of rewards");
}

}  // namespace saferlhf::binding

// ---- CPU implementations (tensor checks + at::parallel_for over rows, calling kernels_cpu.h) ----
// BEGIN CPU IMPL
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "kernels_cpu.h"

namespace saferlhf::binding::cpu_ops {

using saferlhf::ScalarKind;

// Elements per at::parallel_for task (saferlhf::grain_rows): small inputs stay on one thread.
constexpr int64_t kGrainElems = 1 << 15;

ScalarKind logits_kind(const at::Tensor& logits) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "saferlhf: logits must be float32, bfloat16 or float16, got ", dtype);
  return dtype == at::kFloat ? ScalarKind::kFloat32 : dtype == at::kBFloat16 ? ScalarKind::kBFloat16
                                                                              : ScalarKind::kFloat16;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.device().is_cpu(), "saferlhf: ", name, " must be a CPU tensor");
  TORCH_CHECK(logits.dim() == 2, "saferlhf: ", name, " must be 2-D [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, "saferlhf: ", name,
              " must have unit stride along V (stride(1) == 1), got strides ", logits.strides());
  logits_kind(logits);
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu(), "saferlhf: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, "saferlhf: ", name, " must have shape [", rows, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "saferlhf: ", name, " must be contiguous");
}

void check_vec(const at::Tensor& t, const char* name, int64_t rows) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "saferlhf: ", name, " must be float32, got ", t.scalar_type());
  check_rows(t, name, rows);
}

void check_labels(const at::Tensor& labels, int64_t rows) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, "saferlhf: labels must be int64, got ", labels.scalar_type());
  check_rows(labels, "labels", rows);
}

// [R, T] fp32 contiguous CPU tensor, of the same shape as `like` when given.
void check_mat(const at::Tensor& t, const char* name, const at::Tensor* like = nullptr) {
  TORCH_CHECK(t.device().is_cpu(), "saferlhf: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "saferlhf: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "saferlhf: ", name, " must be 2-D [R, T], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "saferlhf: ", name, " must be contiguous");
  if (like != nullptr) {
    TORCH_CHECK(t.sizes() == like->sizes(), "saferlhf: ", name, " has shape ", t.sizes(), ", expected ",
                like->sizes());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                                double temperature, int64_t ignore_index,
                                                                bool with_entropy) {
  check_logits(logits, "logits");
  const int64_t n = logits.size(0), v = logits.size(1);
  check_labels(labels, n);
  TORCH_CHECK(temperature > 0.0, "saferlhf: temperature must be > 0, got ", temperature);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts);
  at::Tensor entropy = with_entropy ? at::empty({n}, opts) : at::zeros({n}, opts);
  const ScalarKind kind = logits_kind(logits);
  const void* x = logits.data_ptr();
  const int64_t ld = logits.stride(0);
  const int64_t* y = labels.data_ptr<int64_t>();
  float* out_logp = logp.data_ptr<float>();
  float* out_lse = lse.data_ptr<float>();
  float* out_entropy = with_entropy ? entropy.data_ptr<float>() : nullptr;
  at::parallel_for(0, n, grain_rows(v, kGrainElems), [&](int64_t begin, int64_t end) {
    saferlhf::cpu::logprobs_forward(x, kind, v, ld, y, static_cast<float>(temperature), ignore_index, with_entropy,
                                    out_logp, out_lse, out_entropy, begin, end);
  });
  return {logp, lse, entropy};
}

void logprobs_backward(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                       const at::Tensor& entropy, double temperature, int64_t ignore_index,
                       const at::Tensor& grad_logits) {
  check_logits(logits, "logits");
  check_logits(grad_logits, "grad_logits");
  const int64_t n = logits.size(0), v = logits.size(1);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type(),
              "saferlhf: grad_logits must match logits in shape and dtype (", logits.sizes(), " ",
              logits.scalar_type(), "), got ", grad_logits.sizes(), " ", grad_logits.scalar_type());
  // In place is fine (each element is read before it is written); a shifted view of logits is not.
  TORCH_CHECK(at::get_overlap_status(grad_logits, logits) != at::MemOverlapStatus::Partial,
              "saferlhf: grad_logits partially overlaps logits; pass logits itself (in place) or a separate tensor");
  check_labels(labels, n);
  check_vec(grad_logp, "grad_logp", n);
  check_vec(lse, "lse", n);
  check_vec(entropy, "entropy", n);
  const float* g_entropy = nullptr;
  if (grad_entropy.has_value()) {
    check_vec(*grad_entropy, "grad_entropy", n);
    g_entropy = grad_entropy->data_ptr<float>();
  }
  TORCH_CHECK(temperature > 0.0, "saferlhf: temperature must be > 0, got ", temperature);
  const ScalarKind kind = logits_kind(logits);
  const void* x = logits.data_ptr();
  void* out = grad_logits.data_ptr();
  const int64_t ld = logits.stride(0), ld_out = grad_logits.stride(0);
  const float* g_logp = grad_logp.data_ptr<float>();
  const int64_t* y = labels.data_ptr<int64_t>();
  const float* row_lse = lse.data_ptr<float>();
  const float* row_entropy = entropy.data_ptr<float>();
  at::parallel_for(0, n, grain_rows(v, kGrainElems), [&](int64_t begin, int64_t end) {
    saferlhf::cpu::logprobs_backward(g_logp, g_entropy, x, kind, v, ld, y, row_lse, row_entropy,
                                     static_cast<float>(temperature), ignore_index, out, ld_out, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> gae_forward(const at::Tensor& rewards, const at::Tensor& values,
                                               const at::Tensor& mask, double gamma, double lam) {
  check_mat(rewards, "rewards");
  check_mat(values, "values", &rewards);
  const int64_t rows = rewards.size(0), t = rewards.size(1);
  saferlhf::binding::check_gae_mask(mask, rewards.device(), rows, t);
  at::Tensor advantages = at::empty_like(rewards), returns = at::empty_like(rewards);
  const float* r = rewards.data_ptr<float>();
  const float* val = values.data_ptr<float>();
  float* adv = advantages.data_ptr<float>();
  float* ret = returns.data_ptr<float>();
  const int64_t mask_rows = mask.size(0);
  const float g = static_cast<float>(gamma), l = static_cast<float>(lam);
  const bool is_bool = mask.scalar_type() == at::kBool;
  const void* m = mask.data_ptr();
  // The whole problem is small (O(rows * t) flops): only split it over threads when each gets a sizeable share,
  // so a lone call after single-threaded work does not pay the thread-pool wake-up.
  at::parallel_for(0, rows, grain_rows(t, kGrainElems) * 4, [&](int64_t begin, int64_t end) {
    if (is_bool) {
      saferlhf::cpu::gae_forward(r, val, static_cast<const uint8_t*>(m), mask_rows, t, g, l, adv, ret, begin, end);
    } else {
      saferlhf::cpu::gae_forward(r, val, static_cast<const float*>(m), mask_rows, t, g, l, adv, ret, begin, end);
    }
  });
  return {advantages, returns};
}

std::tuple<at::Tensor, at::Tensor> ppo_clip_objective(const at::Tensor& logprobs, const at::Tensor& old_logprobs,
                                                      const at::Tensor& reward_advantages,
                                                      const std::optional<at::Tensor>& cost_advantages,
                                                      const at::Tensor& mask, double multiplier, double clip_range) {
  check_mat(logprobs, "logprobs");
  check_mat(old_logprobs, "old_logprobs", &logprobs);
  check_mat(reward_advantages, "reward_advantages", &logprobs);
  check_mat(mask, "mask", &logprobs);
  const float* cost = nullptr;
  if (cost_advantages.has_value()) {
    check_mat(*cost_advantages, "cost_advantages", &logprobs);
    cost = cost_advantages->data_ptr<float>();
  }
  const int64_t rows = logprobs.size(0), t = logprobs.size(1);
  at::Tensor row_loss = at::empty({rows}, logprobs.options()), grad = at::empty_like(logprobs);
  const float* lp = logprobs.data_ptr<float>();
  const float* old = old_logprobs.data_ptr<float>();
  const float* adv = reward_advantages.data_ptr<float>();
  const float* m = mask.data_ptr<float>();
  float* loss = row_loss.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(t, kGrainElems), [&](int64_t begin, int64_t end) {
    saferlhf::cpu::ppo_clip_objective(lp, old, adv, cost, m, t, static_cast<float>(multiplier),
                                      static_cast<float>(clip_range), loss, g, begin, end);
  });
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> clipped_value_objective(const at::Tensor& values, const at::Tensor& old_values,
                                                           const at::Tensor& returns, const at::Tensor& mask,
                                                           double clip_range) {
  check_mat(values, "values");
  check_mat(old_values, "old_values", &values);
  check_mat(returns, "returns", &values);
  check_mat(mask, "mask", &values);
  const int64_t rows = values.size(0), t = values.size(1);
  at::Tensor row_loss = at::empty({rows}, values.options()), grad = at::empty_like(values);
  const float* v = values.data_ptr<float>();
  const float* old = old_values.data_ptr<float>();
  const float* ret = returns.data_ptr<float>();
  const float* m = mask.data_ptr<float>();
  float* loss = row_loss.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(t, kGrainElems), [&](int64_t begin, int64_t end) {
    saferlhf::cpu::clipped_value_objective(v, old, ret, m, t, static_cast<float>(clip_range), loss, g, begin, end);
  });
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> kl_penalized_rewards(const at::Tensor& reward, const at::Tensor& cost,
                                                        const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                                                        const at::Tensor& mask, double kl_coeff,
                                                        double clip_range_score) {
  check_mat(logprobs, "logprobs");
  check_mat(ref_logprobs, "ref_logprobs", &logprobs);
  check_mat(mask, "mask", &logprobs);
  const int64_t rows = logprobs.size(0), t = logprobs.size(1);
  check_vec(reward, "reward", rows);
  check_vec(cost, "cost", rows);
  at::Tensor rewards = at::empty_like(logprobs), costs = at::empty_like(logprobs);
  const float* r = reward.data_ptr<float>();
  const float* c = cost.data_ptr<float>();
  const float* lp = logprobs.data_ptr<float>();
  const float* ref = ref_logprobs.data_ptr<float>();
  const float* m = mask.data_ptr<float>();
  float* out_r = rewards.data_ptr<float>();
  float* out_c = costs.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(t, kGrainElems), [&](int64_t begin, int64_t end) {
    saferlhf::cpu::kl_penalized_rewards(r, c, lp, ref, m, t, static_cast<float>(kl_coeff),
                                        static_cast<float>(clip_range_score), out_r, out_c, begin, end);
  });
  return {rewards, costs};
}

}  // namespace saferlhf::binding::cpu_ops

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("logprobs_forward", &saferlhf::binding::cpu_ops::logprobs_forward);
  m.impl("logprobs_backward", &saferlhf::binding::cpu_ops::logprobs_backward);
  m.impl("gae_forward", &saferlhf::binding::cpu_ops::gae_forward);
  m.impl("ppo_clip_objective", &saferlhf::binding::cpu_ops::ppo_clip_objective);
  m.impl("clipped_value_objective", &saferlhf::binding::cpu_ops::clipped_value_objective);
  m.impl("kl_penalized_rewards", &saferlhf::binding::cpu_ops::kl_penalized_rewards);
}
// END CPU IMPL

#ifdef SAFERLHF_WITH_CUDA
// ---- CUDA implementations (tensor checks + current stream, calling kernels_cuda.h) ----
// BEGIN CUDA IMPL
// c10's stream API (at::cuda::getCurrentCUDAStream is the same function re-exported by ATen/cuda/CUDAContext.h,
// which would also pull in cuSPARSE / cuBLAS headers that a pip-only CUDA toolkit does not have).
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <tuple>

#include "kernels_cuda.h"

namespace saferlhf::binding::cuda_ops {

using at::Tensor;

void check_on(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "saferlhf: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "saferlhf: ", name, " is on ", t.device(), ", expected ", ref.device());
}

// fp32, contiguous, given shape, on ref's device.
void check_f32(const Tensor& t, const char* name, at::IntArrayRef shape, const Tensor& ref) {
  check_on(t, name, ref);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "saferlhf: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "saferlhf: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "saferlhf: ", name, " must be contiguous");
}

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "saferlhf: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, "saferlhf: ", name, " must be [R, T], got ", t.sizes());
  check_f32(t, name, t.sizes(), t);
}

void check_labels(const Tensor& labels, int64_t n, const Tensor& ref) {
  check_on(labels, "labels", ref);
  TORCH_CHECK(labels.scalar_type() == at::kLong, "saferlhf: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n, "saferlhf: labels must be [", n, "], got ", labels.sizes());
  TORCH_CHECK(labels.is_contiguous(), "saferlhf: labels must be contiguous");
}

saferlhf::ScalarKind check_logits(const Tensor& logits, const char* name) {
  TORCH_CHECK(logits.is_cuda(), "saferlhf: ", name, " must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "saferlhf: ", name, " must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, "saferlhf: ", name, " must have stride(1) == 1");
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, "saferlhf: ", name, " must have at least one column");
  switch (logits.scalar_type()) {
    case at::kFloat:
      return saferlhf::ScalarKind::kFloat32;
    case at::kBFloat16:
      return saferlhf::ScalarKind::kBFloat16;
    case at::kHalf:
      return saferlhf::ScalarKind::kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "saferlhf: ", name, " must be float32 / bfloat16 / float16, got ", logits.scalar_type());
  return saferlhf::ScalarKind::kFloat32;  // unreachable
}

std::tuple<Tensor, Tensor, Tensor> logprobs_forward(const Tensor& logits, const Tensor& labels, double temperature,
                                                    int64_t ignore_index, bool with_entropy) {
  const auto kind = check_logits(logits, "logits");
  const int64_t n = logits.size(0), v = logits.size(1);
  check_labels(labels, n, logits);
  TORCH_CHECK(temperature > 0.0, "saferlhf: temperature must be > 0, got ", temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts), entropy = at::empty({n}, opts);
  // The kernel writes entropy = 0 when with_entropy is false.
  saferlhf::cuda::logprobs_forward(logits.data_ptr(), kind, n, v, logits.stride(0), labels.data_ptr<int64_t>(),
                                   static_cast<float>(temperature), ignore_index, with_entropy,
                                   logp.data_ptr<float>(), lse.data_ptr<float>(), entropy.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream());
  return {logp, lse, entropy};
}

void logprobs_backward(const Tensor& grad_logp, const std::optional<Tensor>& grad_entropy, const Tensor& logits,
                       const Tensor& labels, const Tensor& lse, const Tensor& entropy, double temperature,
                       int64_t ignore_index, const Tensor& grad_logits) {
  const auto kind = check_logits(logits, "logits");
  const int64_t n = logits.size(0), v = logits.size(1);
  check_labels(labels, n, logits);
  check_f32(grad_logp, "grad_logp", {n}, logits);
  const bool has_ge = grad_entropy.has_value() && grad_entropy->defined();
  if (has_ge) check_f32(*grad_entropy, "grad_entropy", {n}, logits);
  check_f32(lse, "lse", {n}, logits);
  check_f32(entropy, "entropy", {n}, logits);
  check_on(grad_logits, "grad_logits", logits);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type(),
              "saferlhf: grad_logits must have the shape and dtype of logits");
  TORCH_CHECK(v <= 1 || grad_logits.stride(1) == 1, "saferlhf: grad_logits must have stride(1) == 1");
  TORCH_CHECK(temperature > 0.0, "saferlhf: temperature must be > 0, got ", temperature);
  at::assert_no_internal_overlap(grad_logits);
  at::assert_no_partial_overlap(grad_logits, logits);  // the very same tensor (in place) is fine
  const c10::cuda::CUDAGuard guard(logits.device());
  saferlhf::cuda::logprobs_backward(grad_logp.data_ptr<float>(), has_ge ? grad_entropy->data_ptr<float>() : nullptr,
                                    logits.data_ptr(), kind, n, v, logits.stride(0), labels.data_ptr<int64_t>(),
                                    lse.data_ptr<float>(), entropy.data_ptr<float>(), static_cast<float>(temperature),
                                    ignore_index, grad_logits.data_ptr(), grad_logits.stride(0),
                                    c10::cuda::getCurrentCUDAStream());
}

std::tuple<Tensor, Tensor> gae_forward(const Tensor& rewards, const Tensor& values, const Tensor& mask, double gamma,
                                       double lam) {
  check_rows(rewards, "rewards");
  check_f32(values, "values", rewards.sizes(), rewards);
  saferlhf::binding::check_gae_mask(mask, rewards.device(), rewards.size(0), rewards.size(1));
  const c10::cuda::CUDAGuard guard(rewards.device());
  Tensor adv = at::empty_like(rewards), ret = at::empty_like(rewards);
  saferlhf::cuda::gae_forward(rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr(),
                              mask.scalar_type() == at::kBool, mask.size(0), rewards.size(0), rewards.size(1),
                              static_cast<float>(gamma), static_cast<float>(lam), adv.data_ptr<float>(),
                              ret.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return {adv, ret};
}

std::tuple<Tensor, Tensor> ppo_clip_objective(const Tensor& logprobs, const Tensor& old_logprobs,
                                              const Tensor& reward_advantages,
                                              const std::optional<Tensor>& cost_advantages, const Tensor& mask,
                                              double multiplier, double clip_range) {
  check_rows(logprobs, "logprobs");
  check_f32(old_logprobs, "old_logprobs", logprobs.sizes(), logprobs);
  check_f32(reward_advantages, "reward_advantages", logprobs.sizes(), logprobs);
  const bool has_cost = cost_advantages.has_value() && cost_advantages->defined();
  if (has_cost) check_f32(*cost_advantages, "cost_advantages", logprobs.sizes(), logprobs);
  check_f32(mask, "mask", logprobs.sizes(), logprobs);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  const int64_t rows = logprobs.size(0), t = logprobs.size(1);
  Tensor row_loss = at::empty({rows}, logprobs.options()), grad = at::empty_like(logprobs);
  saferlhf::cuda::ppo_clip_objective(logprobs.data_ptr<float>(), old_logprobs.data_ptr<float>(),
                                     reward_advantages.data_ptr<float>(),
                                     has_cost ? cost_advantages->data_ptr<float>() : nullptr, mask.data_ptr<float>(),
                                     rows, t, static_cast<float>(multiplier), static_cast<float>(clip_range),
                                     row_loss.data_ptr<float>(), grad.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream());
  return {row_loss, grad};
}

std::tuple<Tensor, Tensor> clipped_value_objective(const Tensor& values, const Tensor& old_values,
                                                   const Tensor& returns, const Tensor& mask, double clip_range) {
  check_rows(values, "values");
  check_f32(old_values, "old_values", values.sizes(), values);
  check_f32(returns, "returns", values.sizes(), values);
  check_f32(mask, "mask", values.sizes(), values);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = values.size(0), t = values.size(1);
  Tensor row_loss = at::empty({rows}, values.options()), grad = at::empty_like(values);
  saferlhf::cuda::clipped_value_objective(values.data_ptr<float>(), old_values.data_ptr<float>(),
                                          returns.data_ptr<float>(), mask.data_ptr<float>(), rows, t,
                                          static_cast<float>(clip_range), row_loss.data_ptr<float>(),
                                          grad.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  return {row_loss, grad};
}

std::tuple<Tensor, Tensor> kl_penalized_rewards(const Tensor& reward, const Tensor& cost, const Tensor& logprobs,
                                                const Tensor& ref_logprobs, const Tensor& mask, double kl_coeff,
                                                double clip_range_score) {
  check_rows(logprobs, "logprobs");
  const int64_t rows = logprobs.size(0), t = logprobs.size(1);
  check_f32(reward, "reward", {rows}, logprobs);
  check_f32(cost, "cost", {rows}, logprobs);
  check_f32(ref_logprobs, "ref_logprobs", logprobs.sizes(), logprobs);
  check_f32(mask, "mask", logprobs.sizes(), logprobs);
  const c10::cuda::CUDAGuard guard(logprobs.device());
  Tensor rewards = at::empty_like(logprobs), costs = at::empty_like(logprobs);
  saferlhf::cuda::kl_penalized_rewards(reward.data_ptr<float>(), cost.data_ptr<float>(), logprobs.data_ptr<float>(),
                                       ref_logprobs.data_ptr<float>(), mask.data_ptr<float>(), rows, t,
                                       static_cast<float>(kl_coeff), static_cast<float>(clip_range_score),
                                       rewards.data_ptr<float>(), costs.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream());
  return {rewards, costs};
}

}  // namespace saferlhf::binding::cuda_ops

TORCH_LIBRARY_IMPL(saferlhf, CUDA, m) {
  m.impl("logprobs_forward", &saferlhf::binding::cuda_ops::logprobs_forward);
  m.impl("logprobs_backward", &saferlhf::binding::cuda_ops::logprobs_backward);
  m.impl("gae_forward", &saferlhf::binding::cuda_ops::gae_forward);
  m.impl("ppo_clip_objective", &saferlhf::binding::cuda_ops::ppo_clip_objective);
  m.impl("clipped_value_objective", &saferlhf::binding::cuda_ops::clipped_value_objective);
  m.impl("kl_penalized_rewards", &saferlhf::binding::cuda_ops::kl_penalized_rewards);
}
// END CUDA IMPL
#endif

// The op set's version: saferlhf_fast/_backend.py refuses a build whose version differs (a stale build after a
// change of schemas or ops), with one line saying how to rebuild.  Raise it with every change to an op schema.
#define SAFERLHF_API_VERSION 2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "saferlhf-fast C++/CUDA kernels (registered as torch.ops.saferlhf.*)";
  module.attr("api_version") = SAFERLHF_API_VERSION;
#ifdef SAFERLHF_WITH_CUDA
  module.attr("cuda_built") = true;
#else
  module.attr("cuda_built") = false;
#endif
}
