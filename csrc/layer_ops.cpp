// Elementwise layer ops of the Llama decoder for CPU training (fp32 and bf16), forward and backward, eight torch
// ops:
//
//   saferlhf::rope_forward(q [B, L, Hq, d], k [B, L, Hk, d], cos [Bc, L, d], sin_signed [Bc, L, d])
//       -> (q_out [B, L, Hq, d], k_out [B, L, Hk, d])
//   saferlhf::rope_backward(dq_out, dk_out, cos, sin_signed) -> (dq, dk)
//   saferlhf::swiglu_forward(gate [..., I], up [..., I]) -> out [..., I]
//   saferlhf::swiglu_backward(dout, gate, up) -> (dgate, dup)
//   saferlhf::rms_norm_forward(x [..., H], weight [H], eps) -> (y [..., H], rstd [N])      (N = numel / H)
//   saferlhf::rms_norm_backward(dy, x, weight, rstd) -> (dx, dweight [H])
//   saferlhf::add_rms_norm_forward(x, residual, weight, eps) -> (sum = x + residual, y = rms_norm(sum), rstd)
//   saferlhf::add_rms_norm_backward(dy, dsum?, sum, weight, rstd) -> (dx + dsum, dweight)
//
// Math:
//   RoPE, per head vector x (d even, half = d / 2), Bc == B or 1 (cos / sin broadcast over the batch):
//     out[i] = x[i] cos[i] + x[(i + half) % d] sin_signed[i]          (= x * cos + roll(x, half) * sin_signed)
//     dx[i]  = dout[i] cos[i] + dout[(i + half) % d] sin_signed[(i + half) % d]
//                                                                      (= dout * cos + roll(dout * sin_signed, half))
//     Two separate products and one add, each rounded to fp32, never an fma: the forward is bit-identical to that
//     torch expression (this file includes fp_contract_off.h first, so the compiler cannot contract them either).
//   SwiGLU: s = sigmoid(gate), out = (gate s) up;  dgate = dout up s (1 + gate (1 - s)),  dup = dout (gate s).
//     sigmoid uses only exp of non-positive arguments (exp_nonpos, <= 1.05 ulp): e = exp(-|x|),
//     s = 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0; out is within a few ulp of F.silu(gate) * up.
//   RMSNorm: rstd = 1 / sqrt(mean(x^2) + eps), y = (x rstd) weight;  with xhat = x rstd, g = dy weight:
//     dx = rstd (g - xhat mean(g xhat)),  dweight = sum_rows dy xhat.
//   Fused pre-norm residual add (the decoder's `h = x + a; y = norm(h)`): sum = x + residual, one fp32 add
//     (torch's, bit for bit), normalised as above; backward returns the gradient of sum, the norm's dx plus the
//     gradient dsum that sum gets from the residual stream (x and residual both receive it).
//
// Dtypes: every tensor argument is fp32 or bf16 (rstd always fp32); bf16 is read exactly as fp32, all arithmetic and
// accumulation is fp32, and each output is rounded once (to nearest-even, as c10::BFloat16) to the dtype torch's
// type promotion gives the reference expression:
//   rope: q, k of one dtype E, cos / sin_signed of one dtype (either) -> outputs and gradients E.  With bf16 q / k
//     the result is the fp32 expression on the upcast inputs, rounded once (the bf16 torch expression also rounds
//     the tables and each product).
//   swiglu: gate, up and dout of one dtype E -> E.
//   norms: sum = x + residual has S = promote(x, residual) (S = x's dtype for rms_norm), y has promote(S, weight).
//     When S is bf16, xhat = x rstd is rounded to bf16 before it is scaled by weight (transformers' LlamaRMSNorm:
//     `weight * xhat.to(input_dtype)`); the backward treats that rounding as the identity, as autograd does.
//     The backward takes dy in y's dtype and dsum in S, returns dx in S and dweight in weight's dtype.
//
// Layout: q / k / cos / sin / dout may be strided views (the last dim contiguous; any other strides, e.g. a
// [B, L, H, d] view of a fused qkv projection output); swiglu / rms_norm inputs are seen as [N, I] / [N, H] rows
// (a view when the leading dims allow one, else a copy).  Outputs are new contiguous tensors.
// Threading: one at::parallel_for over rows ((b, l) rows for RoPE, with all heads of q and k in the same row) with a
// grain of ~kGrainElems elements; each direction reads and writes the data once.  dweight: fixed blocks of rows
// (their count depends on N only) each sum into their own fp32 partial row, then the partials are added in block
// order, so the result does not depend on the thread count.  All accumulation is fp32.
//
// torch-dependent on purpose (named *_ops.cpp, not *_cpu.cpp, so the torch-free CMake core does not glob it).
#include "fp_contract_off.h"  // first: no a * b + c -> fma contraction anywhere below (bit-exact RoPE)

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "simd_cpu.h"

