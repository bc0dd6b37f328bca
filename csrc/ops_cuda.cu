// CUDA launchers of the fastrlhf operators (schemas and semantics: ops.cpp; device code: gae.cuh,
// sample_tokens.cuh, which tests/test_cuda_emulated.py also runs on the CPU).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "gae.cuh"
#include "ops.h"
#include "sample_tokens.cuh"

namespace fastrlhf {

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  check_gae(rewards, values, mask, gamma, lam);
  TORCH_CHECK(rewards.is_cuda(), "gae: expected CUDA rewards, values and mask, got ", rewards.device());
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto adv = at::empty_like(rewards);
  auto ret = at::empty_like(rewards);
  const int64_t B = rewards.size(0), T = rewards.size(1);
  if (B > 0 && T > 0) {
    gae_kernel<<<static_cast<unsigned>(B), GAE_BLOCK, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rewards.data_ptr<float>(), values.data_ptr<float>(), mask.data_ptr<float>(), adv.data_ptr<float>(),
        ret.data_ptr<float>(), T, static_cast<float>(gamma), static_cast<float>(gamma * lam));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {adv, ret};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& uniforms,
                                                      double temperature, int64_t top_k, double top_p) {
  check_sample(logits, uniforms, temperature, top_k, top_p);
  TORCH_CHECK(logits.is_cuda(), "sample_tokens: logits: expected a CUDA tensor, got ", logits.device());
  const bool greedy = sample_is_greedy(temperature, top_k);
  const int64_t B = logits.size(0), V = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  const double* u = greedy ? nullptr : uniforms.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_tokens_cuda", [&] {
    sample_tokens_kernel<scalar_t><<<static_cast<unsigned>(B), SAMPLE_BLOCK, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), u, V, sample_tau(temperature), greedy, top_k, static_cast<float>(top_p),
        tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {tokens, logprobs};
}

TORCH_LIBRARY_IMPL(fastrlhf, CUDA, m) {
  m.impl("gae", &gae_cuda);
  m.impl("sample_tokens", &sample_tokens_cuda);
}

}  // namespace fastrlhf
