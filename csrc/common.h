// Shared, torch-free definitions of the C++/CUDA core (the binding maps torch dtypes onto these).
#pragma once
#include <cstdint>

namespace saferlhf {

// Element type of a logits buffer; everything else in the core is fp32 (int64 for labels).
enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Rows per at::parallel_for task for rows of row_elems elements: max(1, grain_elems / max(row_elems, 1)), i.e.
// about grain_elems elements per task, so small inputs stay on one thread (each caller's grain_elems says how many
// of its elements pay for waking a thread).
constexpr int64_t grain_rows(int64_t row_elems, int64_t grain_elems) {
  const int64_t per_row = row_elems > 1 ? row_elems : 1;
  return grain_elems / per_row > 1 ? grain_elems / per_row : 1;
}

}  // namespace saferlhf
