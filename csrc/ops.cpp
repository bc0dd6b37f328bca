// The operators of the fastrlhf extension: schemas, and the CPU implementations.
// (CUDA implementations: ops_cuda.cu, registered for the same schemas.)
//
//   fastrlhf::gae(rewards, values, mask, gamma, lam) -> (advantages, returns)
//       rewards, values, mask: float32 [B, T], contiguous, right padded (mask a prefix of ones); gamma,
//       lam in [0, 1]. Per row, from t = T-1 down to 0, with k_t = (m_t != 0) and sel(k, a) = k ? a : 0
//       (a select, never a product with m_t: padding may hold NaN or inf, and 0 * NaN = NaN):
//           v_t = sel(k_t, V_t), v_T = 0,   delta_t = sel(k_t, r_t) + gamma v_{t+1} - v_t,
//           A_t = sel(k_t, delta_t + gamma lam A_{t+1}),   R_t = sel(k_t, A_t + v_t)
//       (fastrlhf.ref.gae, same float32 operation order).
//
//   fastrlhf::sample_tokens(logits, uniforms, temperature, top_k, top_p) -> (tokens, logprobs)
//       logits [B, V] (float32/bf16/fp16/float64), uniforms float64 [B] in [0, 1) (unused when greedy).
//       z = (logits - max logits) / tau (tau = temperature, 1 when temperature == 0; temperature is 0 or
//       >= FLT_MIN; the shift keeps z <= 0, so no finite logit overflows at any tau); keep the top_k
//       largest z (0 = all; ties at the k-th value kept), then the smallest set of largest z whose mass
//       under the top-k-renormalized softmax reaches top_p; draw by inverse CDF over the kept tokens in
//       index order: the first i with sum_{j <= i, kept} e_j > u * sum_{kept} e_j, e_j = exp(z_j)
//       (float32; sums in float64). tokens int64 [B];
//       logprobs float32 [B] = z_tok - logsumexp(z) (the tempered full softmax).
//       temperature == 0 or top_k == 1: greedy (first index of the max logit), its log-prob under the
//       same softmax: untempered only when temperature == 0.
//       A row with a NaN logit, a +inf one or no finite one still gets an index in [0, V) (which one is
//       unspecified), with logprob NaN: no host synchronization, and nothing out of range downstream.
//   Both keep sets are thresholds on z: kept(i) <=> z_i >= thr.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace fastrlhf {

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  check_gae(rewards, values, mask, gamma, lam);
  auto adv = at::empty_like(rewards);
  auto ret = at::empty_like(rewards);
  const int64_t B = rewards.size(0), T = rewards.size(1);
  const float g = static_cast<float>(gamma), c = static_cast<float>(gamma * lam);
  const float *pr = rewards.data_ptr<float>(), *pv = values.data_ptr<float>(), *pm = mask.data_ptr<float>();
  float *pa = adv.data_ptr<float>(), *pR = ret.data_ptr<float>();
  // grain: about 32k elements per task
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float *r = pr + b * T, *v = pv + b * T, *m = pm + b * T;
      float *a = pa + b * T, *R = pR + b * T;
      float last = 0.f, v_next = 0.f;
      for (int64_t t = T - 1; t >= 0; --t) {
        const bool keep = m[t] != 0.f;
        const float vt = keep ? v[t] : 0.f;
        const float delta = (keep ? r[t] : 0.f) + g * v_next - vt;
        last = keep ? delta + c * last : 0.f;
        a[t] = last;
        R[t] = keep ? last + vt : 0.f;
        v_next = vt;
      }
    }
  });
  return {adv, ret};
}

