// CUDA log-prob kernels: log_softmax(logits / T)[label] (+ entropy) and its gradient (contract: docs/kernels.md).
//
// Parallel decomposition
// ----------------------
// * One thread group per row: a whole 256-thread block for V > 2048, one warp (8 rows per block) for smaller V,
//   so short rows do not leave 7/8 of a block idle.  Rows are independent, vocabularies are large (32k-150k), and
//   N (batch x sequence) is in the thousands, so row-per-group fills the GPU without any cross-block merge.
// * Forward is a single pass over V: each thread keeps an online state (m = running max of z, s = sum exp(z - m),
//   t = sum exp(z - m) * (z - m)) over the elements it owns, reading 16-byte vectors (8 bf16/fp16 or 4 fp32,
//   two vectors in flight per thread).  Rows start at any element offset (arbitrary row stride), so every row is
//   split into a scalar head up to the first 16-byte boundary, the vector body and a scalar tail.  The states
//   are merged with warp shuffles, then across warps through shared memory.  lse = m + log s and
//   entropy = log s - t / s (measured from the max: no cancellation of m against lse).  Nothing of size [N, V]
//   is written.
// * Backward uses the same decomposition; each element is read once and its gradient written once by the same
//   thread (load, then store), so grad_logits may alias logits.  Ignored rows only store zeros.
// * Accuracy: the extension is compiled with --use_fast_math, which turns expf into the approximate __expf
//   (relative error grows like 1e-7 * |x|).  The forward sum (which sets lse, hence every log-prob) uses
//   exp_acc below: Cody-Waite range reduction with a two-constant ln 2, then ex2.approx on |r| <= 0.35, about
//   2 ulp over the whole range.  The backward p = exp(logp_v) also uses it (same cost class, keeps gradients
//   within a few ulp of torch).  All accumulation is fp32; offsets are int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.cuh"
#include "kernels_cuda.h"

namespace saferlhf::cuda {
namespace {

constexpr int kThreads = 256;         // threads per block, both kernels
constexpr int kWarpRowsMaxV = 2048;   // V at or below this: one warp per row
constexpr float kEmptyMax = -1e30f;   // finite "minus infinity": keeps (m - m') * s and exp(m - m') defined

// ------------------------------------------------------------------------------------------------ math
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// exp(x) within ~2 ulp for x <= 88 (exp(x) < 2^127), including x = -inf -> 0 and NaN -> NaN, whatever the
// fast-math flags.  Every call site has x <= ~0 (z - max, z - lse, m - m').  Results below 2^-126 flush to 0
// (FTZ would flush them anyway; they are far below an fp32 ulp of any sum they enter, which is >= 1).
__device__ __forceinline__ float exp_core(float xc) {  // requires xc >= -104 (or NaN)
  const float k = rintf(xc * 1.4426950408889634f);
  float r = fmaf(k, -0.693145751953125f, xc);                   // ln2_hi: k * ln2_hi is exact for |k| < 2^9
  r = fmaf(k, -1.4286068203094172e-06f, r);                     // ln2_lo
  const float p = ex2_approx(r * 1.4426950408889634f);          // 2^(r / ln 2), |r| <= 0.35
  int ki = static_cast<int>(k);                                  // NaN -> 0 (cvt saturates); p carries the NaN
  ki = ki < -127 ? -127 : ki;                                    // -127 -> bit pattern 0 -> result 0
  ki = ki > 128 ? 128 : ki;                                      // 128 -> +inf (x > ~88.4; not used that far)
  return p * __int_as_float((ki + 127) << 23);
}

__device__ __forceinline__ float clamp_low(float x) { return x < -104.0f ? -104.0f : x; }  // NaN passes through

__device__ __forceinline__ float exp_acc(float x) { return exp_core(clamp_low(x)); }

// ------------------------------------------------------------------------------------------------ element io
template <typename T>
struct Io;

template <>
struct Io<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float load(const float* p) { return *p; }
  __device__ __forceinline__ static void store(float* p, float x) { *p = x; }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[kVec]) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <>
struct Io<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
  __device__ __forceinline__ static void unpack_word(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[kVec]) {
    unpack_word(u.x, f[0], f[1]);
    unpack_word(u.y, f[2], f[3]);
    unpack_word(u.z, f[4], f[5]);
    unpack_word(u.w, f[6], f[7]);
  }
  __device__ __forceinline__ static uint32_t pack_word(float lo, float hi) {
    const uint32_t a = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return a | (b << 16);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(pack_word(f[0], f[1]), pack_word(f[2], f[3]), pack_word(f[4], f[5]), pack_word(f[6], f[7]));
  }
};

