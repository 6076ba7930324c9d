// Causal grouped-query attention for CPU training and prefill (fp32 or bf16), forward and backward, two torch ops:
//
//   saferlhf::attention_forward(q [B, L, Hq, D], k [B, L, Hk, D], v [B, L, Hk, D], cu_seqlens?, scale, window)
//       -> (out [B, L, Hq, D], lse [B, Hq, L])
//   saferlhf::attention_backward(dout, q, k, v, out, lse, cu_seqlens?, scale, window) -> (dq, dk, dv)
//
// Math (per sequence, query head h, its kv head g = h / (Hq / Hk), query i, keys j allowed when
// i - window < j <= i, window <= 0 meaning none):
//   s_ij = scale * q_i . k_j,   lse_i = log sum_j exp(s_ij),   p_ij = exp(s_ij - lse_i),   out_i = sum_j p_ij v_j
//   backward: delta_i = dout_i . out_i,  dv_j = sum_i p_ij dout_i,  ds_ij = p_ij (dout_i . v_j - delta_i),
//             dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i   (dk, dv summed over the group's heads).
// Sequences: each batch row is one sequence of length L, or, with cu_seqlens (int32/int64 [S + 1], B == 1), the
// packed documents [cu[s], cu[s + 1]) of the single row (padding-free training; tokens before cu[0] or after cu[S]
// get zero output and gradients).  q / k / v may be strided views (the last dim contiguous): the model passes its
// [B, H, L, D] tensors transposed, with no copy.
//
// Why: at training shapes (L ~ 100-1000, d 32-128) torch's CPU flash kernel spends most of its time outside the
// arithmetic (its backward is far above the FLOP floor at short L).  Here one work unit is (sequence, kv head): its keys
// and values are copied once into small contiguous buffers (k transposed for the scores), then every query head of
// the group walks its queries in blocks of kRows rows with register-blocked loops (Vec, simd_cpu.h); the whole
// [kRows, L] score block stays in L1/L2, so there is no online softmax: lse is exact.  dk / dv accumulate in the
// unit's own buffers, so units never write the same memory.  Units are handed out dynamically (cost ~ len^2).
// Numerics: fp32 throughout, exp <= 1.05 ulp (exp_nonpos); results differ from SDPA by fp32 summation order only.
// bf16 q / k / v (and dout): each unit converts its rows to fp32 as it copies them (exact), computes exactly as the
// fp32 path, and rounds out / dq / dk / dv to bf16 once (round-to-nearest-even); lse stays fp32.  The bf16 backward
// takes delta_i = sum_j p_ij (dout_i . v_j), which equals dout_i . out_i with the unrounded fp32 out, instead of
// reading the bf16-rounded out (whose rounding would leave a scale * delta-error * out_i bias in dq).
//
// torch-dependent on purpose (named *_ops.cpp, not *_cpu.cpp, so the torch-free CMake core does not glob it).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd_cpu.h"

