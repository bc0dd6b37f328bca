// Shared by ops.cpp (CPU) and ops_cuda.cu (CUDA): input checks of the fastrlhf operators.
#pragma once
#include <ATen/core/Tensor.h>

namespace fastrlhf {

// rewards, values, mask: float32 [B, T], contiguous, on one device.
inline void check_gae(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask) {
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
}

}  // namespace fastrlhf
