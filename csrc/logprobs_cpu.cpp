// C++ CPU log-prob kernels: log_softmax(logits / T)[label] (+ entropy) and its gradient (contract: docs/kernels.md).
//
// Design
// ------
// * One kernel body per op, templated on a small SIMD type `Vec`: AVX-512 (16 lanes), AVX2 + FMA + F16C (8 lanes)
//   or portable code (8 lanes in arrays), chosen at compile time from the target flags (-march=native in the builds).
//   Logits are read as fp32, bf16 (upper half of an fp32) or fp16 (IEEE half) and converted to fp32 in registers;
//   gradients are written back rounding to nearest-even, bit-identical to c10::BFloat16 / c10::Half.
// * z = x * (1 / T) rounded to fp32 (as torch's CUDA division by a scalar and the Triton / CUDA kernels; torch on
//   CPU divides, at most an ulp of z away), computed once per element and used consistently: a one-element row
//   gets lse = z and logp = 0 exactly.
// * Forward: one pass over each row, kBlock vectors at a time held in registers.  Each lane keeps an online state
//   over the elements it sees, in z units measured from its running max m:
//       s = sum exp(z - m),   t = sum exp(z - m) * (z - m)   (t only with entropy).
//   Per block: the lane-wise block max moves m (one exp per lane rescales s and t), then every element adds
//   exp(z - m) to s.  At the end of the row the lanes are merged in double: lse = m + log s and
//   entropy = lse - sum p z = log s - t / s (measured from the max, so m never cancels against lse).
//   Nothing of size V is written.
// * Backward is elementwise: each element is loaded, its gradient computed and stored to the same position, so
//   grad_logits may be logits itself (in place).  With p = exp(logp_v), logp_v = z - lse:
//       d/dlogits_v = ( g_logp * [v == label] - p * (g_logp + g_ent * (logp_v + H)) ) / T.
// * exp (exp_nonpos): range reduction by ln 2 and a degree-6 minimax polynomial, <= 1.05 ulp, 11 AVX-512 operations;
//   every argument is <= 0 up to rounding (z - max, z - lse, m_old - m_new) and is first clamped to
//   >= kExpFloor, so -inf logits give exp -> 0 and e * (z - m) -> 0 (never 0 * inf).  With AVX-512 results
//   below 2^-126 are denormals as in torch; the other paths flush them to 0 (a difference below 1.2e-38).
#include "kernels_cpu.h"

// fma only where written (Vec::fma): contracting z = x * inv_t into z - m would use the unrounded z.
#include "fp_contract_off.h"
#include "simd_cpu.h"

namespace saferlhf::cpu {
namespace {

// --------------------------------------------------------------------------------------------- forward
// e[0] + ... + e[N-1] as a balanced tree (shorter rounding chains than a running sum).
template <int N>
inline Vec pairwise_sum(const Vec* e) {
  if constexpr (N == 1) {
    return e[0];
  } else {
    return pairwise_sum<N / 2>(e) + pairwise_sum<N - N / 2>(e + N / 2);
  }
}

// z = x * (1 / T) rounded to fp32; at T = 1 the multiply is skipped (it is exact there anyway).
struct UnitTemperature {
  Vec operator()(Vec x) const { return x; }
  float operator()(float x) const { return x; }
};

struct Temperature {
  float inv_t;
  Vec operator()(Vec x) const { return x * Vec(inv_t); }
  float operator()(float x) const { return x * inv_t; }
};

// Per-lane online state in z units (m is the lane's running max of z).
// A block's terms are summed on their own (pairwise for s) and then added to the running sums, which keeps the
// fp32 running sums short (V / (kWidth * kBlock) additions per lane) and their rounding error small.
template <bool kEntropy>
struct Online {
  Vec m{kEmptyMax}, s{0.0f}, t{0.0f};