namespace saferlhf::attention {

using at::Tensor;
using saferlhf::cpu::Vec;
using saferlhf::cpu::Elem;
using bf16 = saferlhf::cpu::bf16;
using saferlhf::cpu::exp_nonpos;
using saferlhf::cpu::clamp_floor;

constexpr int W = Vec::kWidth;
// Query rows per block: every inner loop keeps kRows x (at most 2) vectors of accumulators in registers (16 of the
// 32 AVX-512 registers).
constexpr int kRows = 8;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Segment {
  int64_t b, start, len;
};

template <class E>
constexpr bool kIsF32 = std::is_same_v<E, float>;

// A [B, L, H, D] tensor of element type E (float or bf16) with contiguous D.
template <class E>
struct View {
  E* data;
  int64_t sb, sl, sh;
  E* row(int64_t b, int64_t t, int64_t h) const { return data + b * sb + t * sl + h * sh; }
};

template <class E>
View<E> view_of(const Tensor& t) {
  return View<E>{static_cast<E*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// The row itself when E is float (read in place), else nullptr (such rows always go through fp32 copies).
template <class E>
inline const float* fp32_row(const E* p) {
  if constexpr (kIsF32<E>) return p;
  return nullptr;
}

// dst[d] = float(src[d]) for d < D (exact).
template <class E>
inline void row_to_float(const E* src, float* dst, int64_t D) {
  if constexpr (kIsF32<E>) {
    std::copy(src, src + D, dst);
  } else {
    int64_t d = 0;
    for (; d + W <= D; d += W) Vec::load(src + d).store(dst + d);
    for (; d < D; ++d) dst[d] = Elem<E>::to_float(src[d]);
  }
}

// dst[d] = E(src[d] * scale) for d < D (one rounding to E after the fp32 product).
template <class E>
inline void scaled_copy(const float* src, float scale, E* dst, int64_t D) {
  const Vec s(scale);
  int64_t d = 0;
  for (; d + W <= D; d += W) (Vec::load(src + d) * s).store(dst + d);
  for (; d < D; ++d) dst[d] = Elem<E>::from_float(src[d] * scale);
}

// dst[d] = E(src[d]) for d < D.
template <class E>
inline void row_from_float(const float* src, E* dst, int64_t D) {
  if constexpr (kIsF32<E>) {
    std::copy(src, src + D, dst);
  } else {
    int64_t d = 0;
    for (; d + W <= D; d += W) Vec::load(src + d).store(dst + d);
    for (; d < D; ++d) dst[d] = Elem<E>::from_float(src[d]);
  }
}

// dst[r * ld_dst + j] = scale * sum_d a[r * lda + d] * bt[d * ldb + j] for r < kRows and j in [j0, j1) (multiples
// of W): scores (a = queries, bt = keys transposed) or dout . v (a = dout rows, bt = values transposed).
template <int NT>
inline void rows_times_cols_tile(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t D, int64_t j,
                                 float scale, float* dst, int64_t ld_dst) {
  Vec acc[kRows][NT];
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = Vec(0.0f);
  for (int64_t d = 0; d < D; ++d) {
    Vec b[NT];
    for (int t = 0; t < NT; ++t) b[t] = Vec::load(bt + d * ldb + j + t * W);
    for (int r = 0; r < kRows; ++r) {
      const Vec ar(a[r * lda + d]);
      for (int t = 0; t < NT; ++t) acc[r][t] = Vec::fma(ar, b[t], acc[r][t]);
    }
  }
  const Vec s(scale);
  for (int r = 0; r < kRows; ++r)
    for (int t = 0; t < NT; ++t) (acc[r][t] * s).store(dst + r * ld_dst + j + t * W);
}

void rows_times_cols(const float* a, int64_t lda, const float* bt, int64_t ldb, int64_t D, int64_t j0, int64_t j1,
                     float scale, float* dst, int64_t ld_dst) {
  int64_t j = j0;
  for (; j + 2 * W <= j1; j += 2 * W) rows_times_cols_tile<2>(a, lda, bt, ldb, D, j, scale, dst, ld_dst);
  for (; j < j1; j += W) rows_times_cols_tile<1>(a, lda, bt, ldb, D, j, scale, dst, ld_dst);
}

// Calls f(std::integral_constant<int, NC>, dt) over the padded head dim [0, Dp) in passes of NC = 2 vectors (a last
// pass of 1): the accumulators of kRows x NC vectors stay in registers.
template <class F>
inline void over_head_dim(int64_t Dp, const F& f) {
  int64_t dt = 0;
  for (; dt + 2 * W <= Dp; dt += 2 * W) f(std::integral_constant<int, 2>(), dt);
  for (; dt < Dp; dt += W) f(std::integral_constant<int, 1>(), dt);
}

// out[r * ldo + d] = sum_{j in [j0, j1)} w[r * ldw + j] * m[j * ldm + d] for r < kRows, d in [0, Dp) (Dp a multiple
// of W): p @ v (forward) and ds @ k (dq).
template <int NC>
inline void weights_times_rows_tile(const float* w, int64_t ldw, const float* m, int64_t ldm, int64_t j0, int64_t j1,
                                    int64_t dt, float* out, int64_t ldo) {
  Vec acc[kRows][NC];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = Vec(0.0f);
  for (int64_t j = j0; j < j1; ++j) {
    Vec x[NC];
    for (int c = 0; c < NC; ++c) x[c] = Vec::load(m + j * ldm + dt + c * W);
    for (int r = 0; r < kRows; ++r) {
      const Vec wr(w[r * ldw + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] = Vec::fma(wr, x[c], acc[r][c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c].store(out + r * ldo + dt + c * W);
}

void weights_times_rows(const float* w, int64_t ldw, const float* m, int64_t ldm, int64_t j0, int64_t j1, int64_t Dp,
                        float* out, int64_t ldo) {
  over_head_dim(Dp, [&](auto nc, int64_t dt) {
    weights_times_rows_tile<decltype(nc)::value>(w, ldw, m, ldm, j0, j1, dt, out, ldo);
  });
}

// acc[j * ldm + d] += sum_r w[r * ldw + j] * x[r * ldx + d] for j in [j0, j1), d in [0, Dp): dv += p^T dout and
// dk += ds^T q (the kRows x tile of x stays in registers).
template <int NC>
inline void accumulate_outer_tile(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t j0, int64_t j1,
                                  int64_t dt, float* acc, int64_t ldm) {
  Vec xr[kRows][NC];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < NC; ++c) xr[r][c] = Vec::load(x + r * ldx + dt + c * W);
  for (int64_t j = j0; j < j1; ++j) {
    Vec a[NC];
    for (int c = 0; c < NC; ++c) a[c] = Vec::load(acc + j * ldm + dt + c * W);
    for (int r = 0; r < kRows; ++r) {
      const Vec wr(w[r * ldw + j]);
      for (int c = 0; c < NC; ++c) a[c] = Vec::fma(wr, xr[r][c], a[c]);
    }
    for (int c = 0; c < NC; ++c) a[c].store(acc + j * ldm + dt + c * W);
  }
}

void accumulate_outer(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t j0, int64_t j1, int64_t Dp,
                      float* acc, int64_t ldm) {
  over_head_dim(Dp, [&](auto nc, int64_t dt) {
    accumulate_outer_tile<decltype(nc)::value>(w, ldw, x, ldx, j0, j1, dt, acc, ldm);
  });
}

inline float hmax(Vec v) {
  alignas(64) float b[W];
  v.store(b);
  float m = b[0];
  for (int l = 1; l < W; ++l) m = std::max(m, b[l]);
  return m;
}

inline float hsum(Vec v) {
  alignas(64) float b[W];
  v.store(b);
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += b[l];
  return s;
}

// Uninitialised float scratch of a work unit (std::vector would zero-fill buffers that are written before use).
class Scratch {
 public:
  explicit Scratch(int64_t n) : p_(n > 0 ? new float[n] : nullptr) {}
  float* data() { return p_.get(); }

 private:
  std::unique_ptr<float[]> p_;
};

// sum_d a[d] b[d] over d < D (vector lanes, then the lanes in order).
inline float row_dot(const float* a, const float* b, int64_t D) {
  Vec acc(0.0f);
  int64_t d = 0;
  for (; d + W <= D; d += W) acc = Vec::fma(Vec::load(a + d), Vec::load(b + d), acc);
  float tail = 0.0f;
  for (; d < D; ++d) tail += a[d] * b[d];
  return hsum(acc) + tail;
}

// Everything a work unit needs to know about the problem.
struct Problem {
  int64_t D, Dp, Hq, Hk, rep;
  float scale;
  int64_t window;  // <= 0: none
  std::vector<Segment> segments;
  int64_t covered_begin, covered_end;  // tokens [covered_begin, covered_end) lie in a sequence (cu[0], cu[S])

  int64_t first_key(int64_t i) const { return window > 0 ? std::max<int64_t>(0, i - window + 1) : 0; }
};

// Key block [j0 tile start, j1 tile end) of the query rows [i0, i0 + rows): the tiles covering every allowed key.
struct Block {
  int64_t i0, rows, jt0, jt1, jhi;
};

inline Block block_of(const Problem& pb, int64_t i0, int64_t len) {
  Block bl;
  bl.i0 = i0;
  bl.rows = std::min<int64_t>(kRows, len - i0);
  bl.jhi = i0 + bl.rows;
  bl.jt0 = pb.first_key(i0) / W * W;
  bl.jt1 = round_up(bl.jhi, W);
  return bl;
}

// Sets the disallowed entries of each row's score tile range to -inf (rows beyond bl.rows: all of them).
inline void mask_block(const Problem& pb, const Block& bl, float* s, int64_t lds) {
  for (int r = 0; r < kRows; ++r) {
    float* row = s + r * lds;
    if (r >= bl.rows) {
      for (int64_t j = bl.jt0; j < bl.jt1; ++j) row[j] = kNegInf;
      continue;
    }
    const int64_t i = bl.i0 + r;
    for (int64_t j = bl.jt0; j < pb.first_key(i); ++j) row[j] = kNegInf;
    for (int64_t j = i + 1; j < bl.jt1; ++j) row[j] = kNegInf;
  }
}

// Copies k (or v) of one sequence and kv head into kt [D, Lp] (transposed) and/or kr [Lp, Dp] (rows), zero padded,
// as fp32.
template <class E>
void load_keys(const View<E>& x, const Segment& sg, int64_t g, const Problem& pb, int64_t Lp, float* kt, float* kr) {
  if (kt != nullptr) std::fill(kt, kt + pb.D * Lp, 0.0f);
  if (kr != nullptr) std::fill(kr, kr + Lp * pb.Dp, 0.0f);
  for (int64_t j = 0; j < sg.len; ++j) {
    const E* src = x.row(sg.b, sg.start + j, g);
    if (kt != nullptr)
      for (int64_t d = 0; d < pb.D; ++d) kt[d * Lp + j] = Elem<E>::to_float(src[d]);
    if (kr != nullptr) row_to_float(src, kr + j * pb.Dp, pb.D);
  }
}

// Copies query-like rows [i0, i0 + rows) of head h into dst [kRows, Dp] (zero padded, fp32).
template <class E>
inline void load_rows(const View<E>& x, const Segment& sg, int64_t h, const Problem& pb, const Block& bl, float* dst) {
  std::fill(dst, dst + kRows * pb.Dp, 0.0f);
  for (int64_t r = 0; r < bl.rows; ++r) {
    row_to_float(x.row(sg.b, sg.start + bl.i0 + r, h), dst + r * pb.Dp, pb.D);
  }
}

// Runs fn(unit) for units [0, n) on the intra-op threads, handing them out one at a time (costs differ).
template <class F>
void for_each_unit(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t u; (u = next.fetch_add(1)) < n;) fn(u);
  });
}

Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens,
                     double scale, int64_t window) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention: CPU tensors expected");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: fp32 or bf16 q, k, v (one dtype) expected, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be [B, L, H, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "attention: q ", q.sizes(), " does not match k ", k.sizes());
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "attention: ", q.size(2), " query heads are not a "
              "multiple of ", k.size(2), " kv heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention: the head dim must be contiguous");
  Problem pb;
  pb.D = q.size(3);
  pb.Dp = round_up(pb.D, W);
  pb.Hq = q.size(2);
  pb.Hk = k.size(2);
  pb.rep = pb.Hq / pb.Hk;
  pb.scale = static_cast<float>(scale);
  pb.window = window;
  const int64_t B = q.size(0), L = q.size(1);
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(B == 1, "attention: cu_seqlens needs a single packed row (B == 1), got B = ", B);
    const Tensor cu = cu_seqlens->to(at::kCPU, at::kLong).contiguous();
    TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 1, "attention: cu_seqlens must be 1-D [S + 1]");
    const int64_t* c = cu.data_ptr<int64_t>();
    pb.covered_begin = c[0];
    pb.covered_end = c[cu.numel() - 1];
    for (int64_t s = 0; s + 1 < cu.numel(); ++s) {
      TORCH_CHECK(0 <= c[s] && c[s] <= c[s + 1] && c[s + 1] <= L, "attention: cu_seqlens must be non-decreasing "
                  "in [0, ", L, "], got ", c[s], " then ", c[s + 1]);
      if (c[s + 1] > c[s]) pb.segments.push_back({0, c[s], c[s + 1] - c[s]});
    }
  } else {
    pb.covered_begin = 0;
    pb.covered_end = L;
    for (int64_t b = 0; b < B; ++b)
      if (L > 0) pb.segments.push_back({b, 0, L});
  }
  // Longest first: the dynamic hand-out then balances the threads.
  std::stable_sort(pb.segments.begin(), pb.segments.end(),
                   [](const Segment& a, const Segment& b) { return a.len > b.len; });
  return pb;
}

