// Device code of fastrlhf::sample_tokens (launcher: ops_cuda.cu; semantics: ops.cpp). Needs cub's
// BlockReduce and BlockScan (included by the .cu file; tests/emu/cuda_emu.h stands in for them when the
// tests run this kernel on the CPU).
//
// One block per row, no host synchronization. z_i = (x_i - max x) / tau (ops.cpp: tau is 1 for the untempered
// greedy draw, and greedy only picks the argmax; the shift keeps z <= 0, so nothing overflows at tiny tau).
// Passes over the row: online max of x / sum of exp(z) (and argmax);
// top-k: 4-pass radix select of the k-th largest z (8 bits per pass, counts); top-p: 4-pass radix select
// on the probability mass (the smallest z whose strictly-larger mass is < top_p * kept mass); the kept
// mass (only when something was cut); the inverse-CDF draw in index order with a block scan per tile of
// SAMPLE_BLOCK * SAMPLE_ITEMS tokens, stopping at the tile that holds the draw. Passes over V: 2 plain,
// 7 with top-k, 8 with top-p, 12 with both (counting the draw, which stops early, as one).
#pragma once
#include <cmath>
#include <cstdint>

namespace fastrlhf {

constexpr int SAMPLE_BLOCK = 1024;
constexpr int SAMPLE_ITEMS = 4;  // contiguous items per thread in the draw scan

// Order-preserving map float -> uint32 (larger float, larger key).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t bits = __float_as_uint(f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct MaxSum {  // online softmax state: m = max x, s = sum exp((x - m) / tau), i = first index of the max
  float m, s;
  int64_t i;
};

struct MaxSumOp {
  float tau;
  __device__ __forceinline__ MaxSum operator()(const MaxSum& x, const MaxSum& y) const {
    const float m = fmaxf(x.m, y.m);
    if (m == -INFINITY) return {m, x.s + y.s, x.i < y.i ? x.i : y.i};  // s: 0, or NaN after a NaN logit
    const float s = x.s * __expf((x.m - m) / tau) + y.s * __expf((y.m - m) / tau);
    int64_t i;
    if (x.m == y.m) i = x.i < y.i ? x.i : y.i;
    else i = x.m > y.m ? x.i : y.i;
    return {m, s, i};
  }
};

struct MaxLL {  // (cub::Max is gone in CCCL 3)
  __device__ __forceinline__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};

// z_i = (x_i - max x) / tau, the same float32 operations as ops.cpp
template <typename scalar_t>
__device__ __forceinline__ float tempered(const scalar_t* x, int64_t i, float xmax, float tau) {
  return (static_cast<float>(x[i]) - xmax) / tau;
}