  template <class Z>
  void absorb(const Vec (&xs)[Vec::kBlock], Z z) {
    constexpr int kB = Vec::kBlock;
    Vec bm = xs[0];
    for (int k = 1; k < kB; ++k) bm = Vec::max(bm, xs[k]);
    const Vec m_new = Vec::max(m, z(bm));  // rounding x * (1 / T) is monotone: max(z) = z(max(x))
    const Vec dm = clamp_floor(m - m_new);
    const Vec scale = exp_nonpos(dm);
    Vec e[kB], d[kB];
    for (int k = 0; k < kB; ++k) {
      d[k] = clamp_floor(z(xs[k]) - m_new);  // the max element gets exactly d = 0
      e[k] = exp_nonpos(d[k]);
    }
    if (kEntropy) {
      Vec bt = e[0] * d[0];
      for (int k = 1; k < kB; ++k) bt = Vec::fma(e[k], d[k], bt);
      t = Vec::fma(scale, Vec::fma(dm, s, t), bt);  // rescale to m_new: t + (m - m_new) s, times exp(m - m_new)
    }
    s = Vec::fma(s, scale, pairwise_sum<kB>(e));
    m = m_new;
  }
};

template <class E, bool kEntropy, class Z>
void forward_rows(const E* logits, int64_t v, int64_t ld, const int64_t* labels, Z z, int64_t ignore_index,
                  float* logp, float* lse, float* entropy, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kChunk = static_cast<int64_t>(Vec::kBlock) * W;
  for (int64_t i = row_begin; i < row_end; ++i) {
    const E* x = logits + i * ld;
    Online<kEntropy> st;
    Vec xs[Vec::kBlock];
    int64_t j = 0;
    for (; j + kChunk <= v; j += kChunk) {
      for (int k = 0; k < Vec::kBlock; ++k) xs[k] = Vec::load(x + j + k * W);
      st.absorb(xs, z);
    }
    if (j < v) {  // last partial block, padded with -inf
      for (int k = 0; k < Vec::kBlock; ++k) {
        const int64_t o = j + static_cast<int64_t>(k) * W;
        xs[k] = o + W <= v ? Vec::load(x + o) : load_partial(x, o, v - o > 0 ? v - o : 0);
      }
      st.absorb(xs, z);
    }

    // Merge the lanes in double: S = sum_l s_l e^{d_l}, T = sum_l e^{d_l} (t_l + d_l s_l), d_l = m_l - M.
    float m[W], s[W], t[W];
    st.m.store(m);
    st.s.store(s);
    st.t.store(t);
    float mx = m[0];
    for (int l = 1; l < W; ++l) mx = m[l] > mx ? m[l] : mx;
    double sum = 0.0, tsum = 0.0;
    for (int l = 0; l < W; ++l) {
      float d = m[l] - mx;
      d = d < kExpFloor ? kExpFloor : d;
      const double f = std::exp(static_cast<double>(d));
      sum += f * s[l];
      if (kEntropy) tsum += f * (static_cast<double>(t[l]) + static_cast<double>(d) * s[l]);
    }
    const double log_s = std::log(sum);
    const double row_lse = static_cast<double>(mx) + log_s;
    lse[i] = static_cast<float>(row_lse);
    const int64_t label = labels[i];
    const bool keep = label != ignore_index;
    logp[i] = keep ? static_cast<float>(static_cast<double>(z(Elem<E>::to_float(x[label]))) - row_lse) : 0.0f;
    if (kEntropy) entropy[i] = keep ? static_cast<float>(log_s - tsum / sum) : 0.0f;
  }
}

// --------------------------------------------------------------------------------------------- backward
// grad = -p * (gl + ge * (logp_v + H)) + gl * [v == label], with gl = g_logp / T and ge = g_ent / T.
template <class E, bool kEntropy, class Z>
void backward_rows(const float* grad_logp, const float* grad_entropy, const E* logits, int64_t v, int64_t ld,
                   const int64_t* labels, const float* lse, const float* entropy, Z z, int64_t ignore_index,
                   E* grad_logits, int64_t ld_out, int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    // No __restrict__: in place, x and out are the same row; each vector is loaded before it is stored.
    const E* x = logits + i * ld;
    E* out = grad_logits + i * ld_out;
    const int64_t label = labels[i];
    if (label == ignore_index) {
      std::memset(static_cast<void*>(out), 0, static_cast<size_t>(v) * sizeof(E));  // +0 in every element type
      continue;
    }
    const float gl = z(grad_logp[i]);
    const float ge = kEntropy ? z(grad_entropy[i]) : 0.0f;
    const Vec neg_ge(-ge), row_lse(lse[i]);
    const Vec neg_c(-(kEntropy ? gl + ge * entropy[i] : gl));  // -(gl + ge * H)
    auto grad = [&](Vec xv, int64_t j) {
      const Vec d = clamp_floor(z(xv) - row_lse);  // logp_v
      const Vec p = exp_nonpos(d);
      Vec g = p * (kEntropy ? Vec::fma(neg_ge, d, neg_c) : neg_c);
      if (static_cast<uint64_t>(label - j) < static_cast<uint64_t>(W)) {  // the label's lane: + gl
        float onehot[W] = {};
        onehot[label - j] = gl;
        g = g + Vec::load(onehot);
      }
      return g;
    };
    int64_t j = 0;
    for (; j + W <= v; j += W) grad(Vec::load(x + j), j).store(out + j);
    if (j < v) store_partial(grad(load_partial(x, j, v - j), j), out, j, v - j);
  }
}

// Calls f(E{}, Z{}, std::bool_constant<flag>{}): element type of the logits, temperature scaling, and a flag
// (with entropy / with an entropy gradient), so every combination is compiled as its own loop.
template <class F>
void dispatch(ScalarKind kind, float temperature, bool flag, F&& f) {
  auto with_kind = [&](auto elem) {
    auto with_scale = [&](auto z) {
      if (flag) {
        f(elem, z, std::true_type{});
      } else {
        f(elem, z, std::false_type{});
      }
    };
    if (temperature == 1.0f) {
      with_scale(UnitTemperature{});
    } else {
      with_scale(Temperature{1.0f / temperature});
    }
  };
  switch (kind) {
    case ScalarKind::kFloat32:
      with_kind(float{});
      return;
    case ScalarKind::kBFloat16:
      with_kind(bf16{});
      return;
    case ScalarKind::kFloat16:
      with_kind(fp16{});
      return;
  }
}

}  // namespace