// Outputs are allocated uninitialised (every covered token is written exactly once); this zeroes the tokens that no
// packed document covers (before cu[0], after cu[S]) along dim `dim`.
void zero_uncovered(Tensor& t, const Problem& pb, int64_t dim) {
  const int64_t L = t.size(dim);
  if (pb.covered_begin > 0) t.narrow(dim, 0, pb.covered_begin).zero_();
  if (pb.covered_end < L) t.narrow(dim, pb.covered_end, L - pb.covered_end).zero_();
}

// Softmax of the kRows score rows of a block in place (p_ij = exp(s_ij - lse_i), 0 where masked), writing lse.
inline void softmax_rows(const Block& bl, float* s, int64_t lds, float* lse_rows) {
  for (int r = 0; r < bl.rows; ++r) {
    float* row = s + r * lds;
    Vec m(kNegInf);
    for (int64_t j = bl.jt0; j < bl.jt1; j += W) m = Vec::max(m, Vec::load(row + j));
    const float mx = hmax(m);  // finite: key i is always allowed
    Vec sum(0.0f);
    for (int64_t j = bl.jt0; j < bl.jt1; j += W) {
      const Vec e = exp_nonpos(clamp_floor(Vec::load(row + j) - Vec(mx)));
      e.store(row + j);
      sum = sum + e;
    }
    const float total = hsum(sum);
    const Vec inv(1.0f / total);
    for (int64_t j = bl.jt0; j < bl.jt1; j += W) (Vec::load(row + j) * inv).store(row + j);
    lse_rows[r] = mx + std::log(total);
  }
  for (int r = bl.rows; r < kRows; ++r) std::fill(s + r * lds + bl.jt0, s + r * lds + bl.jt1, 0.0f);
}