namespace saferlhf::layers {

using at::Tensor;
using saferlhf::cpu::bf16;
using saferlhf::cpu::Vec;
using saferlhf::cpu::clamp_floor;
using saferlhf::cpu::exp_nonpos;

constexpr int W = Vec::kWidth;
// Elements per parallel chunk: these ops are memory-bound and each element costs a few ns at most, so a chunk
// smaller than this would not pay for waking a thread.
constexpr int64_t kGrainElems = 16384;

// ------------------------------------------------------------------------------------------------ element types
// E = float or bf16 (simd_cpu.h's bit-level bf16; Vec loads it exactly and stores it rounded to nearest-even).
template <class E>
constexpr at::ScalarType kScalar = std::is_same_v<E, float> ? at::kFloat : at::kBFloat16;

// Torch's type promotion restricted to {fp32, bf16}: fp32 if either is.
template <class A, class B>
using Promote = std::conditional_t<std::is_same_v<A, float> || std::is_same_v<B, float>, float, bf16>;

template <class E>
E* ptr(const Tensor& t) {
  if constexpr (std::is_same_v<E, float>)
    return t.data_ptr<float>();
  else
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>());
}

// Calls f(E{}) with E the element type of `s` (float or bf16; the checks below reject anything else).
template <class F>
decltype(auto) with_elem(at::ScalarType s, F&& f) {
  if (s == at::kBFloat16) return f(bf16{});
  return f(float{});
}

// ---------------------------------------------------------------------------------------------------- helpers
// Loads p[0, n) (n < W) zero padded / stores the first n lanes.  (bf16 lanes are widened one by one: exact, and it
// keeps GCC 12 from reporting its own vector intrinsics' undefined-register idiom as uninitialised.)
template <class E>
inline Vec load_n(const E* p, int64_t n) {
  alignas(64) float buf[W] = {};
  if constexpr (std::is_same_v<E, float>)
    std::copy(p, p + n, buf);
  else
    for (int64_t l = 0; l < n; ++l) buf[l] = saferlhf::cpu::Elem<E>::to_float(p[l]);
  return Vec::load(buf);
}

template <class E>
inline void store_n(Vec v, E* p, int64_t n) {
  alignas(64) E buf[W];
  v.store(buf);
  std::copy(buf, buf + n, p);
}

// v rounded to bf16 (nearest-even) and back: what `t.to(bfloat16)` of an fp32 tensor holds.
inline Vec round_bf16(Vec v) {
  alignas(64) bf16 buf[W];
  v.store(buf);
  return Vec::load(buf);
}

inline Vec div(Vec a, Vec b) {
#if defined(__AVX512F__)
  return Vec(_mm512_div_ps(a.v, b.v));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return Vec(_mm256_div_ps(a.v, b.v));
#else
  Vec r;
  for (int l = 0; l < W; ++l) r.v[l] = a.v[l] / b.v[l];
  return r;
#endif
}

inline float hsum(Vec v) {
  alignas(64) float b[W];
  v.store(b);
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += b[l];
  return s;
}

// sigmoid(x) from exp of a non-positive argument only: e = exp(-|x|) (clamped at kExpFloor, where it is 0);
// s = num / (1 + e) with num = 1 for x >= 0 (or NaN) and e for x < 0, selected exactly by zero_below.
inline Vec sigmoid(Vec x) {
  const Vec zero(0.0f), one(1.0f);
  const Vec e = exp_nonpos(clamp_floor(zero - Vec::max(x, zero - x)));
  const Vec num = Vec::zero_below(x, 0.0f, one) + (e - Vec::zero_below(x, 0.0f, e));
  return div(num, one + e);
}

// A CPU tensor of dtype fp32 or bf16.
inline void check_cpu_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_dtype(const char* op, const char* name, const Tensor& t, at::ScalarType expected,
                        const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must be ", expected, " (", why, "), got ",
              t.scalar_type());
}

