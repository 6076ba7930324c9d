// The lean CPU decode step of the generation engine (saferlhf_fast/engine/fast_decode.py), one torch op:
//
//   saferlhf::decode_step(tok [B], pos [B], embed [V, H], weights, biases, norm_w, lm_w, k_cache, v_cache,
//                         cos [P, d], sin [P, d], mask [B, S], windows, slot, n_heads, n_kv, inter, eps, packed)
//     -> logits [B, V] fp32
//
// One token per row through every decoder layer (RMSNorm, fused q/k/v projection, RoPE, in-place KV-cache write
// at `slot`, grouped-query attention over cache slots [0, slot], o projection, RMSNorm, fused gate/up projection,
// SiLU * up, down projection, residuals), the final RMSNorm and the lm_head.  The matmuls are oneDNN's
// (mkldnn::_linear_pointwise on prepacked weights, `packed`) or at::mm on [in, out] weights; everything between
// them runs here in plain loops, so a step is ~10 dispatcher calls per layer fewer than ~45 torch ops per layer.
//
// Per layer l, weights[6 l .. 6 l + 5] = input_layernorm, qkv [(nh + 2 nkv) d, H] (or packed), o, post-attention
// layernorm, gate_up [2 I, H], down; biases[4 l .. 4 l + 3] = qkv, o, gate_up, down (None when absent).
// Precision: the matmul weights (and their biases) are all fp32 or all bf16; with bf16 ones every matmul runs in
// bf16 (input rounded to bf16, fp32 accumulation, bf16 output widened to fp32) and the rest stays fp32: embedding
// rows (fp32 or bf16 table) widened to fp32, norm weights fp32, RoPE, attention, SiLU, residuals, logits fp32.
// k_cache / v_cache [L, B, nkv, S, d] contiguous fp32; mask [B, S] additive fp32 (0 / -inf: prompt padding);
// windows[l] > 0: sliding window of layer l (keys older than slot + 1 - window are masked).  Same math as
// LlamaForCausalLM.forward_cached in fp32; only the order of the sums differs (fp32 rounding; with bf16 weights,
// the bf16 roundings of the matmuls as under bf16 autocast).
//
// torch-dependent on purpose (named *_ops.cpp, not *_cpu.cpp, so the torch-free CMake core does not glob it).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <optional>
#include <vector>

#include "kernels_cpu.h"

namespace saferlhf::decode {

using at::Tensor;

// y = x @ W (+ b) in the weight's dtype: a bf16 weight (bf16 autocast, or a model held in bf16) takes its input
// rounded to bf16 just before the matmul (oneDNN / at::mm accumulate in fp32) and returns the bf16 product (the
// callers widen it to fp32: exactly, so everything between the matmuls stays fp32); an fp32 weight runs the fp32
// matmul unchanged.
Tensor linear_same_dtype(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool packed);

Tensor linear_in_weight_dtype(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool packed) {
  return linear_same_dtype(w.scalar_type() == at::kBFloat16 ? x.to(at::kBFloat16) : x, w, b, packed);
}

// The product as fp32 (a no-op for fp32 weights).
Tensor linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool packed) {
  return linear_in_weight_dtype(x, w, b, packed).to(at::kFloat);
}

Tensor linear_same_dtype(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool packed) {
  if (packed) {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack st;
    st.reserve(6);
    st.emplace_back(x);
    st.emplace_back(w);
    if (b.has_value()) {
      st.emplace_back(*b);
    } else {
      st.emplace_back(c10::IValue());
    }
    st.emplace_back(std::string("none"));
    st.emplace_back(c10::List<std::optional<at::Scalar>>());
    st.emplace_back(c10::IValue());
    op.callBoxed(&st);
    return st[0].toTensor();
  }
  return b.has_value() ? at::addmm(*b, x, w) : at::mm(x, w);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void rms_norm_rows(const float* x, const float* w, float* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* o = out + r * n;
    const float ss = dot(xr, xr, n);
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) o[i] = w[i] * (xr[i] * rstd);
  }
}