template <class E>
void forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Problem& pb, Tensor& out, Tensor& lse) {
  const int64_t L = q.size(1);
  const View<E> qv = view_of<E>(q), kv = view_of<E>(k), vv = view_of<E>(v), ov = view_of<E>(out);
  float* lse_p = lse.data_ptr<float>();
  const int64_t n_units = static_cast<int64_t>(pb.segments.size()) * pb.Hk;
  for_each_unit(n_units, [&](int64_t u) {
    const Segment& sg = pb.segments[u / pb.Hk];
    const int64_t g = u % pb.Hk;
    const int64_t Lp = round_up(sg.len, W), Dp = pb.Dp, D = pb.D;
    // fp32 rows that need no padding are read (v, full blocks of q) and written (out) in place.
    const bool direct = kIsF32<E> && D == Dp;
    Scratch kt(D * Lp), vr(direct ? 0 : Lp * Dp), qb(kRows * Dp), s(kRows * Lp), ob(kRows * Dp);
    load_keys(kv, sg, g, pb, Lp, kt.data(), nullptr);
    if (!direct) load_keys(vv, sg, g, pb, Lp, nullptr, vr.data());
    const float* v_rows = direct ? fp32_row(vv.row(sg.b, sg.start, g)) : vr.data();
    const int64_t ld_v = direct ? vv.sl : Dp;
    for (int64_t h = g * pb.rep; h < (g + 1) * pb.rep; ++h) {
      float* lse_h = lse_p + (sg.b * pb.Hq + h) * L + sg.start;
      for (int64_t i0 = 0; i0 < sg.len; i0 += kRows) {
        const Block bl = block_of(pb, i0, sg.len);
        const bool in_place = direct && bl.rows == kRows;
        const float* qa = in_place ? fp32_row(qv.row(sg.b, sg.start + i0, h)) : qb.data();
        const int64_t ld_q = in_place ? qv.sl : Dp;
        if (!in_place) load_rows(qv, sg, h, pb, bl, qb.data());
        rows_times_cols(qa, ld_q, kt.data(), Lp, D, bl.jt0, bl.jt1, pb.scale, s.data(), Lp);
        mask_block(pb, bl, s.data(), Lp);
        softmax_rows(bl, s.data(), Lp, lse_h + i0);
        if constexpr (kIsF32<E>) {
          if (in_place) {
            weights_times_rows(s.data(), Lp, v_rows, ld_v, bl.jt0, bl.jhi, Dp, ov.row(sg.b, sg.start + i0, h), ov.sl);
            continue;
          }
        }
        weights_times_rows(s.data(), Lp, v_rows, ld_v, bl.jt0, bl.jhi, Dp, ob.data(), Dp);
        for (int64_t r = 0; r < bl.rows; ++r) row_from_float(ob.data() + r * Dp, ov.row(sg.b, sg.start + i0 + r, h), D);
      }
    }
  });
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const std::optional<Tensor>& cu_seqlens, double scale, int64_t window) {
  const Problem pb = make_problem(q, k, v, cu_seqlens, scale, window);
  const int64_t B = q.size(0), L = q.size(1);
  Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = at::empty({B, pb.Hq, L}, q.options().dtype(at::kFloat));
  zero_uncovered(out, pb, 1);
  zero_uncovered(lse, pb, 2);
  if (q.scalar_type() == at::kFloat)
    forward_impl<float>(q, k, v, pb, out, lse);
  else
    forward_impl<bf16>(q, k, v, pb, out, lse);
  return {out, lse};
}

