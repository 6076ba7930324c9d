// SIMD building blocks shared by the CPU kernels (logprobs_cpu.cpp, attention_ops.cpp): the element types
// (fp32, bf16, fp16 with exact round-to-nearest-even conversions), `Vec` (AVX-512, AVX2 + FMA + F16C or portable,
// chosen at compile time from the target flags) and exp_nonpos (<= 1.05 ulp exp for arguments <= 0).
// Everything lives in an unnamed namespace: each kernel source gets its own inline copies.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif
// GCC 12's AVX-512 intrinsic headers start some intrinsics from _mm512_undefined_*(), which -Wall then reports
// hundreds of times as "may be used uninitialized" once inlined here (a known false positive of those headers).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace saferlhf::cpu {
namespace {

// --------------------------------------------------------------------------------------------- element types
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Scalar conversions; the vector paths reproduce them bit for bit.
template <class E>
struct Elem;

template <>
struct Elem<float> {
  static float to_float(float x) { return x; }
  static float from_float(float x) { return x; }
  static float neg_inf() { return -INFINITY; }
};

template <>
struct Elem<bf16> {
  static float to_float(bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }
  // Round to nearest-even; NaN -> canonical quiet NaN 0x7FC0 (as c10::BFloat16).
  static bf16 from_float(float x) {
    if (std::isnan(x)) return bf16{0x7FC0};
    const uint32_t u = float_bits(x);
    return bf16{static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
  }
  static bf16 neg_inf() { return bf16{0xFF80}; }
};

template <>
struct Elem<fp16> {
  // IEEE half <-> float without hardware support (the FP16 library's algorithms, used by c10::Half).
  static float to_float(fp16 x) {
    const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized);
    return bits_float(sign | magnitude);
  }
  // Round to nearest-even, overflow -> inf, NaN -> quiet NaN.
  static fp16 from_float(float x) {
    float base = (std::fabs(x) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_bits(x);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return fp16{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
  }
  static fp16 neg_inf() { return fp16{0xFC00}; }
};

// --------------------------------------------------------------------------------------------- SIMD types
// Every Vec provides: kWidth, kBlock (vectors per forward block), broadcast constructor, load/store for the
// three element types, + - *, fma(a, b, c) = a * b + c, max(a, b) (returns b when either is NaN, like vmaxps),
// round (nearest-even), ldexp(y, n) = y * 2^n for integral n (any n >= -150 when kDenormals, else n >= -126), and
// zero_below(x, c, y) = (x < c) ? 0 : y (NaN x keeps y).
#if defined(__AVX512F__)
struct Vec {
  static constexpr int kWidth = 16;
  static constexpr int kBlock = 8;
  static constexpr bool kDenormals = true;
  __m512 v;
  Vec() = default;
  explicit Vec(__m512 x) : v(x) {}
  explicit Vec(float x) : v(_mm512_set1_ps(x)) {}

  static Vec load(const float* p) { return Vec(_mm512_loadu_ps(p)); }
  static Vec load(const bf16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  static Vec load(const fp16* p) {
    return Vec(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(bf16* p) const {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
    // vcvtneps2bf16 rounds to nearest-even like c10::BFloat16 except on denormal inputs (read as 0) and NaN
    // payloads; vectors holding any of those (fpclass: QNaN 0x01 | denormal 0x20 | SNaN 0x80) take the exact path.
    if (_mm512_fpclass_ps_mask(v, 0xA1) == 0) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
      return;
    }
#endif
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  void store(fp16* p) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  friend Vec operator+(Vec a, Vec b) { return Vec(_mm512_add_ps(a.v, b.v)); }
  friend Vec operator-(Vec a, Vec b) { return Vec(_mm512_sub_ps(a.v, b.v)); }
  friend Vec operator*(Vec a, Vec b) { return Vec(_mm512_mul_ps(a.v, b.v)); }
  static Vec fma(Vec a, Vec b, Vec c) { return Vec(_mm512_fmadd_ps(a.v, b.v, c.v)); }
  static Vec max(Vec a, Vec b) { return Vec(_mm512_max_ps(a.v, b.v)); }
  static Vec round(Vec a) { return Vec(_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static Vec ldexp(Vec y, Vec n) { return Vec(_mm512_scalef_ps(y.v, n.v)); }
  static Vec zero_below(Vec x, float c, Vec y) {
    return Vec(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(c), _CMP_NLT_UQ), y.v));
  }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Vec {
  static constexpr int kWidth = 8;
  static constexpr int kBlock = 4;
  static constexpr bool kDenormals = false;
  __m256 v;
  Vec() = default;
  explicit Vec(__m256 x) : v(x) {}
  explicit Vec(float x) : v(_mm256_set1_ps(x)) {}

  static Vec load(const float* p) { return Vec(_mm256_loadu_ps(p)); }
  static Vec load(const bf16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  static Vec load(const fp16* p) { return Vec(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(bf16* p) const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  void store(fp16* p) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }

  friend Vec operator+(Vec a, Vec b) { return Vec(_mm256_add_ps(a.v, b.v)); }
  friend Vec operator-(Vec a, Vec b) { return Vec(_mm256_sub_ps(a.v, b.v)); }
  friend Vec operator*(Vec a, Vec b) { return Vec(_mm256_mul_ps(a.v, b.v)); }
  static Vec fma(Vec a, Vec b, Vec c) { return Vec(_mm256_fmadd_ps(a.v, b.v, c.v)); }
  static Vec max(Vec a, Vec b) { return Vec(_mm256_max_ps(a.v, b.v)); }
  static Vec round(Vec a) { return Vec(_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static Vec ldexp(Vec y, Vec n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return Vec(_mm256_mul_ps(y.v, _mm256_castsi256_ps(e)));
  }
  static Vec zero_below(Vec x, float c, Vec y) {
    return Vec(_mm256_and_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(c), _CMP_NLT_UQ), y.v));
  }
};
#else
// Portable fallback: 8 independent lanes in plain arrays (compilers vectorise the loops where they can); 8 lanes
// also keep the fp32 partial sums as short as on the AVX2 path.
struct Vec {
  static constexpr int kWidth = 8;
  static constexpr int kBlock = 4;
  static constexpr bool kDenormals = false;
  float v[kWidth];
  Vec() = default;
  explicit Vec(float x) {
    for (float& e : v) e = x;
  }

  template <class E>
  static Vec load(const E* p) {
    Vec r;
    for (int l = 0; l < kWidth; ++l) r.v[l] = Elem<E>::to_float(p[l]);
    return r;
  }
  template <class E>
  void store(E* p) const {
    for (int l = 0; l < kWidth; ++l) p[l] = Elem<E>::from_float(v[l]);
  }

  template <class F>
  static Vec map(F f, Vec a, Vec b) {
    Vec r;
    for (int l = 0; l < kWidth; ++l) r.v[l] = f(a.v[l], b.v[l]);
    return r;
  }
  friend Vec operator+(Vec a, Vec b) { return map([](float x, float y) { return x + y; }, a, b); }
  friend Vec operator-(Vec a, Vec b) { return map([](float x, float y) { return x - y; }, a, b); }
  friend Vec operator*(Vec a, Vec b) { return map([](float x, float y) { return x * y; }, a, b); }
  static Vec fma(Vec a, Vec b, Vec c) {
    Vec r;
    for (int l = 0; l < kWidth; ++l) r.v[l] = std::fma(a.v[l], b.v[l], c.v[l]);
    return r;
  }
  static Vec max(Vec a, Vec b) { return map([](float x, float y) { return x > y ? x : y; }, a, b); }
  static Vec round(Vec a) {
    Vec r;
    for (int l = 0; l < kWidth; ++l) r.v[l] = std::nearbyint(a.v[l]);
    return r;
  }
  static Vec ldexp(Vec y, Vec n) {
    return map(
        [](float m, float e) {
          if (std::isnan(e)) return e;
          return m * bits_float(static_cast<uint32_t>(static_cast<int32_t>(e) + 127) << 23);
        },
        y, n);
  }
  static Vec zero_below(Vec x, float c, Vec y) {
    return map([c](float a, float b) { return a < c ? 0.0f : b; }, x, y);
  }
};
#endif

constexpr int W = Vec::kWidth;

// Finite "minus infinity" for the running max: keeps m_old - m_new and exp(...) defined for lanes that have only
// seen -inf (logits are assumed > -1e30 wherever the row has a finite maximum).
constexpr float kEmptyMax = -1e30f;
// exp(kExpFloor) is 0 in fp32, and kExpFloor * 0 == 0: arguments are clamped here before exp and products.
constexpr float kExpFloor = -104.0f;
// log(FLT_MIN): below it exp(x) is a denormal (or 0).
constexpr float kExpNormalMin = -87.33654f;

// exp(x) for kExpFloor <= x <= ~0 (a rounding excess above 0 is fine) or NaN (propagates).
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two so n * ln2_hi is exact), then a degree-6
// polynomial fitted for minimax relative error on that interval (approximation error 2e-9), then scaling by 2^n.
// Checked exhaustively against double exp: at most 1.05 ulp over every float in [-104, 0] with a normal result.
inline Vec exp_nonpos(Vec x) {
  // Without an exact ldexp (AVX-512 scalef) keep 2^n normal and flush would-be denormal results to 0.
  const Vec xc = Vec::kDenormals ? x : Vec::max(Vec(kExpNormalMin), x);  // NaN passes (second operand)
  const Vec n = Vec::round(xc * Vec(1.44269504088896341f));
  Vec r = Vec::fma(n, Vec(-0.693145751953125f), xc);
  r = Vec::fma(n, Vec(-1.42860682030941723212e-6f), r);
  Vec p = Vec(0x1.6ae730p-10f);
  p = Vec::fma(p, r, Vec(0x1.126782p-7f));
  p = Vec::fma(p, r, Vec(0x1.555822p-5f));
  p = Vec::fma(p, r, Vec(0x1.55541ap-3f));
  p = Vec::fma(p, r, Vec(0x1.fffffcp-2f));
  p = Vec::fma(p, r, Vec(1.0f));
  p = Vec::fma(p, r, Vec(1.0f));
  const Vec e = Vec::ldexp(p, n);
  return Vec::kDenormals ? e : Vec::zero_below(x, kExpNormalMin, e);
}

inline Vec clamp_floor(Vec x) { return Vec::max(Vec(kExpFloor), x); }  // NaN passes (second operand)

// Loads row[offset + l] for l < n (n < W, may be 0), padded with -inf, which contributes exp(-inf) = 0 everywhere.
template <class E>
inline Vec load_partial(const E* row, int64_t offset, int64_t n) {
  E buf[W];
  for (int l = 0; l < W; ++l) buf[l] = l < n ? row[offset + l] : Elem<E>::neg_inf();
  return Vec::load(buf);
}

template <class E>
inline void store_partial(Vec g, E* row, int64_t offset, int64_t n) {
  E buf[W];
  g.store(buf);
  for (int64_t l = 0; l < n; ++l) row[offset + l] = buf[l];
}

}  // namespace
}  // namespace saferlhf::cpu
