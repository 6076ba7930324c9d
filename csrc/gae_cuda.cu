// CUDA GAE: A_t = delta_t + c * A_{t+1} (c = gamma * lam), returns = A + v (contract: docs/kernels.md).
//
// Parallel decomposition
// ----------------------
// * One warp per row (rows are independent; 1 warp per block for few rows so they spread over all SMs, 4 for
//   many).  A row is walked in tiles of TILE = 32 * CH steps from its end to its start, carrying A and v across
//   tiles; a typical row (T = 1024) is a single tile.
// * Per tile: coalesced loads of r*m and v*m into shared memory (padded by one word per 32 so both the coalesced
//   phase and the "lane owns a contiguous chunk" phase are bank-conflict free).  Lane j owns the CH contiguous
//   steps [j*CH, (j+1)*CH) of the tile: it forms its deltas in registers and the affine map of its chunk,
//   A_chunk_start = c^CH * A_after_chunk + B_j.  A warp-level reverse Hillis-Steele scan composes these maps
//   (5 shuffle rounds) so every lane learns the A entering its chunk from the tile's carry.  Each lane then
//   re-runs the plain recurrence A = delta + c * A over its own chunk from that exact entry value, so within a
//   chunk the rounding is the reference loop's (only the chunk-entry values come from the reassociated scan),
//   and the results go back through shared memory for coalesced stores.
// * The work is O(T) per row with O(log 32) depth per tile instead of the O(T) dependent chain of the
//   reference loop; [128, 1024] is 128 warps each doing one tile.
// * Masked positions are not reset (the reference runs the recursion through padding); positions before the
//   row start in a partial tile have delta 0 and are never stored.
// * The mask is fp32 or bool (MaskT) with mask_rows rows; row i reads mask row i % mask_rows, so the stacked
//   [2 * B, T] reward + cost streams share one [B, T] mask without a converted, expanded copy.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_check.cuh"
#include "kernels_cuda.h"

namespace saferlhf::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// Shared-memory index of tile position i: one pad word per 32 keeps lane-chunk reads conflict-free.
__device__ __forceinline__ int pad(int i) { return i + (i >> 5); }

template <int CH, int WARPS, typename MaskT>
__global__ void __launch_bounds__(32 * WARPS)
    gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values, const MaskT* __restrict__ mask,
               int64_t mask_rows, int64_t rows, int64_t T, float gamma, float c, float* __restrict__ adv,
               float* __restrict__ ret) {
  constexpr int kTile = 32 * CH;
  constexpr int kSmem = kTile + CH + 1;  // > pad(kTile), the slot after the tile (never read, kept in bounds)
  __shared__ float s_val[WARPS][kSmem];   // v * m
  __shared__ float s_acc[WARPS][kSmem];   // r * m, then A
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (row >= rows) return;  // warp-uniform; the kernel only synchronises within a warp
  float* sv = s_val[warp];
  float* sa = s_acc[warp];
  const int64_t off = row * T;
  const float* R = rewards + off;
  const float* V = values + off;
  const MaskT* M = mask + (row % mask_rows) * T;
  float* out_a = adv + off;
  float* out_r = ret + off;

  float a_carry = 0.0f;  // A at t = tile end (A_T = 0)
  float v_next = 0.0f;   // v at t = tile end (v_T = 0)
  const int base = lane * CH;
  for (int64_t t_end = T; t_end > 0; t_end -= kTile) {
    const int64_t t0 = t_end - kTile;  // tile covers [t0, t_end); t0 < 0 only for the row's first tile
#pragma unroll 8
    for (int i = lane; i < kTile; i += 32) {
      const int64_t t = t0 + i;
      float r = 0.0f, v = 0.0f;
      if (t >= 0) {
        const float m = static_cast<float>(M[t]);
        r = __fmul_rn(R[t], m);
        v = __fmul_rn(V[t], m);
      }
      sa[pad(i)] = r;
      sv[pad(i)] = v;
    }
    __syncwarp();

    // delta_t = r_t + gamma * v_{t+1} - v_t, rounded as the reference does (no fma contraction).
    float d[CH];
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const float v1 = (k + 1 < CH || lane < 31) ? sv[pad(base + k + 1)] : v_next;
      d[k] = __fsub_rn(__fadd_rn(sa[pad(base + k)], __fmul_rn(gamma, v1)), sv[pad(base + k)]);
    }
    // Chunk map x -> P * x + B (x = A just after the chunk); P = c^CH is the same in every lane.
    float P = 1.0f, B = 0.0f;
#pragma unroll
    for (int k = CH - 1; k >= 0; --k) {
      B = fmaf(c, B, d[k]);
      P *= c;
    }
    // Reverse inclusive scan: lane j ends with F_j = f_j o f_{j+1} o ... o f_31.
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float Pn = __shfl_down_sync(kFull, P, o);
      const float Bn = __shfl_down_sync(kFull, B, o);
      if (lane + o < 32) {
        B = fmaf(P, Bn, B);
        P *= Pn;
      }
    }
    // A entering lane j's chunk = F_{j+1}(a_carry); lane 31 gets the tile's carry itself.
    const float Pn = __shfl_down_sync(kFull, P, 1);
    const float Bn = __shfl_down_sync(kFull, B, 1);
    float a = lane < 31 ? fmaf(Pn, a_carry, Bn) : a_carry;
    // The reference recurrence over the chunk from that entry value.
