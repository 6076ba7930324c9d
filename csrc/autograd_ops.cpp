// Differentiable fused decoder ops for CPU training (fp32; the layer ops also bf16): the kernels of layer_ops.cpp
// and attention_ops.cpp behind autograd nodes written in C++, five torch ops:
//
//   saferlhf::rope(q [B, L, Hq, d], k [B, L, Hk, d], cos [Bc, L, d], sin_signed [Bc, L, d]) -> (q_out, k_out)
//   saferlhf::swiglu(gate [..., I], up [..., I]) -> silu(gate) * up
//   saferlhf::rms_norm(x [..., H], weight [H], eps) -> x * rsqrt(mean(x^2, -1) + eps) * weight
//   saferlhf::add_rms_norm(x [..., H], residual [..., H], weight [H], eps) -> (s = x + residual, rms_norm(s))
//   saferlhf::attention(q [B, L, Hq, D], k [B, L, Hk, D], v [B, L, Hk, D], cu_seqlens?, scale, window)
//       -> out [B, L, Hq, D]
//
// Math and numerics: exactly those of the *_forward / *_backward ops they call (see those files); gradients flow to
// q / k (rope: not to the tables), gate / up, x / weight, and q / k / v.  Each gradient has its input's dtype:
// add_rms_norm's kernel returns the gradient of the sum (in the sum's dtype), cast here for x and for residual when
// theirs differs (bf16 x + fp32 residual: fp32 sum, bf16 gradient of x).
//
// Why: the same nodes as Python torch.autograd.Functions pay interpreter overhead per op and step (forward +
// backward); a decoder layer has five of them.  The Python wrappers (saferlhf_fast/ops/layers.py,
// models/attention.py) keep the eligibility checks and the torch references.
//
// torch-dependent on purpose (named *_ops.cpp, not *_cpu.cpp, so the torch-free CMake core does not glob it).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace saferlhf::autograd {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// One dispatcher handle per kernel op, looked up on first use (the ops live in other translation units).
#define SAFERLHF_KERNEL(fn, name, ...)                                                                     \
  inline const auto& fn() {                                                                                \
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<__VA_ARGS__>(); \
    return op;                                                                                             \
  }

SAFERLHF_KERNEL(rope_forward, "saferlhf::rope_forward",
                std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&))
SAFERLHF_KERNEL(rope_backward, "saferlhf::rope_backward",
                std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&))
SAFERLHF_KERNEL(swiglu_forward, "saferlhf::swiglu_forward", Tensor(const Tensor&, const Tensor&))
SAFERLHF_KERNEL(swiglu_backward, "saferlhf::swiglu_backward",
                std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&))
SAFERLHF_KERNEL(rms_norm_forward, "saferlhf::rms_norm_forward",
                std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double))
SAFERLHF_KERNEL(rms_norm_backward, "saferlhf::rms_norm_backward",
                std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&))
SAFERLHF_KERNEL(add_rms_norm_forward, "saferlhf::add_rms_norm_forward",
                std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double))
SAFERLHF_KERNEL(add_rms_norm_backward, "saferlhf::add_rms_norm_backward",
                std::tuple<Tensor, Tensor>(const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
                                           const Tensor&))
SAFERLHF_KERNEL(attention_forward, "saferlhf::attention_forward",
                std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                           double, int64_t))
SAFERLHF_KERNEL(attention_backward, "saferlhf::attention_backward",
                std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, const Tensor&, const std::optional<Tensor>&, double,
                                                   int64_t))
#undef SAFERLHF_KERNEL

// An incoming gradient autograd left undefined (that output was not used) is zeros.  Layouts are the kernels'
// business: layer_ops.cpp reads any strides with a contiguous last dim (copying otherwise); attention_backward needs
// a contiguous head dim (made below).
inline Tensor grad_or_zeros(const Tensor& g, const Tensor& like) { return g.defined() ? g : at::zeros_like(like); }

inline Tensor grad_or_zeros(const Tensor& g, c10::IntArrayRef shape, const at::TensorOptions& options) {
  return g.defined() ? g : at::zeros(shape, options);
}