// ds = p (dp - delta) of a block, in place: p_ij = exp(s_ij - lse_i) over the scores in p, dp_ij = dout_i . v_j in
// dp (overwritten by ds).  delta_i: given (fp32: dout_i . out_i), or (bf16, delta == nullptr) sum_j p_ij dp_ij.
inline void block_ds(const Block& bl, const float* lse_rows, const float* delta, float* p, float* dp, int64_t ld) {
  for (int r = 0; r < kRows; ++r) {
    float* pr = p + r * ld;
    float* dr = dp + r * ld;
    const Vec l(r < bl.rows ? lse_rows[r] : 0.0f);
    if (delta != nullptr) {
      const Vec dl(delta[r]);
      for (int64_t j = bl.jt0; j < bl.jt1; j += W) {
        const Vec e = exp_nonpos(clamp_floor(Vec::load(pr + j) - l));
        e.store(pr + j);
        (e * (Vec::load(dr + j) - dl)).store(dr + j);
      }
      continue;
    }
    Vec acc(0.0f);
    for (int64_t j = bl.jt0; j < bl.jt1; j += W) {
      const Vec e = exp_nonpos(clamp_floor(Vec::load(pr + j) - l));
      e.store(pr + j);
      acc = Vec::fma(e, Vec::load(dr + j), acc);
    }
    const Vec dl(hsum(acc));
    for (int64_t j = bl.jt0; j < bl.jt1; j += W) (Vec::load(pr + j) * (Vec::load(dr + j) - dl)).store(dr + j);
  }
}