inline Tensor last_dim_contiguous(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// [..., n] -> [rows, n] with a contiguous last dim (a view when the strides allow one).
inline Tensor as_rows(const Tensor& t, int64_t n) { return last_dim_contiguous(t.reshape({-1, n})); }

// ------------------------------------------------------------------------------------------------------- RoPE
// A [B, L, H, d] tensor with a contiguous last dim.
template <class E>
struct Heads {
  E* data;
  int64_t sb, sl, sh, H;
  E* at(int64_t b, int64_t t, int64_t h) const { return data + b * sb + t * sl + h * sh; }
};

template <class E>
Heads<E> heads_of(const Tensor& t) {
  return Heads<E>{ptr<E>(t), t.stride(0), t.stride(1), t.stride(2), t.size(2)};
}

// A [Bc, L, d] table (cos or sin), Bc == 1 broadcast over the batch.
template <class T>
struct Table {
  const T* data;
  int64_t sb, sl;
  const T* at(int64_t b, int64_t t) const { return data + b * sb + t * sl; }
};

template <class T>
Table<T> table_of(const Tensor& t) {
  return Table<T>{ptr<T>(t), t.size(0) == 1 ? 0 : t.stride(0), t.stride(1)};
}

// o[j] = x[j] c[j] + x[j + half] sa[j],  o[j + half] = x[j + half] c[j + half] + x[j] sb[j]  for j < half.
// Forward: sa = sin, sb = sin + half.  Backward: sa = sin + half, sb = sin.  (x * c and the other product are
// rounded separately, then added: the rounding of torch's x * cos + roll(x, half) * sin_signed.)
template <class E, class T>
inline void rotate(const E* x, const T* c, const T* sa, const T* sb, E* o, int64_t half) {
  int64_t j = 0;
  for (; j + W <= half; j += W) {
    const Vec lo = Vec::load(x + j), hi = Vec::load(x + j + half);
    (lo * Vec::load(c + j) + hi * Vec::load(sa + j)).store(o + j);
    (hi * Vec::load(c + j + half) + lo * Vec::load(sb + j)).store(o + j + half);
  }
  if (j < half) {
    const int64_t n = half - j;
    const Vec lo = load_n(x + j, n), hi = load_n(x + j + half, n);
    store_n(lo * load_n(c + j, n) + hi * load_n(sa + j, n), o + j, n);
    store_n(hi * load_n(c + j + half, n) + lo * load_n(sb + j, n), o + j + half, n);
  }
}

template <class E, class T>
void rope_rows(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin, Tensor& q_out, Tensor& k_out,
               bool backward) {
  const Heads<E> qi = heads_of<E>(q), ki = heads_of<E>(k), qo = heads_of<E>(q_out), ko = heads_of<E>(k_out);
  const Table<T> ct = table_of<T>(cos), st = table_of<T>(sin);
  const int64_t L = q.size(1), half = q.size(3) / 2;
  const int64_t sa_off = backward ? half : 0, sb_off = backward ? 0 : half;
  const int64_t grain = grain_rows((qi.H + ki.H) * 2 * half, kGrainElems);
  at::parallel_for(0, q.size(0) * L, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / L, t = r % L;
      const T* c = ct.at(b, t);
      const T* s = st.at(b, t);
      for (int64_t h = 0; h < qi.H; ++h) rotate(qi.at(b, t, h), c, s + sa_off, s + sb_off, qo.at(b, t, h), half);
      for (int64_t h = 0; h < ki.H; ++h) rotate(ki.at(b, t, h), c, s + sa_off, s + sb_off, ko.at(b, t, h), half);
    }
  });
}