// g in dtype t (autograd hands a node gradients in its outputs' dtypes; this guards the kernels' dtype checks).
inline Tensor as_dtype(const Tensor& g, at::ScalarType t) { return g.scalar_type() == t ? g : g.to(t); }

// ------------------------------------------------------------------------------------------------------- rope
class RopeFunction : public torch::autograd::Function<RopeFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& cos,
                             const Tensor& sin_signed) {
    auto [q_out, k_out] = rope_forward().call(q, k, cos, sin_signed);
    ctx->save_for_backward({cos, sin_signed});
    ctx->saved_data["q_shape"] = q.sizes().vec();  // shapes and dtype only: zeros for an unused output's gradient
    ctx->saved_data["k_shape"] = k.sizes().vec();
    ctx->saved_data["dtype"] = q.scalar_type();
    return {q_out, k_out};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::ScalarType dtype = ctx->saved_data["dtype"].toScalarType();
    const auto options = saved[0].options().dtype(dtype);
    auto [dq, dk] = rope_backward().call(
        as_dtype(grad_or_zeros(grads[0], ctx->saved_data["q_shape"].toIntVector(), options), dtype),
        as_dtype(grad_or_zeros(grads[1], ctx->saved_data["k_shape"].toIntVector(), options), dtype), saved[0],
        saved[1]);
    return {dq, dk, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> rope_autograd(const Tensor& q, const Tensor& k, const Tensor& cos,
                                         const Tensor& sin_signed) {
  TORCH_CHECK(!cos.requires_grad() && !sin_signed.requires_grad(),
              "saferlhf::rope gives cos / sin_signed no gradient; they must not require one");
  auto out = RopeFunction::apply(q, k, cos, sin_signed);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> rope_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin_signed) {
  return rope_forward().call(q, k, cos, sin_signed);
}

// ----------------------------------------------------------------------------------------------------- swiglu
class SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& gate, const Tensor& up) {
    ctx->save_for_backward({gate, up});
    return swiglu_forward().call(gate, up);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dgate, dup] = swiglu_backward().call(as_dtype(grads[0], saved[0].scalar_type()), saved[0], saved[1]);
    return {ctx->needs_input_grad(0) ? dgate : Tensor(), ctx->needs_input_grad(1) ? dup : Tensor()};
  }
};

Tensor swiglu_autograd(const Tensor& gate, const Tensor& up) { return SwiGLUFunction::apply(gate, up); }

Tensor swiglu_cpu(const Tensor& gate, const Tensor& up) { return swiglu_forward().call(gate, up); }

// --------------------------------------------------------------------------------------------------- rms_norm
class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, double eps) {
    auto [y, rstd] = rms_norm_forward().call(x, weight, eps);
    ctx->save_for_backward({x, weight, rstd});
    return y;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::ScalarType y_dtype = at::promote_types(saved[0].scalar_type(), saved[1].scalar_type());
    auto [dx, dweight] = rms_norm_backward().call(as_dtype(grads[0], y_dtype), saved[0], saved[1], saved[2]);
    return {ctx->needs_input_grad(0) ? dx : Tensor(), ctx->needs_input_grad(1) ? dweight : Tensor(), Tensor()};
  }
};

Tensor rms_norm_autograd(const Tensor& x, const Tensor& weight, double eps) {
  return RMSNormFunction::apply(x, weight, eps);
}

Tensor rms_norm_cpu(const Tensor& x, const Tensor& weight, double eps) {
  return std::get<0>(rms_norm_forward().call(x, weight, eps));
}