Tensor decode_step(const Tensor& tok, const Tensor& pos, const Tensor& embed, at::TensorList weights,
                   const c10::List<std::optional<Tensor>>& biases, const Tensor& norm_w, const Tensor& lm_w,
                   Tensor k_cache, Tensor v_cache, const Tensor& cos_t, const Tensor& sin_t, const Tensor& mask,
                   at::IntArrayRef windows, int64_t slot, int64_t n_heads, int64_t n_kv, int64_t inter, double eps,
                   bool packed) {
  TORCH_CHECK((embed.scalar_type() == at::kFloat || embed.scalar_type() == at::kBFloat16) &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "decode_step: fp32 / bf16 embedding, fp32 cache expected");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && mask.is_contiguous() &&
                  cos_t.is_contiguous() && sin_t.is_contiguous(),
              "decode_step: contiguous cache / mask / rope tables expected");
  const int64_t n_layers = static_cast<int64_t>(windows.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 6 * n_layers, "decode_step: 6 weights per layer");
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == 4 * n_layers, "decode_step: 4 biases per layer");
  const int64_t B = tok.size(0), H = embed.size(1), d = cos_t.size(1), S = k_cache.size(3);
  const int64_t G = n_heads / n_kv, nq = n_heads * d, total = slot + 1;
  TORCH_CHECK(slot >= 0 && slot < S, "decode_step: slot out of range");
  TORCH_CHECK(k_cache.size(0) == n_layers && k_cache.size(1) == B && k_cache.size(2) == n_kv && k_cache.size(4) == d,
              "decode_step: cache shape");
  const float feps = static_cast<float>(eps);
  const float scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));
  const int64_t half = d / 2;

  Tensor x = embed.index_select(0, tok).to(at::kFloat).contiguous();  // [B, H] fp32 residual stream
  Tensor h = at::empty_like(x);
  Tensor q = at::empty({B, n_heads, d}, x.options());
  Tensor att = at::empty({B, nq}, x.options());
  Tensor act = at::empty({B, inter}, x.options());
  auto pos_c = pos.to(at::kLong).contiguous();
  const int64_t* pp = pos_c.data_ptr<int64_t>();
  const float* cosp = cos_t.data_ptr<float>();
  const float* sinp = sin_t.data_ptr<float>();
  const float* maskp = mask.data_ptr<float>();
  float* kbase = k_cache.data_ptr<float>();
  float* vbase = v_cache.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* ap = att.data_ptr<float>();
  float* actp = act.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int64_t l = 0; l < n_layers; ++l) {
    const Tensor& ln1 = weights[6 * l];
    const Tensor& ln2 = weights[6 * l + 3];
    const std::optional<Tensor> b_qkv = biases.get(4 * l), b_o = biases.get(4 * l + 1),
                                b_gu = biases.get(4 * l + 2), b_dn = biases.get(4 * l + 3);
    // --- attention block
    rms_norm_rows(xp, ln1.data_ptr<float>(), hp, B, H, feps);
    Tensor qkv = linear(h, weights[6 * l + 1], b_qkv, packed).contiguous();  // [B, (nh + 2 nkv) d]
    const float* qkvp = qkv.data_ptr<float>();
    const int64_t row = qkv.size(1);
    float* kl = kbase + l * B * n_kv * S * d;
    float* vl = vbase + l * B * n_kv * S * d;
    for (int64_t b = 0; b < B; ++b) {
      const float* c = cosp + pp[b] * d;
      const float* s = sinp + pp[b] * d;
      const float* src_row = qkvp + b * row;
      for (int64_t head = 0; head < n_heads + n_kv; ++head) {
        const float* src = src_row + head * d;
        float* dst = head < n_heads ? qp + (b * n_heads + head) * d
                                    : kl + ((b * n_kv + (head - n_heads)) * S + slot) * d;
        for (int64_t i = 0; i < d; ++i) {
          const float rolled = src[i < half ? i + d - half : i - half];
          dst[i] = src[i] * c[i] + rolled * s[i];  // x * cos + roll(x, d/2) * sin_signed
        }
      }
      const float* vsrc = src_row + (n_heads + n_kv) * d;
      for (int64_t kh = 0; kh < n_kv; ++kh) {
        std::copy(vsrc + kh * d, vsrc + (kh + 1) * d, vl + ((b * n_kv + kh) * S + slot) * d);
      }
    }
    const int64_t w = windows[l];
    const int64_t first = (w > 0 && total > w) ? total - w : 0;
    // (row, kv head) units on the threads: each owns its output slice and a private score buffer, so the result
    // is the same on any number of threads.
    at::parallel_for(0, B * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(total));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / n_kv, kh = unit % n_kv;
      const float* mrow = maskp + b * S;
      {
        const float* kk = kl + (b * n_kv + kh) * S * d;
        const float* vv = vl + (b * n_kv + kh) * S * d;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t head = kh * G + g;
          const float* qv = qp + (b * n_heads + head) * d;
          float mx = neg_inf;
          for (int64_t j = 0; j < total; ++j) {
            const float sc = j < first ? neg_inf : dot(qv, kk + j * d, d) * scale + mrow[j];
            scores[j] = sc;
            mx = sc > mx ? sc : mx;
          }
          float sum = 0.f;
          for (int64_t j = 0; j < total; ++j) {
            const float e = scores[j] == neg_inf ? 0.f : std::exp(scores[j] - mx);
            scores[j] = e;
            sum += e;
          }
          float* out = ap + b * nq + head * d;
          for (int64_t i = 0; i < d; ++i) out[i] = 0.f;
          for (int64_t j = 0; j < total; ++j) {
            const float p = scores[j] / sum;
            if (p == 0.f) continue;
            const float* vj = vv + j * d;
            for (int64_t i = 0; i < d; ++i) out[i] += p * vj[i];
          }
        }
      }
    }
    });
    x.add_(linear_in_weight_dtype(att, weights[6 * l + 2], b_o, packed));  // a bf16 product widens in the add
    // --- MLP block
    rms_norm_rows(xp, ln2.data_ptr<float>(), hp, B, H, feps);
    Tensor gu = linear(h, weights[6 * l + 4], b_gu, packed).contiguous();  // [B, 2 I]
    const float* gup = gu.data_ptr<float>();
    at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const float* gr = gup + b * 2 * inter;
        float* ar = actp + b * inter;
        for (int64_t i = 0; i < inter; ++i) {
          const float gv = gr[i];
          ar[i] = (gv / (1.0f + std::exp(-gv))) * gr[inter + i];
        }
      }
    });
    x.add_(linear_in_weight_dtype(act, weights[6 * l + 5], b_dn, packed));
  }
  rms_norm_rows(xp, norm_w.data_ptr<float>(), hp, B, H, feps);
  return linear(h, lm_w, std::nullopt, packed);
}

