// CUDA implementations of the fastrlhf operators (schemas and semantics: ops.cpp).
//
// gae: one block per row, the row walked in tiles of BLOCK*ITEMS positions from the end. The
//   recurrence A_t = a_t A_{t+1} + b_t (a_t = gamma lam m_t, b_t = delta_t m_t) is affine, so each
//   thread composes the maps of its ITEMS contiguous positions, a block scan of the maps (tid 0 holds
//   the rightmost chunk) gives each thread the A entering its chunk, and the tile's leftmost A is the
//   carry into the next tile. Reads r, V, mask once (V_{t+1} of a chunk's last item comes from cache)
//   and writes A, R once: the bandwidth floor.
// sample_tokens: one block per row, no host synchronization. Passes over the row: online max /
//   sum-exp (and argmax); top-k: 4-pass radix select of the k-th largest z (8 bits per pass, counts);
//   top-p: 4-pass radix select on the probability mass (the smallest z whose strictly-larger mass
//   is < top_p * kept mass); the kept mass; the inverse-CDF draw in index order with a block scan.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <cstdint>

namespace fastrlhf {

// ---------------------------------------------------------------------------------------------
// GAE
// ---------------------------------------------------------------------------------------------

struct Affine {  // x -> a x + b
  float a, b;
};

// Scan operator: `first` holds the maps of positions to the right (applied first), `then` this one.
struct ThenApply {
  __device__ __forceinline__ Affine operator()(const Affine& first, const Affine& then) const {
    return {then.a * first.a, then.a * first.b + then.b};
  }
};

constexpr int GAE_BLOCK = 256;
constexpr int GAE_ITEMS = 4;

__global__ void __launch_bounds__(GAE_BLOCK)
gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values, const float* __restrict__ mask,
           float* __restrict__ adv, float* __restrict__ ret, int64_t T, float g, float c) {
  using Scan = cub::BlockScan<Affine, GAE_BLOCK>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ float carry_smem;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * T;
  const float *r = rewards + row, *v = values + row, *m = mask + row;
  float *A = adv + row, *R = ret + row;
  const int tid = threadIdx.x;
  constexpr int64_t TILE = static_cast<int64_t>(GAE_BLOCK) * GAE_ITEMS;
  float carry = 0.f;  // A just right of the tile
  for (int64_t tile_end = T; tile_end > 0; tile_end -= TILE) {
    const int64_t start = tile_end - static_cast<int64_t>(tid + 1) * GAE_ITEMS;  // my chunk [start, start+ITEMS)
    float ai[GAE_ITEMS], bi[GAE_ITEMS], vi[GAE_ITEMS], mi[GAE_ITEMS];
    Affine chunk{1.f, 0.f};
    float v_next = 0.f;
    const int64_t after = start + GAE_ITEMS;
    if (after < T && after >= 0) v_next = v[after] * m[after];
    for (int j = GAE_ITEMS - 1; j >= 0; --j) {
      const int64_t t = start + j;
      if (t >= 0 && t < T) {
        const float mt = m[t], vt = v[t] * mt;
        const float delta = r[t] * mt + g * v_next - vt;
        ai[j] = c * mt;
        bi[j] = delta * mt;
        vi[j] = vt;
        mi[j] = mt;
        v_next = vt;
      } else {
        ai[j] = 1.f, bi[j] = 0.f, vi[j] = 0.f, mi[j] = 0.f;
      }
      chunk = ThenApply()(chunk, Affine{ai[j], bi[j]});
    }
    Affine before;
    Scan(scan_tmp).ExclusiveScan(chunk, before, Affine{1.f, 0.f}, ThenApply());
    float x = before.a * carry + before.b;  // A at position start + ITEMS
    for (int j = GAE_ITEMS - 1; j >= 0; --j) {
      const int64_t t = start + j;
      x = ai[j] * x + bi[j];
      if (t >= 0 && t < T) {
        A[t] = x;
        R[t] = (x + vi[j]) * mi[j];
      }
    }
    if (tid == GAE_BLOCK - 1) carry_smem = x;  // the tile's leftmost position
    __syncthreads();
    carry = carry_smem;
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cuda(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& mask, double gamma, double lam) {
  check_gae(rewards, values, mask);
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

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

constexpr int SAMPLE_BLOCK = 1024;
constexpr int SAMPLE_ITEMS = 4;  // contiguous items per thread in the draw scan

// Order-preserving map float -> uint32 (larger float, larger key).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t bits = __float_as_uint(f);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

struct MaxSum {  // online softmax state, with the first index of the max
  float m, s;
  int64_t i;
};

struct MaxSumOp {
  __device__ __forceinline__ MaxSum operator()(const MaxSum& x, const MaxSum& y) const {
    const float m = fmaxf(x.m, y.m);
    if (m == -INFINITY) return {m, 0.f, x.i < y.i ? x.i : y.i};
    const float s = x.s * __expf(x.m - m) + y.s * __expf(y.m - m);
    int64_t i;
    if (x.m == y.m) i = x.i < y.i ? x.i : y.i;
    else i = x.m > y.m ? x.i : y.i;
    return {m, s, i};
  }
};

struct MaxLL {  // (cub::Max is gone in CCCL 3)
  __device__ __forceinline__ long long operator()(long long a, long long b) const { return a > b ? a : b; }
};

template <typename scalar_t>
__device__ __forceinline__ float tempered(const scalar_t* x, int64_t i, bool greedy, float tau) {
  const float xi = static_cast<float>(x[i]);
  return greedy ? xi : xi / tau;
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

  // 1. max, sum exp(z - max), argmax
  MaxSum st{-INFINITY, 0.f, V};
  for (int64_t i = tid; i < V; i += SAMPLE_BLOCK) {
    const float z = tempered(x, i, greedy, tau);
    st = MaxSumOp()(st, MaxSum{z, 1.f, i});
  }
  st = ReduceMS(tmp.ms).Reduce(st, MaxSumOp());
  if (tid == 0) s_ms = st;
  __syncthreads();
  const float zmax = s_ms.m;
  const float lse = zmax + logf(s_ms.s);
  if (greedy) {
    if (tid == 0) {
      tokens[blockIdx.x] = s_ms.i;
      logprobs[blockIdx.x] = tempered(x, s_ms.i, true, tau) - lse;
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
        const uint32_t key = float_key(tempered(x, i, false, tau));
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
      const float z = tempered(x, i, false, tau);
      if (float_key(z) >= thr) part += __expf(z - zmax);
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
        const float z = tempered(x, i, false, tau);
        const uint32_t key = float_key(z);
        if (key >= thr && (key & pmask) == prefix) {
          atomicAdd(&hist[(key >> shift) & 255u], __expf(z - zmax));
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

  // 4. kept mass
  float kept = 0.f;
  for (int64_t i = tid; i < V; i += SAMPLE_BLOCK) {
    const float z = tempered(x, i, false, tau);
    if (float_key(z) >= thr) kept += __expf(z - zmax);
  }
  kept = ReduceF(tmp.f).Sum(kept);
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
        const float z = tempered(x, i0 + j, false, tau);
        if (float_key(z) >= thr) w[j] = __expf(z - zmax);
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
    __syncthreads();
    const long long last = ReduceL(tmp.l).Reduce(static_cast<long long>(last_pos), MaxLL());
    if (tid == 0) s_tok = static_cast<unsigned long long>(last);
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t tok = static_cast<int64_t>(s_tok);
    tokens[blockIdx.x] = tok;
    logprobs[blockIdx.x] = tempered(x, tok, false, tau) - lse;
  }
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits, const at::Tensor& uniforms,
                                                      double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2, "sample_tokens: logits: expected 2 dims [B, V], got ", logits.sizes());
  TORCH_CHECK(logits.is_cuda() && logits.is_contiguous(), "sample_tokens: logits: expected a contiguous CUDA tensor");
  TORCH_CHECK(logits.size(1) > 0, "sample_tokens: logits: expected V > 0, got ", logits.sizes());
  TORCH_CHECK(temperature >= 0, "sample_tokens: temperature: expected >= 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "sample_tokens: top_k: expected >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "sample_tokens: top_p: expected a number in (0, 1], got ", top_p);
  const bool greedy = temperature == 0 || top_k == 1;
  const int64_t B = logits.size(0), V = logits.size(1);
  if (!greedy) {
    TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 1 && uniforms.size(0) == B &&
                    uniforms.is_contiguous() && uniforms.device() == logits.device(),
                "sample_tokens: uniforms: expected contiguous float64 [", B, "] on ", logits.device(), ", got ",
                uniforms.scalar_type(), " ", uniforms.sizes(), " on ", uniforms.device());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  const double* u = greedy ? nullptr : uniforms.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_tokens_cuda", [&] {
    sample_tokens_kernel<scalar_t><<<static_cast<unsigned>(B), SAMPLE_BLOCK, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), u, V, static_cast<float>(temperature), greedy, top_k, static_cast<float>(top_p),
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