#pragma unroll
    for (int k = CH - 1; k >= 0; --k) {
      a = __fadd_rn(d[k], __fmul_rn(c, a));
      sa[pad(base + k)] = a;  // only this lane reads or writes its chunk's slots of sa here
    }
    a_carry = __shfl_sync(kFull, a, 0);  // A at the tile's first step: the carry into the earlier tile
    const float v_first = sv[pad(0)];    // v at t0: v_{t+1} for the earlier tile's last step
    __syncwarp();
#pragma unroll 8
    for (int i = lane; i < kTile; i += 32) {
      const int64_t t = t0 + i;
      if (t >= 0) {
        const float A = sa[pad(i)];
        out_a[t] = A;
        out_r[t] = __fadd_rn(A, sv[pad(i)]);
      }
    }
    v_next = v_first;
    __syncwarp();  // the next tile overwrites shared memory
  }
}

template <int CH, typename MaskT>
void launch(const float* rewards, const float* values, const MaskT* mask, int64_t mask_rows, int64_t rows, int64_t t,
            float gamma, float c, float* adv, float* ret, cudaStream_t stream) {
  // Few rows: one warp per block so the rows land on distinct SMs; many rows: 4 warps per block.
  if (rows >= 2048) {
    constexpr int kWarps = 4;
    const int64_t blocks = (rows + kWarps - 1) / kWarps;
    if (blocks > static_cast<int64_t>(INT_MAX)) throw std::runtime_error("saferlhf: too many rows for one launch");
    gae_kernel<CH, kWarps, MaskT><<<static_cast<unsigned>(blocks), 32 * kWarps, 0, stream>>>(
        rewards, values, mask, mask_rows, rows, t, gamma, c, adv, ret);
  } else {
    gae_kernel<CH, 1, MaskT><<<static_cast<unsigned>(rows), 32, 0, stream>>>(rewards, values, mask, mask_rows, rows,
                                                                              t, gamma, c, adv, ret);
  }
  SAFERLHF_CUDA_CHECK(cudaGetLastError());
}

template <typename MaskT>
void launch_for_length(const float* rewards, const float* values, const MaskT* mask, int64_t mask_rows, int64_t rows,
                       int64_t t, float gamma, float c, float* advantages, float* returns, cudaStream_t stream) {
  if (t <= 256) {
    launch<8>(rewards, values, mask, mask_rows, rows, t, gamma, c, advantages, returns, stream);  // tile 256
  } else {
    launch<32>(rewards, values, mask, mask_rows, rows, t, gamma, c, advantages, returns, stream);  // tile 1024
  }
}

}  // namespace

void gae_forward(const float* rewards, const float* values, const void* mask, bool mask_is_bool, int64_t mask_rows,
                 int64_t rows, int64_t t, float gamma, float lam, float* advantages, float* returns,
                 cudaStream_t stream) {
  if (rows <= 0 || t <= 0) return;
  // The reference multiplies by the Python float gamma * lam (a double product) rounded to fp32; gamma and lam
  // arrive here already rounded to fp32, so c can differ from it by one ulp.
  const float c = static_cast<float>(static_cast<double>(gamma) * static_cast<double>(lam));
  if (mask_is_bool) {
    launch_for_length(rewards, values, static_cast<const uint8_t*>(mask), mask_rows, rows, t, gamma, c, advantages,
                      returns, stream);
  } else {
    launch_for_length(rewards, values, static_cast<const float*>(mask), mask_rows, rows, t, gamma, c, advantages,
                      returns, stream);
  }
}

}  // namespace saferlhf::cuda