// Next token of every row from one step's logits [B, V] (fp32): greedy (argmax of the raw logits, first maximum)
// or one inverse-CDF draw (uniform u [B] fp64, cumulative sum in fp64 over the vocabulary in index order) from
// softmax(logits / temperature) restricted to the top_k largest (0: all; ties at the k-th value are kept, as
// transformers' TopKLogitsWarper).  The log-prob returned with each token is log_softmax(logits / T)[token] of the
// raw logits, computed by the log-prob kernel the training forward uses (saferlhf::cpu::logprobs_forward).
int64_t draw(const std::vector<int64_t>& idx, const std::vector<double>& w, double target, int64_t V) {
  double c = 0.0;
  for (size_t i = 0; i < w.size(); ++i) {
    c += w[i];
    if (c > target) return idx[i];
  }
  return idx.empty() ? V - 1 : idx.back();
}

std::tuple<Tensor, Tensor> sample_tokens(const Tensor& logits, const Tensor& u, double temperature, int64_t top_k,
                                         bool greedy) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "sample_tokens: contiguous fp32 [B, V] logits expected");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(greedy || (u.scalar_type() == at::kDouble && u.numel() == B), "sample_tokens: u must be fp64 [B]");
  auto uc = greedy ? u : u.contiguous();
  Tensor tokens = at::empty({B}, logits.options().dtype(at::kLong));
  Tensor logp = at::empty({B}, logits.options());
  Tensor lse = at::empty({B}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const double* up = greedy ? nullptr : uc.data_ptr<double>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  float* logpp = logp.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const float t = static_cast<float>(temperature);
  const float inv_t = 1.0f / t;
  const int64_t k = (top_k > 0 && top_k < V) ? top_k : 0;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> heap;
    std::vector<int64_t> kept;
    std::vector<double> w;
    heap.reserve(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r) {
      const float* x = lp + r * V;
      int64_t tok = 0;
      if (greedy) {
        float best = x[0];
        for (int64_t v = 1; v < V; ++v) {
          if (x[v] > best) {
            best = x[v];
            tok = v;
          }
        }
      } else if (k > 0) {
        // k-th largest of z = x / T through a size-k min-heap (one compare per element for most of the row),
        // then the kept tokens (z >= kth, ties included) in index order: weights exp(z - max), one draw.
        heap.clear();
        for (int64_t v = 0; v < V; ++v) {
          const float z = x[v] * inv_t;
          if (static_cast<int64_t>(heap.size()) < k) {
            heap.push_back(z);
            std::push_heap(heap.begin(), heap.end(), std::greater<float>());
          } else if (z > heap.front()) {
            std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
            heap.back() = z;
            std::push_heap(heap.begin(), heap.end(), std::greater<float>());
          }
        }
        const float kth = heap.front();
        const float m = *std::max_element(heap.begin(), heap.end());
        kept.clear();
        w.clear();
        double total = 0.0;
        for (int64_t v = 0; v < V; ++v) {
          const float z = x[v] * inv_t;
          if (z >= kth) {
            const double e = static_cast<double>(std::exp(z - m));
            kept.push_back(v);
            w.push_back(e);
            total += e;
          }
        }
        tok = draw(kept, w, up[r] * total, V);
      } else {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t v = 0; v < V; ++v) m = std::max(m, x[v] * inv_t);
        w.resize(V);
        double total = 0.0;
        for (int64_t v = 0; v < V; ++v) {
          const double e = static_cast<double>(std::exp(x[v] * inv_t - m));
          w[v] = e;
          total += e;
        }
        const double target = up[r] * total;
        double c = 0.0;
        tok = V - 1;
        for (int64_t v = 0; v < V; ++v) {
          c += w[v];
          if (c > target) {
            tok = v;
            break;
          }
        }
      }
      tp[r] = tok;
      saferlhf::cpu::logprobs_forward(x, saferlhf::ScalarKind::kFloat32, V, V, &tp[r], t, -100, false, &logpp[r],
                                      &lsep[r], nullptr, 0, 1);
    }
  });
  return {tokens, logp};
}

}  // namespace saferlhf::decode

// Schemas here, kernels at the CPU key (not CompositeImplicitAutograd), so a fake implementation can stand beside
// them for torch.compile (saferlhf_fast/ops/fakes.py).
TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def(
      "decode_step(Tensor tok, Tensor pos, Tensor embed, Tensor[] weights, Tensor?[] biases, Tensor norm_w, "
      "Tensor lm_w, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, Tensor sin, Tensor mask, int[] windows, "
      "int slot, int n_heads, int n_kv, int inter, float eps, bool packed) -> Tensor");
  m.def("sample_tokens(Tensor logits, Tensor u, float temperature, int top_k, bool greedy) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("decode_step", &saferlhf::decode::decode_step);
  m.impl("sample_tokens", &saferlhf::decode::sample_tokens);
}

// The decode step takes oneDNN-prepacked projection weights, whose tensors dispatch on MkldnnCPU.
TORCH_LIBRARY_IMPL(saferlhf, MkldnnCPU, m) {
  m.impl("decode_step", &saferlhf::decode::decode_step);
}