template <>
struct Io<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float load(const __half* p) { return __half2float(*p); }
  __device__ __forceinline__ static void store(__half* p, float x) { *p = __float2half_rn(x); }
  __device__ __forceinline__ static void unpack_word(uint32_t w, float& lo, float& hi) {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[kVec]) {
    unpack_word(u.x, f[0], f[1]);
    unpack_word(u.y, f[2], f[3]);
    unpack_word(u.z, f[4], f[5]);
    unpack_word(u.w, f[6], f[7]);
  }
  __device__ __forceinline__ static uint32_t pack_word(float lo, float hi) {
    const uint32_t a = __half_as_ushort(__float2half_rn(lo));
    const uint32_t b = __half_as_ushort(__float2half_rn(hi));
    return a | (b << 16);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[kVec]) {
    return make_uint4(pack_word(f[0], f[1]), pack_word(f[2], f[3]), pack_word(f[4], f[5]), pack_word(f[6], f[7]));
  }
};

// Elements before the first 16-byte boundary of a row (clamped to the row length).
template <typename T>
__device__ __forceinline__ int64_t head_elems(const void* row, int64_t v) {
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) & 15u);
  const int64_t head = ((16 - misalign) & 15) / static_cast<int64_t>(sizeof(T));
  return head < v ? head : v;
}

// ------------------------------------------------------------------------------------------------ online state
// m: running max of z; s = sum exp(z - m); t = sum exp(z - m) * (z - m) (only with ENT).
template <bool ENT>
struct Online {
  float m = kEmptyMax, s = 0.0f, t = 0.0f;

  __device__ __forceinline__ void rescale_to(float m_new) {  // requires m_new >= m
    const float d = m - m_new;
    const float a = exp_acc(d);
    if (ENT) t = a * fmaf(d, s, t);
    s *= a;
    m = m_new;
  }

  // z - m for element x of the row: fma(x, 1/T, -m); x * 1/T is the reference's z (torch multiplies by the
  // reciprocal of a scalar divisor), the fma only skips one rounding.  Clamped so exp -> 0 and e * d -> 0
  // for -inf logits (no 0 * inf).
  __device__ __forceinline__ void add_shifted(float d) {
    d = clamp_low(d);
    const float e = exp_core(d);
    s += e;
    if (ENT) t = fmaf(e, d, t);
  }

  __device__ __forceinline__ void add(float x, float inv_temp) {
    const float z = x * inv_temp;
    if (z > m) rescale_to(z);
    add_shifted(z - m);
  }

  template <int N>
  __device__ __forceinline__ void add_vec(const float (&x)[N], float inv_temp) {
    float xm = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) xm = fmaxf(xm, x[i]);
    const float zm = xm * inv_temp;  // inv_temp > 0: max commutes with the scaling
    if (zm > m) rescale_to(zm);
    const float neg_m = -m;
#pragma unroll
    for (int i = 0; i < N; ++i) add_shifted(fmaf(x[i], inv_temp, neg_m));
  }

  __device__ __forceinline__ void merge(float m2, float s2, float t2) {
    const float mx = fmaxf(m, m2);
    const float d1 = m - mx, d2 = m2 - mx;
    const float f1 = exp_acc(d1), f2 = exp_acc(d2);
    if (ENT) t = f1 * fmaf(d1, s, t) + f2 * fmaf(d2, s2, t2);
    s = fmaf(f1, s, f2 * s2);
    m = mx;
  }

  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
      const float t2 = ENT ? __shfl_xor_sync(0xffffffffu, t, off) : 0.0f;
      merge(m2, s2, t2);
    }
  }
};

