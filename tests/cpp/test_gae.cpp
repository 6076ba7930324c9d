// gae_forward of the CPU core against the reference recursion evaluated in double: row counts that are and are
// not multiples of the kernel's row interleave, T = 1, right and left padding, fully masked rows, several
// (gamma, lam), a split of the rows into separately processed ranges, and the shared-mask forms: a bool (uint8)
// mask and a mask with fewer rows than the streams (row i reads mask row i % mask_rows) must give the same bits
// as the full fp32 mask.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels_cpu.h"

namespace cpu = saferlhf::cpu;

namespace {

int failures = 0;

void expect_close(double got, double want, double atol, double rtol, const char* what, int64_t i, int64_t j) {
  if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
    if (++failures <= 20) {
      std::printf("FAIL %s [%lld, %lld]: got %.9g want %.9g\n", what, (long long)i, (long long)j, got, want);
    }
  }
}

void check(int64_t rows, int64_t t, float gamma, float lam, std::mt19937& gen) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> len(0, t);
  const size_t total = static_cast<size_t>(rows * t);
  std::vector<float> r(total), v(total), m(total), adv(total), ret(total);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = i == 0 ? 0 : len(gen);  // row 0 fully masked
    const bool left = i % 2 == 1;              // odd rows left-padded
    for (int64_t k = 0; k < t; ++k) {
      const int64_t idx = i * t + k;
      r[idx] = dist(gen);
      v[idx] = dist(gen);
      m[idx] = (left ? k >= t - n : k < n) ? 1.0f : 0.0f;
    }
  }
  // Two separate row ranges, as the torch binding's parallel_for may split them.
  const int64_t split = rows / 3;
  cpu::gae_forward(r.data(), v.data(), m.data(), rows, t, gamma, lam, adv.data(), ret.data(), 0, split);
  cpu::gae_forward(r.data(), v.data(), m.data(), rows, t, gamma, lam, adv.data(), ret.data(), split, rows);

  // Same mask as bytes: bitwise equal results.
  std::vector<uint8_t> mb(total);
  for (size_t k = 0; k < total; ++k) mb[k] = m[k] != 0.0f ? 1 : 0;
  std::vector<float> adv_b(total), ret_b(total);
  cpu::gae_forward(r.data(), v.data(), mb.data(), rows, t, gamma, lam, adv_b.data(), ret_b.data(), 0, rows);
  for (size_t k = 0; k < total; ++k) {
    if (adv_b[k] != adv[k] || ret_b[k] != ret[k]) {
      if (++failures <= 20) std::printf("FAIL uint8 mask differs at %zu (rows=%lld t=%lld)\n", k, (long long)rows,
                                        (long long)t);
    }
  }
  // Streams stacked twice over the same mask rows: [2 * rows, t] data, [rows, t] mask, both halves match.
  std::vector<float> r2(2 * total), v2(2 * total), adv2(2 * total), ret2(2 * total);
  for (size_t k = 0; k < total; ++k) {
    r2[k] = r2[total + k] = r[k];
    v2[k] = v2[total + k] = v[k];
  }
  cpu::gae_forward(r2.data(), v2.data(), mb.data(), rows, t, gamma, lam, adv2.data(), ret2.data(), 0, 2 * rows);
  for (size_t k = 0; k < 2 * total; ++k) {
    if (adv2[k] != adv[k % total] || ret2[k] != ret[k % total]) {
      if (++failures <= 20) std::printf("FAIL shared mask rows differ at %zu (rows=%lld t=%lld)\n", k,
                                        (long long)rows, (long long)t);
    }
  }

  char what[96];
  std::snprintf(what, sizeof(what), "gae rows=%lld t=%lld gamma=%g lam=%g", (long long)rows, (long long)t, gamma, lam);
  for (int64_t i = 0; i < rows; ++i) {
    double next_v = 0.0, last = 0.0;
    for (int64_t k = t - 1; k >= 0; --k) {
      const int64_t idx = i * t + k;
      const double vm = static_cast<double>(v[idx]) * m[idx];
      const double rm = static_cast<double>(r[idx]) * m[idx];
      last = rm + static_cast<double>(gamma) * next_v - vm + static_cast<double>(gamma) * lam * last;
      next_v = vm;
      // fp32 recursion: ~1e-7 relative per step, accumulated over the effective horizon 1 / (1 - gamma lam)
      expect_close(adv[idx], last, 5e-5, 1e-5, what, i, k);
      expect_close(ret[idx], last + vm, 5e-5, 1e-5, what, i, k);
    }
  }
}

}  // namespace

int main() {
#if defined(SAFERLHF_TEST_NEEDS_AVX2)
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
    std::printf("SKIP: this CPU lacks AVX2/FMA/F16C\n");
    return 77;
  }
#endif
  std::mt19937 gen(7);
  const int64_t shapes[][2] = {{1, 1}, {3, 1}, {1, 5}, {7, 13}, {8, 64}, {17, 33}, {128, 1024}};
  const float params[][2] = {{1.0f, 0.95f}, {0.99f, 0.95f}, {1.0f, 1.0f}, {0.5f, 0.0f}};
  for (const auto& s : shapes) {
    for (const auto& p : params) check(s[0], s[1], p[0], p[1], gen);
  }
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("gae: all checks passed\n");
  return 0;
}
