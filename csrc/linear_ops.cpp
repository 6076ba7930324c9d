// The decoder's dense projection on oneDNN with its autograd in C++, one torch op:
//
//   saferlhf::onednn_linear(x [..., K], weight [N, K], bias [N]?, forward_weight) -> y [..., N]
//
// Math: y = x @ weight.T + bias.  Backward (rows flattened to [M, K] / [M, N]):
//   dx = dy @ weight   (oneDNN on the strided view weight.T, no copy),
//   dW = dy.T @ x      (torch.mm: MKL's sgemm is the faster one for this transposed-left product),
//   db = sum_rows dy.
// `forward_weight` is what the forward multiplies by: `weight` itself, or oneDNN's blocked copy of it
// (mkldnn::_reorder_linear_weight) for a frozen weight; the backward always uses the plain `weight`.
//
// Why C++: the same three products driven from a Python torch.autograd.Function cost ~60 us of interpreter and
// autograd-node overhead per projection (forward + backward), ~2.5 ms per training step of the 6-layer benchmark
// model; here the node is a C++ torch::autograd::Function and the forward is one op call.
// The Python side (saferlhf_fast/ops/dense.py) decides eligibility (fp32 CPU plain tensors, no autocast, oneDNN
// present) and keeps F.linear as the reference and fallback.
//
// torch-dependent on purpose (named *_ops.cpp, not *_cpu.cpp, so the torch-free CMake core does not glob it).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>

namespace saferlhf_linear {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm): oneDNN's X @ W.T + B on a plain, strided or
// blocked W.  Looked up once through the dispatcher (torch does not export a C++ declaration of it).
Tensor linear_pointwise(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                           c10::string_view, c10::List<std::optional<at::Scalar>>,
                                           std::optional<c10::string_view>)>();
  return op.call(x, w, b, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

void check(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& forward_weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "onednn_linear: CPU tensors expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "onednn_linear: fp32 x and weight expected, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "onednn_linear: x ", x.sizes(),
              " does not match weight ", weight.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == at::kFloat),
              "onednn_linear: bias must be fp32 [", weight.size(0), "]");
  TORCH_CHECK(forward_weight.defined(), "onednn_linear: forward_weight is undefined");
}

// [..., K] -> [M, K] contiguous (a view when the layout allows).
Tensor rows_of(const Tensor& x) {
  Tensor x2d = x.reshape({-1, x.size(-1)});
  return x2d.is_contiguous() ? x2d : x2d.contiguous();
}

Tensor to_output_shape(const Tensor& y2d, const Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y2d.view(shape);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  // x2d [M, K] contiguous.
  static Tensor forward(AutogradContext* ctx, const Tensor& x2d, const Tensor& weight,
                        const std::optional<Tensor>& bias, const Tensor& forward_weight) {
    ctx->save_for_backward({x2d, weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    return linear_pointwise(x2d, forward_weight, bias);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x2d = saved[0];
    const Tensor& weight = saved[1];
    Tensor dy = grads[0];
    if (!dy.is_contiguous()) dy = dy.contiguous();
    Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) dx = linear_pointwise(dy, weight.t(), std::nullopt);
    if (ctx->needs_input_grad(1)) dw = dy.t().mm(x2d);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db, Tensor()};
  }
};

// Autograd kernel: records one C++ node when a gradient is needed.
Tensor onednn_linear_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                              const Tensor& forward_weight) {
  check(x, weight, bias, forward_weight);
  const Tensor x2d = rows_of(x);
  const Tensor y2d = LinearFunction::apply(x2d, weight, bias, forward_weight);
  return to_output_shape(y2d, x, weight.size(0));
}

// CPU kernel (below autograd: no gradient recorded).
Tensor onednn_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                         const Tensor& forward_weight) {
  check(x, weight, bias, forward_weight);
  return to_output_shape(linear_pointwise(rows_of(x), forward_weight, bias), x, weight.size(0));
}

}  // namespace saferlhf_linear

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("onednn_linear(Tensor x, Tensor weight, Tensor? bias, Tensor forward_weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) { m.impl("onednn_linear", &saferlhf_linear::onednn_linear_cpu); }

TORCH_LIBRARY_IMPL(saferlhf, Autograd, m) { m.impl("onednn_linear", &saferlhf_linear::onednn_linear_autograd); }