// Reduce the state over the GROUP threads of the row; the result is valid in the group's lane 0.
template <int GROUP, bool ENT>
__device__ __forceinline__ void group_reduce(Online<ENT>& st) {
  static_assert(GROUP == 32 || GROUP == kThreads, "a row is handled by one warp or one block");
  st.warp_reduce();
  if constexpr (GROUP > 32) {
    constexpr int kWarps = GROUP / 32;
    __shared__ float sm[3][kWarps];
    const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
    if (lane == 0) {
      sm[0][warp] = st.m;
      sm[1][warp] = st.s;
      sm[2][warp] = st.t;
    }
    __syncthreads();
    if (warp == 0) {
      Online<ENT> w;
      if (lane < kWarps) {
        w.m = sm[0][lane];
        w.s = sm[1][lane];
        w.t = sm[2][lane];
      }
      w.warp_reduce();
      st = w;
    }
  }
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T, int GROUP, bool ENT>
__global__ void __launch_bounds__(kThreads)
    logprobs_forward_kernel(const T* __restrict__ logits, int64_t n, int64_t v, int64_t ld,
                            const int64_t* __restrict__ labels, float inv_temp, int64_t ignore_index,
                            float* __restrict__ logp, float* __restrict__ lse, float* __restrict__ entropy) {
  using IO = Io<T>;
  constexpr int kVec = IO::kVec;
  constexpr int kRowsPerBlock = kThreads / GROUP;
  const int lane = static_cast<int>(threadIdx.x) % GROUP;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + static_cast<int>(threadIdx.x) / GROUP;
  if (row >= n) return;  // uniform over the group (a warp or the whole block)
  const T* x = logits + row * ld;

  // The label's logit, fetched early so its latency hides behind the row sweep.
  int64_t label = ignore_index;
  float x_label = 0.0f;
  if (lane == 0) {
    label = labels[row];
    if (label != ignore_index) x_label = IO::load(x + label);
  }

  Online<ENT> st;
  const int64_t head = head_elems<T>(x, v);
  for (int64_t j = lane; j < head; j += GROUP) st.add(IO::load(x + j), inv_temp);
  const int64_t nvec = (v - head) / kVec;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  int64_t k = lane;
  for (; k + GROUP < nvec; k += 2 * GROUP) {
    const uint4 ua = __ldcs(xv + k);
    const uint4 ub = __ldcs(xv + k + GROUP);
    float fa[kVec], fb[kVec];
    IO::unpack(ua, fa);
    IO::unpack(ub, fb);
    st.add_vec(fa, inv_temp);
    st.add_vec(fb, inv_temp);
  }
  if (k < nvec) {
    float fa[kVec];
    IO::unpack(__ldcs(xv + k), fa);
    st.add_vec(fa, inv_temp);
  }
  for (int64_t j = head + nvec * kVec + lane; j < v; j += GROUP) st.add(IO::load(x + j), inv_temp);

  group_reduce<GROUP>(st);
  if (lane == 0) {
    const float log_s = __logf(st.s);
    const float row_lse = st.m + log_s;
    lse[row] = row_lse;
    const bool keep = label != ignore_index;
    logp[row] = keep ? x_label * inv_temp - row_lse : 0.0f;
    if (entropy != nullptr) entropy[row] = (ENT && keep) ? log_s - st.t / st.s : 0.0f;
  }
}

// ------------------------------------------------------------------------------------------------ backward
// d/dlogits_v = gl * [v == label] - p_v * (gl + ge * (logp_v + H)),  gl = g_logp / T, ge = g_ent / T.
template <bool ENT>
__device__ __forceinline__ float grad_elem(float x, float inv_temp, float neg_lse, float gl, float ge, float h) {
  float d = fmaf(x, inv_temp, neg_lse);  // logp_v
  d = clamp_low(d);                      // p -> 0 and finite (d + H) for -inf logits
  const float p = exp_core(d);
  return ENT ? -p * fmaf(ge, d + h, gl) : -p * gl;
}

template <typename T, int GROUP, bool ENT>
__global__ void __launch_bounds__(kThreads)
    logprobs_backward_kernel(const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                             const T* logits, int64_t n, int64_t v, int64_t ld, const int64_t* __restrict__ labels,
                             const float* __restrict__ lse, const float* __restrict__ entropy, float inv_temp,
                             int64_t ignore_index, T* grad_logits, int64_t ld_out) {
  // logits and grad_logits may alias: no __restrict__ on them, every element is loaded before the same thread
  // stores it, and no other thread touches it.
  using IO = Io<T>;
  constexpr int kVec = IO::kVec;
  constexpr int kRowsPerBlock = kThreads / GROUP;
  const int lane = static_cast<int>(threadIdx.x) % GROUP;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + static_cast<int>(threadIdx.x) / GROUP;
  if (row >= n) return;
  const T* x = logits + row * ld;
  T* out = grad_logits + row * ld_out;
  const int64_t label = labels[row];

  if (label == ignore_index) {  // all-zero gradient row, logits are not read
    const int64_t head = head_elems<T>(out, v);
    for (int64_t j = lane; j < head; j += GROUP) IO::store(out + j, 0.0f);
    const int64_t nvec = (v - head) / kVec;
    uint4* ov = reinterpret_cast<uint4*>(out + head);
    for (int64_t k = lane; k < nvec; k += GROUP) ov[k] = make_uint4(0u, 0u, 0u, 0u);
    for (int64_t j = head + nvec * kVec + lane; j < v; j += GROUP) IO::store(out + j, 0.0f);
    return;
  }

  const float gl = grad_logp[row] * inv_temp;
  const float ge = ENT ? grad_entropy[row] * inv_temp : 0.0f;
  const float h = ENT ? entropy[row] : 0.0f;
  const float neg_lse = -lse[row];

  // Vector body only when input and output rows share their 16-byte phase (always true in place).
  const bool same_phase = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
  const int64_t head = same_phase ? head_elems<T>(x, v) : v;
  for (int64_t j = lane; j < head; j += GROUP) {
    float g = grad_elem<ENT>(IO::load(x + j), inv_temp, neg_lse, gl, ge, h);
    if (j == label) g += gl;
    IO::store(out + j, g);
  }
  const int64_t nvec = (v - head) / kVec;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  uint4* ov = reinterpret_cast<uint4*>(out + head);
  const int64_t label_rel = label - head;  // label's offset from the start of the vector body
  auto process = [&](int64_t kk, const uint4& u) {
    float f[kVec];
    IO::unpack(u, f);
    const int64_t rel = label_rel - kk * kVec;
    const int hit = (rel >= 0 && rel < kVec) ? static_cast<int>(rel) : -1;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float g = grad_elem<ENT>(f[i], inv_temp, neg_lse, gl, ge, h);
      if (i == hit) g += gl;
      f[i] = g;
    }
    ov[kk] = IO::pack(f);
  };
  int64_t k = lane;
  for (; k + GROUP < nvec; k += 2 * GROUP) {
    const uint4 ua = xv[k];
    const uint4 ub = xv[k + GROUP];
    process(k, ua);
    process(k + GROUP, ub);
  }
  if (k < nvec) process(k, xv[k]);
  for (int64_t j = head + nvec * kVec + lane; j < v; j += GROUP) {
    float g = grad_elem<ENT>(IO::load(x + j), inv_temp, neg_lse, gl, ge, h);
    if (j == label) g += gl;
    IO::store(out + j, g);
  }
}