template <class E>
void backward_impl(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                   const Tensor& lse, const Problem& pb, Tensor& dq, Tensor& dk, Tensor& dv) {
  const int64_t L = q.size(1);
  const View<E> qv = view_of<E>(q), kv = view_of<E>(k), vv = view_of<E>(v), ov = view_of<E>(out),
                dov = view_of<E>(dout), dqv = view_of<E>(dq), dkv = view_of<E>(dk), dvv = view_of<E>(dv);
  const float* lse_p = lse.data_ptr<float>();
  const int64_t n_units = static_cast<int64_t>(pb.segments.size()) * pb.Hk;
  for_each_unit(n_units, [&](int64_t u) {
    const Segment& sg = pb.segments[u / pb.Hk];
    const int64_t g = u % pb.Hk;
    const int64_t Lp = round_up(sg.len, W), Dp = pb.Dp, D = pb.D;
    const bool direct = kIsF32<E> && D == Dp;  // fp32 rows need no padding: read k / full blocks of q and dout in place
    Scratch kt(D * Lp), kr(direct ? 0 : Lp * Dp), vt(D * Lp), dk_acc(Lp * Dp), dv_acc(Lp * Dp), qb(kRows * Dp),
        dob(kRows * Dp), p(kRows * Lp), dp(kRows * Lp), dqb(kRows * Dp);
    std::fill(dk_acc.data(), dk_acc.data() + Lp * Dp, 0.0f);
    std::fill(dv_acc.data(), dv_acc.data() + Lp * Dp, 0.0f);
    load_keys(kv, sg, g, pb, Lp, kt.data(), direct ? nullptr : kr.data());
    load_keys(vv, sg, g, pb, Lp, vt.data(), nullptr);
    const float* k_rows = direct ? fp32_row(kv.row(sg.b, sg.start, g)) : kr.data();
    const int64_t ld_k = direct ? kv.sl : Dp;
    for (int64_t h = g * pb.rep; h < (g + 1) * pb.rep; ++h) {
      const float* lse_h = lse_p + (sg.b * pb.Hq + h) * L + sg.start;
      for (int64_t i0 = 0; i0 < sg.len; i0 += kRows) {
        const Block bl = block_of(pb, i0, sg.len);
        // A full block of a head dim with no padding reads q / dout where they are; the rest goes through zero-padded
        // copies (rows past the block end must be zeros: their weights are 0 and 0 * garbage could be NaN).
        const bool in_place = direct && bl.rows == kRows;
        const float* qa = in_place ? fp32_row(qv.row(sg.b, sg.start + i0, h)) : qb.data();
        const float* da = in_place ? fp32_row(dov.row(sg.b, sg.start + i0, h)) : dob.data();
        const int64_t ld_q = in_place ? qv.sl : Dp, ld_d = in_place ? dov.sl : Dp;
        if (!in_place) {
          load_rows(qv, sg, h, pb, bl, qb.data());
          load_rows(dov, sg, h, pb, bl, dob.data());
        }
        float delta[kRows] = {};
        if constexpr (kIsF32<E>)
          for (int64_t r = 0; r < bl.rows; ++r)
            delta[r] = row_dot(da + r * ld_d, ov.row(sg.b, sg.start + i0 + r, h), D);
        // p = exp(s - lse) (0 where masked), dp = dout . v, ds = p (dp - delta) (written over dp).
        rows_times_cols(qa, ld_q, kt.data(), Lp, D, bl.jt0, bl.jt1, pb.scale, p.data(), Lp);
        mask_block(pb, bl, p.data(), Lp);
        rows_times_cols(da, ld_d, vt.data(), Lp, D, bl.jt0, bl.jt1, 1.0f, dp.data(), Lp);
        block_ds(bl, lse_h + i0, kIsF32<E> ? delta : nullptr, p.data(), dp.data(), Lp);
        accumulate_outer(p.data(), Lp, da, ld_d, bl.jt0, bl.jhi, Dp, dv_acc.data(), Dp);
        accumulate_outer(dp.data(), Lp, qa, ld_q, bl.jt0, bl.jhi, Dp, dk_acc.data(), Dp);
        weights_times_rows(dp.data(), Lp, k_rows, ld_k, bl.jt0, bl.jhi, Dp, dqb.data(), Dp);
        for (int64_t r = 0; r < bl.rows; ++r)
          scaled_copy(dqb.data() + r * Dp, pb.scale, dqv.row(sg.b, sg.start + i0 + r, h), D);
      }
    }
    for (int64_t j = 0; j < sg.len; ++j) {
      scaled_copy(dk_acc.data() + j * Dp, pb.scale, dkv.row(sg.b, sg.start + j, g), D);
      row_from_float(dv_acc.data() + j * Dp, dvv.row(sg.b, sg.start + j, g), D);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const std::optional<Tensor>& cu_seqlens, double scale,
                                                      int64_t window) {
  const Problem pb = make_problem(q, k, v, cu_seqlens, scale, window);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_backward: dout / out must match q");
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  lse.scalar_type() == at::kFloat,
              "attention_backward: dout / out of q's dtype (", q.scalar_type(), ") and fp32 lse expected");
  TORCH_CHECK(dout.stride(3) == 1 && out.stride(3) == 1, "attention_backward: the head dim must be contiguous");
  const int64_t B = q.size(0), L = q.size(1);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == pb.Hq && lse.size(2) == L,
              "attention_backward: lse must be [B, Hq, L]");
  const Tensor lse_c = lse.contiguous();
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor dq = at::empty(q.sizes(), contiguous), dk = at::empty(k.sizes(), contiguous),
         dv = at::empty(v.sizes(), contiguous);
  for (Tensor* t : {&dq, &dk, &dv}) zero_uncovered(*t, pb, 1);
  if (q.scalar_type() == at::kFloat)
    backward_impl<float>(dout, q, k, v, out, lse_c, pb, dq, dk, dv);
  else
    backward_impl<bf16>(dout, q, k, v, out, lse_c, pb, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace saferlhf::attention

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, float scale, int window) "
        "-> (Tensor, Tensor)");
  m.def("attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens, "
        "float scale, int window) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("attention_forward", &saferlhf::attention::attention_forward);
  m.impl("attention_backward", &saferlhf::attention::attention_backward);
}