std::tuple<Tensor, Tensor> rope_apply(const char* op, const Tensor& q_in, const Tensor& k_in, const Tensor& cos_in,
                                      const Tensor& sin_in, bool backward) {
  check_cpu_float(op, "q", q_in);
  check_cpu_float(op, "k", k_in);
  check_cpu_float(op, "cos", cos_in);
  check_cpu_float(op, "sin_signed", sin_in);
  check_dtype(op, "k", k_in, q_in.scalar_type(), "q's dtype");
  check_dtype(op, "sin_signed", sin_in, cos_in.scalar_type(), "cos's dtype");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, op, ": q and k must be [B, L, H, d], got ", q_in.sizes(), " and ",
              k_in.sizes());
  TORCH_CHECK(cos_in.dim() == 3 && sin_in.dim() == 3, op, ": cos and sin_signed must be [B or 1, L, d], got ",
              cos_in.sizes(), " and ", sin_in.sizes());
  const int64_t B = q_in.size(0), L = q_in.size(1), d = q_in.size(3);
  TORCH_CHECK(k_in.size(0) == B && k_in.size(1) == L && k_in.size(3) == d, op, ": k ", k_in.sizes(),
              " does not match q ", q_in.sizes(), " (same B, L and head dim expected)");
  TORCH_CHECK(d > 0 && d % 2 == 0, op, ": the head dim must be even and positive, got ", d);
  TORCH_CHECK(cos_in.sizes() == sin_in.sizes(), op, ": cos ", cos_in.sizes(), " and sin_signed ", sin_in.sizes(),
              " differ");
  TORCH_CHECK((cos_in.size(0) == B || cos_in.size(0) == 1) && cos_in.size(1) == L && cos_in.size(2) == d, op,
              ": cos / sin_signed ", cos_in.sizes(), " do not fit q ", q_in.sizes(), " (expected [", B, " or 1, ", L,
              ", ", d, "])");
  const Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const Tensor cos = last_dim_contiguous(cos_in), sin = last_dim_contiguous(sin_in);
  Tensor q_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor k_out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() + k.numel() == 0) return {q_out, k_out};
  with_elem(q.scalar_type(), [&](auto e) {
    with_elem(cos.scalar_type(), [&](auto t) {
      rope_rows<decltype(e), decltype(t)>(q, k, cos, sin, q_out, k_out, backward);
    });
  });
  return {q_out, k_out};
}

std::tuple<Tensor, Tensor> rope_forward(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
  return rope_apply("rope_forward", q, k, cos, sin, false);
}

std::tuple<Tensor, Tensor> rope_backward(const Tensor& dq_out, const Tensor& dk_out, const Tensor& cos,
                                         const Tensor& sin) {
  return rope_apply("rope_backward", dq_out, dk_out, cos, sin, true);
}

// ----------------------------------------------------------------------------------------------------- SwiGLU
void check_same(const char* op, const char* a, const Tensor& x, const char* b, const Tensor& y) {
  TORCH_CHECK(x.sizes() == y.sizes(), op, ": ", a, " ", x.sizes(), " and ", b, " ", y.sizes(), " must have the same "
              "shape");
}

template <class E>
void swiglu_rows(const Tensor& g2, const Tensor& u2, Tensor& out) {
  const int64_t I = g2.size(1);
  const E *gp = ptr<E>(g2), *upp = ptr<E>(u2);
  const int64_t gs = g2.stride(0), us = u2.stride(0);
  E* op_ = ptr<E>(out);
  at::parallel_for(0, g2.size(0), grain_rows(I, kGrainElems), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const E *g = gp + r * gs, *u = upp + r * us;
      E* o = op_ + r * I;
      int64_t j = 0;
      for (; j + W <= I; j += W) {
        const Vec x = Vec::load(g + j);
        ((x * sigmoid(x)) * Vec::load(u + j)).store(o + j);
      }
      if (j < I) {
        const Vec x = load_n(g + j, I - j);
        store_n((x * sigmoid(x)) * load_n(u + j, I - j), o + j, I - j);
      }
    }
  });
}

Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu_forward";
  check_cpu_float(op, "gate", gate);
  check_cpu_float(op, "up", up);
  check_dtype(op, "up", up, gate.scalar_type(), "gate's dtype");
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dim");
  check_same(op, "gate", gate, "up", up);
  Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t I = gate.size(-1);
  if (out.numel() == 0) return out;
  const Tensor g2 = as_rows(gate, I), u2 = as_rows(up, I);
  with_elem(gate.scalar_type(), [&](auto e) { swiglu_rows<decltype(e)>(g2, u2, out); });
  return out;
}

// dgate = dout up s (1 + gate (1 - s)), dup = dout (gate s).
inline void swiglu_grad(Vec dy, Vec x, Vec u, Vec& dg, Vec& du) {
  const Vec one(1.0f);
  const Vec s = sigmoid(x);
  du = dy * (x * s);
  dg = ((dy * u) * s) * (one + x * (one - s));
}