template <typename scalar_t>
__global__ void __launch_bounds__(SAMPLE_BLOCK)
sample_tokens_kernel(const scalar_t* __restrict__ logits, const double* __restrict__ uniforms, int64_t V,
                     float tau, bool greedy, int64_t top_k, float top_p, int64_t* __restrict__ tokens,
                     float* __restrict__ logprobs) {
  using ReduceMS = cub::BlockReduce<MaxSum, SAMPLE_BLOCK>;
  using ReduceF = cub::BlockReduce<float, SAMPLE_BLOCK>;
  using ReduceL = cub::BlockReduce<long long, SAMPLE_BLOCK>;
  using ScanF = cub::BlockScan<float, SAMPLE_BLOCK>;
  __shared__ union {
    typename ReduceMS::TempStorage ms;
    typename ReduceF::TempStorage f;
    typename ReduceL::TempStorage l;
    typename ScanF::TempStorage scan;
  } tmp;
  __shared__ float hist[256];
  __shared__ uint32_t counts[256];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_rank;
  __shared__ float s_above, s_f0, s_f1;
  __shared__ MaxSum s_ms;
  __shared__ unsigned long long s_tok;

  const int tid = threadIdx.x;
  const scalar_t* x = logits + static_cast<int64_t>(blockIdx.x) * V;

  // 1. max x, sum exp(z), argmax. A NaN logit enters as {-inf, NaN}: it never wins the max, and the NaN
  //    sum makes the row's log-probs NaN (ops.cpp: such rows still return an in-range token); so does
  //    a +inf logit or an all -inf row, whose z are NaN.
  const MaxSumOp combine{tau};
  MaxSum st{-INFINITY, 0.f, V};
  for (int64_t i = tid; i < V; i += SAMPLE_BLOCK) {
    const float xi = static_cast<float>(x[i]);
    st = combine(st, isnan(xi) ? MaxSum{-INFINITY, NAN, V} : MaxSum{xi, 1.f, i});
  }
  st = ReduceMS(tmp.ms).Reduce(st, combine);
  if (tid == 0) s_ms = st;
  __syncthreads();
  const float xmax = s_ms.m;
  const float lse = logf(s_ms.s);  // of z, whose max is 0
  const int64_t argmax = s_ms.i < V ? s_ms.i : 0;  // V: every logit NaN
  if (greedy) {
    if (tid == 0) {
      tokens[blockIdx.x] = argmax;
      logprobs[blockIdx.x] = tempered(x, argmax, xmax, tau) - lse;
    }
    return;
  }

  // 2. top-k: the key of the k-th largest z (radix select, counts per 8-bit digit)
  uint32_t thr = 0;  // kept(i) <=> key(z_i) >= thr
  if (top_k > 0 && top_k < V) {
    uint32_t prefix = 0, pmask = 0;
    if (tid == 0) s_rank = top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += SAMPLE_BLOCK) counts[b] = 0;
      __syncthreads();
      for (int64_t i = tid; i < V; i += SAMPLE_BLOCK) {
        const uint32_t key = float_key(tempered(x, i, xmax, tau));
        if ((key & pmask) == prefix) atomicAdd(&counts[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        int64_t rank = s_rank;
        int b = 255;
        for (; b > 0; --b) {
          if (counts[b] >= rank) break;
          rank -= counts[b];
        }
        s_rank = rank;
        s_prefix = prefix | (static_cast<uint32_t>(b) << shift);
      }
      __syncthreads();
      prefix = s_prefix;
      pmask |= 255u << shift;
    }
    thr = prefix;
  }

  // 3. top-p on the kept distribution: mass radix select
  if (top_p < 1.f) {
    float part = 0.f;
    for (int64_t i = tid; i < V; i += SAMPLE_BLOCK) {
      const float z = tempered(x, i, xmax, tau);
      if (float_key(z) >= thr) part += __expf(z);
    }
    part = ReduceF(tmp.f).Sum(part);
    if (tid == 0) {
      s_f0 = top_p * part;  // target mass
      s_above = 0.f;
    }
    __syncthreads();
    const float target = s_f0;
    uint32_t prefix = 0, pmask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += SAMPLE_BLOCK) hist[b] = 0.f, counts[b] = 0;
      __syncthreads();
      for (int64_t i = tid; i < V; i += SAMPLE_BLOCK) {
        const float z = tempered(x, i, xmax, tau);
        const uint32_t key = float_key(z);
        if (key >= thr && (key & pmask) == prefix) {
          atomicAdd(&hist[(key >> shift) & 255u], __expf(z));
          atomicAdd(&counts[(key >> shift) & 255u], 1u);
        }
      }
      __syncthreads();
      if (tid == 0) {
        // The lowest nonempty bin whose strictly-larger mass is still < target holds the threshold.
        float cum = s_above, sel_above = s_above;
        int sel = -1;
        for (int b = 255; b >= 0; --b) {
          if (counts[b] == 0) continue;
          if (cum < target || sel < 0) sel = b, sel_above = cum;
          else break;
          cum += hist[b];
        }
        s_above = sel_above;
        s_prefix = prefix | (static_cast<uint32_t>(sel) << shift);
      }
      __syncthreads();
      prefix = s_prefix;
      pmask |= 255u << shift;
    }
    thr = prefix > thr ? prefix : thr;
  }

  // 4. kept mass (nothing truncated, thr == 0: every key is >= 0 and pass 1's sum is that mass)
  float kept = s_ms.s;
  if (thr != 0u) {
    kept = 0.f;
    for (int64_t i = tid; i < V; i += SAMPLE_BLOCK) {
      const float z = tempered(x, i, xmax, tau);
      if (float_key(z) >= thr) kept += __expf(z);
    }
    kept = ReduceF(tmp.f).Sum(kept);
  }
  if (tid == 0) {
    s_f1 = static_cast<float>(uniforms[blockIdx.x] * static_cast<double>(kept));
    s_tok = ~0ull;
  }
  __syncthreads();
  const float target = s_f1;

  // 5. inverse CDF in index order: the first i with cumulative kept mass > target
  float carry = 0.f;
  int64_t last_pos = -1;  // this thread's last positive-weight index (rounding fallback)
  for (int64_t base = 0; base < V; base += static_cast<int64_t>(SAMPLE_BLOCK) * SAMPLE_ITEMS) {
    const int64_t i0 = base + static_cast<int64_t>(tid) * SAMPLE_ITEMS;
    float w[SAMPLE_ITEMS];
    float local = 0.f;
    for (int j = 0; j < SAMPLE_ITEMS; ++j) {
      w[j] = 0.f;
      if (i0 + j < V) {
        const float z = tempered(x, i0 + j, xmax, tau);
        if (float_key(z) >= thr) w[j] = __expf(z);
      }
      if (w[j] > 0.f) last_pos = i0 + j;
      local += w[j];
    }
    float excl, total;
    ScanF(tmp.scan).ExclusiveSum(local, excl, total);
    float cum = carry + excl;
    if (local > 0.f && cum <= target && cum + local > target) {
      int64_t pick = -1;
      for (int j = 0; j < SAMPLE_ITEMS && pick < 0; ++j) {
        if (w[j] <= 0.f) continue;
        pick = i0 + j;  // the last positive item is kept if rounding never crosses the target
        cum += w[j];
        if (cum <= target) pick = -1;
      }
      if (pick < 0) {
        for (int j = SAMPLE_ITEMS - 1; j >= 0 && pick < 0; --j)
          if (w[j] > 0.f) pick = i0 + j;
      }
      atomicMin(&s_tok, static_cast<unsigned long long>(pick));
    }
    __syncthreads();
    if (s_tok != ~0ull) break;
    carry += total;
  }
  if (s_tok == ~0ull) {  // rounding left the target above the total: the last kept token
    __syncthreads();      // (none with a positive weight: a NaN / +inf / all -inf row, whose log-prob is NaN)
    const long long last = ReduceL(tmp.l).Reduce(static_cast<long long>(last_pos), MaxLL());
    if (tid == 0) s_tok = static_cast<unsigned long long>(last >= 0 ? last : argmax);
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t tok = static_cast<int64_t>(s_tok);
    tokens[blockIdx.x] = tok;
    logprobs[blockIdx.x] = tempered(x, tok, xmax, tau) - lse;
  }
}

}  // namespace fastrlhf
