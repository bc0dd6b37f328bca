// The CUDA kernels of csrc/ built for the CPU emulation of cuda_emu.h, with C entry points for ctypes
// (tests/test_cuda_emulated.py). Launch configurations are those of csrc/ops_cuda.cu: one block per row.
#include "cuda_emu.h"

#include "../../csrc/gae.cuh"
#include "../../csrc/sample_tokens.cuh"

extern "C" {

void emu_gae(const float* rewards, const float* values, const float* mask, float* adv, float* ret, int64_t B,
             int64_t T, float gamma, float gamma_lam) {
  emu::launch(static_cast<unsigned>(B), fastrlhf::GAE_BLOCK,
              [&] { fastrlhf::gae_kernel(rewards, values, mask, adv, ret, T, gamma, gamma_lam); });
}

// tau and greedy as ops_cuda.cu derives them from the temperature (sample_tau, sample_is_greedy in ops.h)
void emu_sample_tokens(const float* logits, const double* uniforms, int64_t B, int64_t V, float tau, int greedy,
                       int64_t top_k, float top_p, int64_t* tokens, float* logprobs) {
  emu::launch(static_cast<unsigned>(B), fastrlhf::SAMPLE_BLOCK, [&] {
    fastrlhf::sample_tokens_kernel<float>(logits, uniforms, V, tau, greedy != 0, top_k, top_p, tokens, logprobs);
  });
}

}  // extern "C"