template <class E>
void swiglu_backward_rows(const Tensor& d2, const Tensor& g2, const Tensor& u2, Tensor& dgate, Tensor& dup) {
  const int64_t I = g2.size(1);
  const E *dp = ptr<E>(d2), *gp = ptr<E>(g2), *upp = ptr<E>(u2);
  const int64_t ds = d2.stride(0), gs = g2.stride(0), us = u2.stride(0);
  E *dgp = ptr<E>(dgate), *dup_ = ptr<E>(dup);
  at::parallel_for(0, g2.size(0), grain_rows(I, kGrainElems), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const E *dy = dp + r * ds, *g = gp + r * gs, *u = upp + r * us;
      E *dg = dgp + r * I, *du = dup_ + r * I;
      int64_t j = 0;
      Vec vg, vu;
      for (; j + W <= I; j += W) {
        swiglu_grad(Vec::load(dy + j), Vec::load(g + j), Vec::load(u + j), vg, vu);
        vg.store(dg + j);
        vu.store(du + j);
      }
      if (j < I) {
        const int64_t n = I - j;
        swiglu_grad(load_n(dy + j, n), load_n(g + j, n), load_n(u + j, n), vg, vu);
        store_n(vg, dg + j, n);
        store_n(vu, du + j, n);
      }
    }
  });
}

std::tuple<Tensor, Tensor> swiglu_backward(const Tensor& dout, const Tensor& gate, const Tensor& up) {
  const char* op = "swiglu_backward";
  check_cpu_float(op, "dout", dout);
  check_cpu_float(op, "gate", gate);
  check_cpu_float(op, "up", up);
  check_dtype(op, "up", up, gate.scalar_type(), "gate's dtype");
  check_dtype(op, "dout", dout, gate.scalar_type(), "gate's dtype");
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dim");
  check_same(op, "gate", gate, "up", up);
  check_same(op, "dout", dout, "gate", gate);
  const auto contiguous = gate.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor dgate = at::empty(gate.sizes(), contiguous), dup = at::empty(gate.sizes(), contiguous);
  const int64_t I = gate.size(-1);
  if (dgate.numel() == 0) return {dgate, dup};
  const Tensor d2 = as_rows(dout, I), g2 = as_rows(gate, I), u2 = as_rows(up, I);
  with_elem(gate.scalar_type(), [&](auto e) { swiglu_backward_rows<decltype(e)>(d2, g2, u2, dgate, dup); });
  return {dgate, dup};
}

// ---------------------------------------------------------------------------------------------------- RMSNorm
void check_norm(const char* op, const Tensor& x, const Tensor& weight) {
  check_cpu_float(op, "x", x);
  check_cpu_float(op, "weight", weight);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dim");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must be [H] with H = x.size(-1) = ",
              x.size(-1), ", got ", weight.sizes());
}

// sum_h a[h]^2, two vector accumulators.
template <class E>
inline float sum_sq(const E* a, int64_t n) {
  Vec acc0(0.0f), acc1(0.0f);
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const Vec a0 = Vec::load(a + j), a1 = Vec::load(a + j + W);
    acc0 = acc0 + a0 * a0;
    acc1 = acc1 + a1 * a1;
  }
  for (; j + W <= n; j += W) {
    const Vec a0 = Vec::load(a + j);
    acc0 = acc0 + a0 * a0;
  }
  if (j < n) {
    const Vec a0 = load_n(a + j, n - j);
    acc1 = acc1 + a0 * a0;
  }
  return hsum(acc0 + acc1);
}

// xhat = s rstd, rounded to bf16 when the normalised tensor s is bf16 (the reference's `xhat.to(input_dtype)`).
template <class S>
inline Vec normalised(Vec s, Vec rstd) {
  if constexpr (std::is_same_v<S, bf16>)
    return round_bf16(s * rstd);
  else
    return s * rstd;
}