void logprobs_forward(const void* logits, ScalarKind kind, int64_t v, int64_t ld, const int64_t* labels,
                      float temperature, int64_t ignore_index, bool with_entropy, float* logp, float* lse,
                      float* entropy, int64_t row_begin, int64_t row_end) {
  dispatch(kind, temperature, with_entropy, [&](auto elem, auto z, auto ent) {
    using E = decltype(elem);
    forward_rows<E, decltype(ent)::value>(static_cast<const E*>(logits), v, ld, labels, z, ignore_index, logp, lse,
                                          entropy, row_begin, row_end);
  });
}

void logprobs_backward(const float* grad_logp, const float* grad_entropy, const void* logits, ScalarKind kind,
                       int64_t v, int64_t ld, const int64_t* labels, const float* lse, const float* entropy,
                       float temperature, int64_t ignore_index, void* grad_logits, int64_t ld_out,
                       int64_t row_begin, int64_t row_end) {
  dispatch(kind, temperature, grad_entropy != nullptr, [&](auto elem, auto z, auto ent) {
    using E = decltype(elem);
    backward_rows<E, decltype(ent)::value>(grad_logp, grad_entropy, static_cast<const E*>(logits), v, ld, labels,
                                           lse, entropy, z, ignore_index, static_cast<E*>(grad_logits), ld_out,
                                           row_begin, row_end);
  });
}

}  // namespace saferlhf::cpu
