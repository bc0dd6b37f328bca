// Shared by ops.cpp (CPU) and ops_cuda.cu (CUDA): input checks of the fastrlhf operators (the second line
// of defence: fastrlhf.ops checks every argument first, with Python error messages).
#pragma once
#include <ATen/core/Tensor.h>

#include <cfloat>
#include <cmath>

namespace fastrlhf {

// rewards, values, mask: float32 [B, T], contiguous, on one device; gamma, lam finite in [0, 1].
inline void check_gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma,
                      double lam) {
  TORCH_CHECK(rewards.dim() == 2, "gae: rewards: expected 2 dims [B, T], got ", rewards.sizes());
  TORCH_CHECK(values.sizes() == rewards.sizes(), "gae: values: expected shape ", rewards.sizes(), ", got ",
              values.sizes());
  TORCH_CHECK(mask.sizes() == rewards.sizes(), "gae: mask: expected shape ", rewards.sizes(), ", got ",
              mask.sizes());
  for (const auto* t : {&rewards, &values, &mask}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "gae: expected float32 rewards, values and mask, got ",
                t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "gae: expected contiguous rewards, values and mask");
    TORCH_CHECK(t->device() == rewards.device(), "gae: expected rewards, values and mask on one device");
  }
  TORCH_CHECK(gamma >= 0 && gamma <= 1, "gae: gamma: expected a number in [0, 1], got ", gamma);  // NaN fails
  TORCH_CHECK(lam >= 0 && lam <= 1, "gae: lam: expected a number in [0, 1], got ", lam);
}

// The kernels' reading of (temperature, top_k): temperature == 0 or top_k == 1 draws the first index of
// the max logit; the log-prob is under softmax(x / tau) with tau = temperature, or 1 when temperature == 0.
inline bool sample_is_greedy(double temperature, int64_t top_k) { return temperature == 0 || top_k == 1; }
inline float sample_tau(double temperature) { return temperature > 0 ? static_cast<float>(temperature) : 1.f; }

// logits [B, V >= 1] contiguous; temperature 0 or finite >= FLT_MIN (the smallest normal float32: tau is a
// float32 divisor); top_k >= 0; top_p in (0, 1]; uniforms (read unless greedy) contiguous float64 [B] on
// the logits' device.
inline void check_sample(const at::Tensor& logits, const at::Tensor& uniforms, double temperature, int64_t top_k,
                         double top_p) {
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: logits: expected 2 dims [B, V], got ", logits.sizes());
  TORCH_CHECK(logits.is_contiguous(), "sample_tokens: logits: expected a contiguous tensor");
  TORCH_CHECK(logits.size(1) > 0, "sample_tokens: logits: expected V > 0, got ", logits.sizes());
  TORCH_CHECK(temperature == 0 || (std::isfinite(temperature) && temperature >= FLT_MIN),
              "sample_tokens: temperature: expected 0 or a finite number >= ", FLT_MIN, ", got ", temperature);
  TORCH_CHECK(top_k >= 0, "sample_tokens: top_k: expected >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "sample_tokens: top_p: expected a number in (0, 1], got ", top_p);
  if (!sample_is_greedy(temperature, top_k)) {
    TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 1 && uniforms.size(0) == logits.size(0) &&
                    uniforms.is_contiguous() && uniforms.device() == logits.device(),
                "sample_tokens: uniforms: expected contiguous float64 [", logits.size(0), "] on ", logits.device(),
                ", got ", uniforms.scalar_type(), " ", uniforms.sizes(), " on ", uniforms.device());
  }
}

}  // namespace fastrlhf