// ------------------------------------------------------------------------------------------------ launchers
unsigned int grid_for(int64_t n, int rows_per_block) {
  const int64_t blocks = (n + rows_per_block - 1) / rows_per_block;
  if (blocks > static_cast<int64_t>(INT_MAX)) throw std::runtime_error("saferlhf: too many rows for one launch");
  return static_cast<unsigned int>(blocks);
}

template <typename T, bool ENT>
void launch_forward(const void* logits, int64_t n, int64_t v, int64_t ld, const int64_t* labels, float inv_temp,
                    int64_t ignore_index, float* logp, float* lse, float* entropy, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  if (v <= kWarpRowsMaxV) {
    logprobs_forward_kernel<T, 32, ENT><<<grid_for(n, kThreads / 32), kThreads, 0, stream>>>(
        x, n, v, ld, labels, inv_temp, ignore_index, logp, lse, entropy);
  } else {
    logprobs_forward_kernel<T, kThreads, ENT><<<grid_for(n, 1), kThreads, 0, stream>>>(
        x, n, v, ld, labels, inv_temp, ignore_index, logp, lse, entropy);
  }
  SAFERLHF_CUDA_CHECK(cudaGetLastError());
}

template <typename T, bool ENT>
void launch_backward(const float* grad_logp, const float* grad_entropy, const void* logits, int64_t n, int64_t v,
                     int64_t ld, const int64_t* labels, const float* lse, const float* entropy, float inv_temp,
                     int64_t ignore_index, void* grad_logits, int64_t ld_out, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  T* out = static_cast<T*>(grad_logits);
  if (v <= kWarpRowsMaxV) {
    logprobs_backward_kernel<T, 32, ENT><<<grid_for(n, kThreads / 32), kThreads, 0, stream>>>(
        grad_logp, grad_entropy, x, n, v, ld, labels, lse, entropy, inv_temp, ignore_index, out, ld_out);
  } else {
    logprobs_backward_kernel<T, kThreads, ENT><<<grid_for(n, 1), kThreads, 0, stream>>>(
        grad_logp, grad_entropy, x, n, v, ld, labels, lse, entropy, inv_temp, ignore_index, out, ld_out);
  }
  SAFERLHF_CUDA_CHECK(cudaGetLastError());
}

