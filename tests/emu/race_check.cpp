// Runs every code path of the emulated kernels once, for a ThreadSanitizer build
// (tests/test_cuda_emulated.py::test_no_data_races_under_thread_sanitizer): shared memory touched by two
// threads without a __syncthreads between them is reported as a data race. Sizes cross the tiles
// (GAE: 2 tiles of 1024 positions; sampling: 3 draw tiles of 4096 tokens).
#include "kernels.cpp"

#include <cstdio>
#include <random>
#include <vector>

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 2.f);

  const int64_t B = 3, T = 2100;
  std::vector<float> r(B * T), v(B * T), m(B * T), adv(B * T), ret(B * T);
  for (int64_t i = 0; i < B * T; ++i) {
    r[i] = normal(rng), v[i] = normal(rng);
    m[i] = (i % T) < T - 700 * (i / T) ? 1.f : 0.f;  // lengths T, T - 700, T - 1400
  }
  emu_gae(r.data(), v.data(), m.data(), adv.data(), ret.data(), B, T, 1.f, 0.95f);

  const int64_t rows = 4, V = 9000;
  std::vector<float> logits(rows * V);
  for (auto& x : logits) x = normal(rng);
  std::vector<double> u = {0.1, 0.5, 0.9, 0.999999};
  std::vector<int64_t> tokens(rows);
  std::vector<float> logprobs(rows);
  struct Case {
    float tau;  // as the launcher passes it: 1 for temperature 0
    int greedy;
    int64_t top_k;
    float top_p;
  };
  for (const Case c : {Case{0.8f, 0, 40, 0.7f}, Case{1.f, 0, 0, 0.9f}, Case{1.f, 0, 0, 1.f}, Case{1.f, 1, 0, 1.f}}) {
    emu_sample_tokens(logits.data(), u.data(), rows, V, c.tau, c.greedy, c.top_k, c.top_p, tokens.data(),
                      logprobs.data());
    for (int64_t b = 0; b < rows; ++b) {
      if (tokens[b] < 0 || tokens[b] >= V) {
        std::printf("race_check: token %lld out of range\n", static_cast<long long>(tokens[b]));
        return 1;
      }
    }
  }
  std::printf("race_check: ok\n");
  return 0;
}
