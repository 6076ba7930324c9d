// The decoder's dense projection on oneDNN with its autograd in C++, one torch op:
//
//   saferlhf::onednn_linear(x [..., K], weight [N, K], bias [N]?, forward_weight) -> y [..., N]
//
// x, weight, bias and forward_weight share one dtype, fp32 or bf16 (oneDNN's bf16 matmul: bf16 operands, fp32
// accumulation, output rounded to bf16; the bf16 mixed-precision path of saferlhf_fast/ops/dense.py).
// Math: y = x @ weight.T + bias.  Backward (rows flattened to [M, K] / [M, N]):
//   dx = dy @ weight   (oneDNN on the strided view weight.T, no copy),
//   dW = dy.T @ x      (torch.mm: MKL's sgemm is the faster one for this transposed-left product),
//   db = sum_rows dy.
// `forward_weight` is what the forward multiplies by: `weight` itself, or oneDNN's blocked copy of it
// (mkldnn::_reorder_linear_weight) for a frozen weight; the backward always uses the plain `weight`.
//
// Why C++: the same three products driven from a Python torch.autograd.Function pay interpreter and autograd-node
// overhead per projection (forward + backward); here the node is a C++ torch::autograd::Function and the forward
// is one op call.
// The Python side (saferlhf_fast/ops/dense.py) decides eligibility (fp32 CPU plain tensors, no autocast, oneDNN
// present) and keeps F.linear as the reference and fallback.
//
// torch-dependent on purpose (named *_ops.cpp, not *_cpu.cpp, so the torch-free CMake core does not glob it).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <optional>
#include <string_view>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace saferlhf::linear {

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

// ------------------------------------------------------------------------------------------------- transpose
// dst [N, M] = src [M, N]^T for fp32 or bf16 row-major matrices with row strides lds / ldd, in tiles of 16 x 16.
#if defined(__AVX512F__)
// One 16 x 16 tile in registers: three interleave stages (32-, 64-, 128-bit) and a final 256-bit one.
inline void transpose_tile16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ldd, r[k]);  // r[k] = column k of the tile
}
#endif

template <typename T>
void transpose_block(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (rows == 16 && cols == 16) return transpose_tile16(src, lds, dst, ldd);
  }
#endif
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}

template <typename T>
void transpose_into(const T* sp, int64_t M, int64_t N, int64_t lds, T* dp) {
  // Blocks of kB x kB (64 KiB read + 64 KiB written in fp32: L2-resident), each walked in 16 x 16 tiles.
  constexpr int64_t kT = 16, kB = 128;
  const int64_t row_blocks = (M + kB - 1) / kB, col_blocks = (N + kB - 1) / kB;
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = (b % row_blocks) * kB, j0 = (b / row_blocks) * kB;
      const int64_t i1 = std::min(M, i0 + kB), j1 = std::min(N, j0 + kB);
      for (int64_t j = j0; j < j1; j += kT)
        for (int64_t i = i0; i < i1; i += kT)
          transpose_block(sp + i * lds + j, lds, dp + j * M + i, M, std::min(kT, i1 - i), std::min(kT, j1 - j));
    }
  });
}

// Why not x.t().contiguous(): torch's strided copy moves ~4-5 GB/s here; the 16 x 16 register tiles several times
// that, which is what makes a transposed copy cheaper than MKL's slower transposed-left product (see backward).
Tensor transpose_2d(const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.dim() == 2,
              "transpose_2d: a 2-D fp32 or bf16 CPU tensor expected, got ", x.sizes(), " ", x.scalar_type());
  const Tensor src = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t M = src.size(0), N = src.size(1), lds = src.stride(0);
  Tensor out = at::empty({N, M}, src.options());
  if (M == 0 || N == 0) return out;
  if (src.scalar_type() == at::kFloat) {
    transpose_into(src.data_ptr<float>(), M, N, lds, out.data_ptr<float>());
  } else {  // bf16 moved as raw 16-bit words
    transpose_into(reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>()), M, N, lds,
                   reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  }
  return out;
}

void check(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& forward_weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "onednn_linear: CPU tensors expected");
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && weight.scalar_type() == dtype &&
                  forward_weight.scalar_type() == dtype,
              "onednn_linear: x, weight and forward_weight must share a dtype, fp32 or bf16; got ", dtype, ", ",
              weight.scalar_type(), " and ", forward_weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "onednn_linear: x ", x.sizes(),
              " does not match weight ", weight.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == dtype),
              "onednn_linear: bias must be [", weight.size(0), "] in the dtype of x");
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
    // dW = dy.T @ x as oneDNN's A @ B.T with A = dy.T made contiguous and B = x.T a strided view (fast for the
    // weight operand): faster than MKL's dy.t().mm(x), transposed copy included.
    if (ctx->needs_input_grad(1)) dw = linear_pointwise(transpose_2d(dy), x2d.t(), std::nullopt);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db, Tensor()};
  }
};

// Autograd kernel: records one C++ node when a gradient is needed.
Tensor onednn_linear_autograd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                              const Tensor& forward_weight) {
  TORCH_CHECK(forward_weight.defined(), "onednn_linear: forward_weight is undefined");
  check(x, weight, bias, forward_weight);
  const Tensor x2d = rows_of(x);
  const Tensor y2d = LinearFunction::apply(x2d, weight, bias, forward_weight);
  return to_output_shape(y2d, x, weight.size(0));
}

// CPU kernel (below autograd: no gradient recorded).
Tensor onednn_linear_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                         const Tensor& forward_weight) {
  TORCH_CHECK(forward_weight.defined(), "onednn_linear: forward_weight is undefined");
  check(x, weight, bias, forward_weight);
  return to_output_shape(linear_pointwise(rows_of(x), forward_weight, bias), x, weight.size(0));
}

}  // namespace saferlhf::linear

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("onednn_linear(Tensor x, Tensor weight, Tensor? bias, Tensor forward_weight) -> Tensor");
  m.def("transpose_2d(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("onednn_linear", &saferlhf::linear::onednn_linear_cpu);
  m.impl("transpose_2d", &saferlhf::linear::transpose_2d);
}

TORCH_LIBRARY_IMPL(saferlhf, Autograd, m) { m.impl("onednn_linear", &saferlhf::linear::onednn_linear_autograd); }