template <typename F>
void dispatch_kind(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat32:
      f(float{});
      return;
    case ScalarKind::kBFloat16:
      f(__nv_bfloat16{});
      return;
    case ScalarKind::kFloat16:
      f(__half{});
      return;
  }
  throw std::runtime_error("saferlhf: unsupported logits dtype");
}

}  // namespace

void logprobs_forward(const void* logits, ScalarKind kind, int64_t n, int64_t v, int64_t ld, const int64_t* labels,
                      float temperature, int64_t ignore_index, bool with_entropy, float* logp, float* lse,
                      float* entropy, cudaStream_t stream) {
  if (n <= 0) return;
  const float inv_temp = 1.0f / temperature;  // torch divides by a scalar as a multiply by its fp32 reciprocal
  dispatch_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    if (with_entropy) {
      launch_forward<T, true>(logits, n, v, ld, labels, inv_temp, ignore_index, logp, lse, entropy, stream);
    } else {
      launch_forward<T, false>(logits, n, v, ld, labels, inv_temp, ignore_index, logp, lse, entropy, stream);
    }
  });
}

void logprobs_backward(const float* grad_logp, const float* grad_entropy, const void* logits, ScalarKind kind,
                       int64_t n, int64_t v, int64_t ld, const int64_t* labels, const float* lse,
                       const float* entropy, float temperature, int64_t ignore_index, void* grad_logits,
                       int64_t ld_out, cudaStream_t stream) {
  if (n <= 0 || v <= 0) return;
  const float inv_temp = 1.0f / temperature;
  dispatch_kind(kind, [&](auto tag) {
    using T = decltype(tag);
    if (grad_entropy != nullptr) {
      launch_backward<T, true>(grad_logp, grad_entropy, logits, n, v, ld, labels, lse, entropy, inv_temp,
                               ignore_index, grad_logits, ld_out, stream);
    } else {
      launch_backward<T, false>(grad_logp, nullptr, logits, n, v, ld, labels, lse, entropy, inv_temp, ignore_index,
                                grad_logits, ld_out, stream);
    }
  });
}

}  // namespace saferlhf::cuda