// Rows of y = rms_norm(s) weight with s = x, or s = x + residual written to `sum` (R = X when there is no residual;
// the sum's dtype is then X).
template <class X, class R, class Wt>
void rms_norm_forward_rows(const Tensor& x2, const Tensor* r2, Tensor* sum, const Tensor& w, Tensor& y,
                           Tensor& rstd, float eps) {
  using S = Promote<X, R>;
  using Y = Promote<S, Wt>;
  const int64_t N = x2.size(0), H = x2.size(1);
  const X* xp = ptr<X>(x2);
  const Wt* wp = ptr<Wt>(w);
  const R* resp = r2 != nullptr ? ptr<R>(*r2) : nullptr;
  S* sp = sum != nullptr ? ptr<S>(*sum) : nullptr;
  const int64_t xs = x2.stride(0), rs_stride = r2 != nullptr ? r2->stride(0) : 0;
  Y* yp = ptr<Y>(y);
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, N, grain_rows(H, kGrainElems), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      // the row to normalise: x itself, or the sum just written (in its own dtype S, as the reference reads it)
      const S* xr;
      if (resp != nullptr) {  // s = x + residual, one fp32 add per element (torch's x + residual, bit for bit)
        S* sr = sp + r * H;
        const R* rr = resp + r * rs_stride;
        const X* xin = xp + r * xs;
        int64_t j = 0;
        for (; j + W <= H; j += W) (Vec::load(xin + j) + Vec::load(rr + j)).store(sr + j);
        if (j < H) store_n(load_n(xin + j, H - j) + load_n(rr + j, H - j), sr + j, H - j);
        xr = sr;
      } else if constexpr (std::is_same_v<X, S>) {
        xr = xp + r * xs;
      } else {
        xr = nullptr;  // unreachable: without a residual the caller instantiates R = X, so S = X
      }
      Y* yr = yp + r * H;
      const float ms = sum_sq(xr, H) / static_cast<float>(H);
      const float rs = 1.0f / std::sqrt(ms + eps);
      rp[r] = rs;
      const Vec vr(rs);
      int64_t j = 0;
      for (; j + W <= H; j += W) (normalised<S>(Vec::load(xr + j), vr) * Vec::load(wp + j)).store(yr + j);
      if (j < H) store_n(normalised<S>(load_n(xr + j, H - j), vr) * load_n(wp + j, H - j), yr + j, H - j);
    }
  });
}