// ----------------------------------------------------------------------------------------------- add_rms_norm
// (sum, y) = (x + residual, rms_norm(x + residual) weight): the pre-norm residual add fused into the norm.  Both
// outputs are used (sum is the residual stream), so the backward gets dy and, usually, dsum; x and residual both
// receive dsum + the norm's dx.
class AddRMSNormFunction : public torch::autograd::Function<AddRMSNormFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& residual, const Tensor& weight,
                             double eps) {
    auto [sum, y, rstd] = add_rms_norm_forward().call(x, residual, weight, eps);
    ctx->save_for_backward({sum, weight, rstd});
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["residual_dtype"] = residual.scalar_type();
    ctx->saved_data["y_dtype"] = y.scalar_type();
    return {sum, y};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& sum = saved[0];
    const at::ScalarType y_dtype = ctx->saved_data["y_dtype"].toScalarType();
    std::optional<Tensor> dsum;
    if (grads[0].defined()) dsum = as_dtype(grads[0], sum.scalar_type());
    const Tensor dy = as_dtype(grad_or_zeros(grads[1], sum.sizes(), sum.options().dtype(y_dtype)), y_dtype);
    auto [dsum_total, dweight] = add_rms_norm_backward().call(dy, dsum, sum, saved[1], saved[2]);
    // x and residual both receive the sum's gradient, each in its own dtype
    const auto grad_as = [&](int i, const char* dtype) {
      return ctx->needs_input_grad(i) ? as_dtype(dsum_total, ctx->saved_data[dtype].toScalarType()) : Tensor();
    };
    return {grad_as(0, "x_dtype"), grad_as(1, "residual_dtype"), ctx->needs_input_grad(2) ? dweight : Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor> add_rms_norm_autograd(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                                 double eps) {
  auto out = AddRMSNormFunction::apply(x, residual, weight, eps);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> add_rms_norm_cpu(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                            double eps) {
  auto [sum, y, rstd] = add_rms_norm_forward().call(x, residual, weight, eps);
  return {sum, y};
}

// -------------------------------------------------------------------------------------------------- attention
class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const std::optional<Tensor>& cu_seqlens, double scale, int64_t window) {
    auto [out, lse] = attention_forward().call(q, k, v, cu_seqlens, scale, window);
    ctx->save_for_backward({q, k, v, out, lse});
    if (cu_seqlens.has_value()) ctx->saved_data["cu_seqlens"] = *cu_seqlens;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    return out;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto s = ctx->get_saved_variables();
    std::optional<Tensor> cu;
    if (ctx->saved_data.count("cu_seqlens")) cu = ctx->saved_data["cu_seqlens"].toTensor();
    Tensor dout = grad_or_zeros(grads[0], s[3]);
    if (dout.stride(-1) != 1) dout = dout.contiguous();
    auto [dq, dk, dv] = attention_backward().call(dout, s[0], s[1], s[2], s[3], s[4], cu,
                                                  ctx->saved_data["scale"].toDouble(),
                                                  ctx->saved_data["window"].toInt());
    return {dq, dk, dv, Tensor(), Tensor(), Tensor()};
  }
};

Tensor attention_autograd(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens,
                          double scale, int64_t window) {
  return AttentionFunction::apply(q, k, v, cu_seqlens, scale, window);
}

Tensor attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens,
                     double scale, int64_t window) {
  return std::get<0>(attention_forward().call(q, k, v, cu_seqlens, scale, window));
}

}  // namespace saferlhf::autograd

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin_signed) -> (Tensor, Tensor)");
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("rope", &saferlhf::autograd::rope_cpu);
  m.impl("swiglu", &saferlhf::autograd::swiglu_cpu);
  m.impl("rms_norm", &saferlhf::autograd::rms_norm_cpu);
  m.impl("add_rms_norm", &saferlhf::autograd::add_rms_norm_cpu);
  m.impl("attention", &saferlhf::autograd::attention_cpu);
}

TORCH_LIBRARY_IMPL(saferlhf, Autograd, m) {
  m.impl("rope", &saferlhf::autograd::rope_autograd);
  m.impl("swiglu", &saferlhf::autograd::swiglu_autograd);
  m.impl("rms_norm", &saferlhf::autograd::rms_norm_autograd);
  m.impl("add_rms_norm", &saferlhf::autograd::add_rms_norm_autograd);
  m.impl("attention", &saferlhf::autograd::attention_autograd);
}