// One row: z [V] (already tempered), e [V] = exp(z - max z); returns the kept threshold thr
// (kept(i) <=> z_i >= thr).
static float keep_threshold(const std::vector<float>& z, const std::vector<float>& e, int64_t top_k, double top_p,
                            std::vector<int64_t>& idx) {
  const int64_t V = static_cast<int64_t>(z.size());
  float thr = -std::numeric_limits<float>::infinity();
  idx.resize(V);
  std::iota(idx.begin(), idx.end(), 0);
  int64_t n = V;
  const auto desc = [&](int64_t i, int64_t j) { return z[i] > z[j] || (z[i] == z[j] && i < j); };
  if (top_k > 0 && top_k < V) {
    std::nth_element(idx.begin(), idx.begin() + (top_k - 1), idx.end(), desc);
    thr = z[idx[top_k - 1]];
    n = std::partition(idx.begin(), idx.end(), [&](int64_t i) { return z[i] >= thr; }) - idx.begin();
  }
  if (top_p >= 1.0) return thr;
  double mass = 0;
  for (int64_t j = 0; j < n; ++j) mass += e[idx[j]];
  const double target = top_p * mass;
  // Sorted walk over the largest candidates; sort a prefix of M, doubling M until the mass is reached.
  double before = 0;
  int64_t j = 0;
  for (int64_t M = std::min<int64_t>(n, 256);; M = std::min<int64_t>(n, 2 * M)) {
    std::partial_sort(idx.begin() + j, idx.begin() + M, idx.begin() + n, desc);
    for (; j < M; ++j) {
      if (before >= target) return std::max(thr, z[idx[j - 1]]);  // j >= 1 here: target > 0
      before += e[idx[j]];
    }
    if (M == n) return thr;
  }
}

template <typename scalar_t>
static void sample_rows(const scalar_t* logits, const double* uniforms, int64_t b0, int64_t b1, int64_t V,
                        double temperature, int64_t top_k, double top_p, int64_t* tokens, float* logprobs) {
  const bool greedy = sample_is_greedy(temperature, top_k);
  const float tau = sample_tau(temperature);
  std::vector<float> z(V), e(V);
  std::vector<int64_t> idx;
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* x = logits + b * V;
    float xmax = -std::numeric_limits<float>::infinity();  // NaN never wins: such rows get logprob NaN below
    int64_t arg = 0;
    for (int64_t i = 0; i < V; ++i) {
      const float xi = static_cast<float>(x[i]);
      if (xi > xmax) xmax = xi, arg = i;
    }
    double sum = 0;
    for (int64_t i = 0; i < V; ++i) {
      z[i] = (static_cast<float>(x[i]) - xmax) / tau;  // max z = 0 (NaN for a +inf or all -inf row)
      e[i] = std::exp(z[i]);
      sum += e[i];
    }
    const double lse = std::log(sum);
    int64_t tok = arg;
    if (!greedy) {
      const float thr = keep_threshold(z, e, top_k, top_p, idx);
      double kept = 0;
      for (int64_t i = 0; i < V; ++i)
        if (z[i] >= thr) kept += e[i];
      const double target = uniforms[b] * kept;
      double cum = 0;
      for (int64_t i = 0; i < V; ++i) {
        if (z[i] < thr) continue;
        if (e[i] > 0) tok = i;  // the last positive-weight token, if rounding leaves cum <= target
        cum += e[i];
        if (cum > target) break;
      }
    }
    tokens[b] = tok;
    logprobs[b] = static_cast<float>(z[tok] - lse);
  }
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& uniforms,
                                                     double temperature, int64_t top_k, double top_p) {
  check_sample(logits, uniforms, temperature, top_k, top_p);
  const int64_t B = logits.size(0), V = logits.size(1);
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  const bool greedy = sample_is_greedy(temperature, top_k);
  const double* u = greedy ? nullptr : uniforms.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_tokens_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    int64_t* tok = tokens.data_ptr<int64_t>();
    float* lp = logprobs.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      sample_rows<scalar_t>(x, u, b0, b1, V, temperature, top_k, top_p, tok, lp);
    });
  });
  return {tokens, logprobs};
}

TORCH_LIBRARY(fastrlhf, m) {
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("sample_tokens(Tensor logits, Tensor uniforms, float temperature, int top_k, float top_p)"
        " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastrlhf, CPU, m) {
  m.impl("gae", &gae_cpu);
  m.impl("sample_tokens", &sample_tokens_cpu);
}

}  // namespace fastrlhf