// y = rms_norm(s) weight with s = x, or s = x + residual written to `sum` (the fused pre-norm residual add).
std::tuple<Tensor, Tensor> rms_norm_rows(const char* op, const Tensor& x, const Tensor* residual, Tensor* sum,
                                         const Tensor& weight, double eps) {
  check_norm(op, x, weight);
  if (residual != nullptr) {
    check_cpu_float(op, "residual", *residual);
    check_same(op, "x", x, "residual", *residual);
  }
  const at::ScalarType s_type =
      residual != nullptr ? at::promote_types(x.scalar_type(), residual->scalar_type()) : x.scalar_type();
  const int64_t H = x.size(-1);
  const auto contiguous = x.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor y = at::empty(x.sizes(), contiguous.dtype(at::promote_types(s_type, weight.scalar_type())));
  if (sum != nullptr) *sum = at::empty(x.sizes(), contiguous.dtype(s_type));
  const int64_t N = H > 0 ? x.numel() / H : 0;
  Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (y.numel() == 0) {
    rstd.fill_(1.0f / std::sqrt(static_cast<float>(eps)));
    return {y, rstd};
  }
  const Tensor x2 = as_rows(x, H), w = weight.contiguous();
  const Tensor r2 = residual != nullptr ? as_rows(*residual, H) : Tensor();
  const Tensor* r2p = residual != nullptr ? &r2 : nullptr;
  const at::ScalarType r_type = residual != nullptr ? residual->scalar_type() : x.scalar_type();
  const float eps_f = static_cast<float>(eps);
  with_elem(x.scalar_type(), [&](auto xe) {
    with_elem(r_type, [&](auto re) {
      with_elem(weight.scalar_type(), [&](auto we) {
        rms_norm_forward_rows<decltype(xe), decltype(re), decltype(we)>(x2, r2p, sum, w, y, rstd, eps_f);
      });
    });
  });
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const Tensor& weight, double eps) {
  return rms_norm_rows("rms_norm_forward", x, nullptr, nullptr, weight, eps);
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_forward(const Tensor& x, const Tensor& residual,
                                                        const Tensor& weight, double eps) {
  Tensor sum;
  auto [y, rstd] = rms_norm_rows("add_rms_norm_forward", x, &residual, &sum, weight, eps);
  return {sum, y, rstd};
}

// Rows of dx = rstd (g - xhat mean(g xhat)) [+ dsum] and block partials of dweight = sum_rows dy xhat, for x in S
// and weight in Wt (dy in promote(S, Wt), dsum and dx in S); then dweight = the partials added in block order.
template <class S, class Wt>
void rms_norm_backward_rows_typed(const Tensor& d2, const Tensor* s2, const Tensor& x2, const Tensor& w,
                                  const Tensor& rs_c, Tensor& dx, Tensor& dweight) {
  using Y = Promote<S, Wt>;
  const int64_t N = x2.size(0), H = x2.size(1);
  const S* xp = ptr<S>(x2);
  const Y* dp = ptr<Y>(d2);
  const Wt* wp = ptr<Wt>(w);
  const float* rp = rs_c.data_ptr<float>();
  const int64_t xs = x2.stride(0), ds = d2.stride(0);
  const S* dsp = s2 != nullptr ? ptr<S>(*s2) : nullptr;
  const int64_t dss = s2 != nullptr ? s2->stride(0) : 0;
  S* dxp = ptr<S>(dx);
  // Fixed blocks of rows (at most kMaxBlocks, at least kMinBlockRows rows each: a function of N only), each with
  // its own partial dweight row.
  constexpr int64_t kMaxBlocks = 256, kMinBlockRows = 16;
  const int64_t block_rows = std::max<int64_t>(kMinBlockRows, (N + kMaxBlocks - 1) / kMaxBlocks);
  const int64_t n_blocks = (N + block_rows - 1) / block_rows;
  std::vector<float> partial(static_cast<size_t>(n_blocks * H), 0.0f);
  at::parallel_for(0, n_blocks, grain_rows(block_rows * H, kGrainElems), [&](int64_t b0, int64_t b1) {
    std::vector<float> g(static_cast<size_t>(H) + W), xh(static_cast<size_t>(H) + W);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* pw = partial.data() + blk * H;
      for (int64_t r = blk * block_rows; r < std::min(N, (blk + 1) * block_rows); ++r) {
        const S* xr = xp + r * xs;
        const Y* dr = dp + r * ds;
        S* dxr = dxp + r * H;
        const Vec vr(rp[r]);
        // pass 1: g = dy w and xhat = x rstd into row buffers (L1), dweight partial += dy xhat, c = mean(g xhat)
        Vec acc(0.0f);
        int64_t j = 0;
        for (; j + W <= H; j += W) {
          const Vec d = Vec::load(dr + j), xhat = Vec::load(xr + j) * vr, gg = d * Vec::load(wp + j);
          gg.store(g.data() + j);
          xhat.store(xh.data() + j);
          (Vec::load(pw + j) + d * xhat).store(pw + j);
          acc = acc + gg * xhat;
        }
        if (j < H) {
          const int64_t n = H - j;
          const Vec d = load_n(dr + j, n), xhat = load_n(xr + j, n) * vr, gg = d * load_n(wp + j, n);
          gg.store(g.data() + j);
          xhat.store(xh.data() + j);
          store_n(load_n(pw + j, n) + d * xhat, pw + j, n);
          acc = acc + gg * xhat;  // zero padded lanes add 0
        }
        const Vec c(hsum(acc) / static_cast<float>(H));
        // pass 2: dx = rstd (g - xhat c) [+ dsum, rounded after the norm term: what autograd's sum of the two
        // gradients of the residual stream gives]
        if (dsp == nullptr) {
          for (j = 0; j + W <= H; j += W)
            (vr * (Vec::load(g.data() + j) - Vec::load(xh.data() + j) * c)).store(dxr + j);
          if (j < H) store_n(vr * (Vec::load(g.data() + j) - Vec::load(xh.data() + j) * c), dxr + j, H - j);
        } else {
          const S* dsr = dsp + r * dss;
          for (j = 0; j + W <= H; j += W)
            (vr * (Vec::load(g.data() + j) - Vec::load(xh.data() + j) * c) + Vec::load(dsr + j)).store(dxr + j);
          if (j < H)
            store_n(vr * (Vec::load(g.data() + j) - Vec::load(xh.data() + j) * c) + load_n(dsr + j, H - j), dxr + j,
                    H - j);
        }
      }
    }
  });
  // dweight = sum of the block partials in block order (columns split across threads).
  Wt* dwp = ptr<Wt>(dweight);
  at::parallel_for(0, (H + W - 1) / W, grain_rows(n_blocks * W, kGrainElems), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j = c * W, n = std::min<int64_t>(W, H - j);
      Vec acc(0.0f);
      for (int64_t blk = 0; blk < n_blocks; ++blk) {
        const float* pw = partial.data() + blk * H + j;
        acc = acc + (n == W ? Vec::load(pw) : load_n(pw, n));
      }
      if (n == W)
        acc.store(dwp + j);
      else
        store_n(acc, dwp + j, n);
    }
  });
}

// dx = rstd (g - xhat mean(g xhat)) [+ dsum: the gradient the normalised sum also gets from the residual stream].
std::tuple<Tensor, Tensor> rms_norm_backward_rows(const char* op, const Tensor& dy, const Tensor* dsum,
                                                  const Tensor& x, const Tensor& weight, const Tensor& rstd) {
  check_norm(op, x, weight);
  if (dsum != nullptr) {
    check_cpu_float(op, "dsum", *dsum);
    check_dtype(op, "dsum", *dsum, x.scalar_type(), "the sum's dtype");
    check_same(op, "dsum", *dsum, "x", x);
  }
  check_cpu_float(op, "dy", dy);
  check_dtype(op, "dy", dy, at::promote_types(x.scalar_type(), weight.scalar_type()), "the output's dtype");
  TORCH_CHECK(rstd.device().is_cpu() && rstd.scalar_type() == at::kFloat, op, ": rstd must be a float32 CPU tensor, "
              "got ", rstd.scalar_type(), " on ", rstd.device());
  check_same(op, "dy", dy, "x", x);
  const int64_t H = x.size(-1);
  const int64_t N = H > 0 ? x.numel() / H : 0;
  TORCH_CHECK(rstd.numel() == N, op, ": rstd must hold one value per row (", N, "), got ", rstd.sizes());
  Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dweight = at::zeros({H}, weight.options());
  if (dx.numel() == 0) return {dx, dweight};
  const Tensor x2 = as_rows(x, H), d2 = as_rows(dy, H), w = weight.contiguous(), rs_c = rstd.contiguous();
  const Tensor s2 = dsum != nullptr ? as_rows(*dsum, H) : Tensor();
  const Tensor* s2p = dsum != nullptr ? &s2 : nullptr;
  with_elem(x.scalar_type(), [&](auto se) {
    with_elem(weight.scalar_type(), [&](auto we) {
      rms_norm_backward_rows_typed<decltype(se), decltype(we)>(d2, s2p, x2, w, rs_c, dx, dweight);
    });
  });
  return {dx, dweight};
}

std::tuple<Tensor, Tensor> rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                             const Tensor& rstd) {
  return rms_norm_backward_rows("rms_norm_backward", dy, nullptr, x, weight, rstd);
}

std::tuple<Tensor, Tensor> add_rms_norm_backward(const Tensor& dy, const std::optional<Tensor>& dsum,
                                                 const Tensor& sum, const Tensor& weight, const Tensor& rstd) {
  return rms_norm_backward_rows("add_rms_norm_backward", dy, dsum.has_value() ? &*dsum : nullptr, sum, weight,
                                rstd);
}

}  // namespace saferlhf::layers

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("rope_forward(Tensor q, Tensor k, Tensor cos, Tensor sin_signed) -> (Tensor, Tensor)");
  m.def("rope_backward(Tensor dq_out, Tensor dk_out, Tensor cos, Tensor sin_signed) -> (Tensor, Tensor)");
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("add_rms_norm_forward(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_backward(Tensor dy, Tensor? dsum, Tensor sum, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("rope_forward", &saferlhf::layers::rope_forward);
  m.impl("rope_backward", &saferlhf::layers::rope_backward);
  m.impl("swiglu_forward", &saferlhf::layers::swiglu_forward);
  m.impl("swiglu_backward", &saferlhf::layers::swiglu_backward);
  m.impl("rms_norm_forward", &saferlhf::layers::rms_norm_forward);
  m.impl("rms_norm_backward", &saferlhf::layers::rms_norm_backward);
  m.impl("add_rms_norm_forward", &saferlhf::layers::add_rms_norm_forward);
  m.impl("add_rms_norm_backward", &saferlhf::layers::add_rms_norm_backward);
}
