// Device code of fastrlhf::gae (launcher: ops_cuda.cu; semantics: ops.cpp). Needs cub's BlockScan
// (included by the .cu file; tests/emu/cuda_emu.h stands in for it when the tests run this kernel on the CPU).
//
// One block per row, the row walked in tiles of BLOCK*ITEMS positions from the end. The recurrence
// A_t = a_t A_{t+1} + b_t (a_t = k_t ? gamma lam : 0, b_t = k_t ? delta_t : 0, k_t = m_t != 0) is affine,
// so each thread composes the maps of its ITEMS contiguous positions, a block scan of the maps (tid 0
// holds the rightmost chunk) gives each thread the A entering its chunk, and the tile's leftmost A is the
// carry into the next tile. Reads r, V, mask once (V_{t+1} of a chunk's last item comes from cache) and
// writes A, R once: the bandwidth floor.
// Masked positions are selected to 0, never multiplied by m_t (padding may hold NaN or inf; ops.cpp).
#pragma once
#include <cstdint>

namespace fastrlhf {

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
    float ai[GAE_ITEMS], bi[GAE_ITEMS], vi[GAE_ITEMS];
    bool ki[GAE_ITEMS];
    Affine chunk{1.f, 0.f};
    float v_next = 0.f;
    const int64_t after = start + GAE_ITEMS;
    if (after < T && after >= 0 && m[after] != 0.f) v_next = v[after];
    for (int j = GAE_ITEMS - 1; j >= 0; --j) {
      const int64_t t = start + j;
      if (t >= 0 && t < T) {
        const bool keep = m[t] != 0.f;
        const float vt = keep ? v[t] : 0.f;
        const float delta = (keep ? r[t] : 0.f) + g * v_next - vt;
        ai[j] = keep ? c : 0.f;
        bi[j] = keep ? delta : 0.f;
        vi[j] = vt;
        ki[j] = keep;
        v_next = vt;
      } else {
        ai[j] = 1.f, bi[j] = 0.f, vi[j] = 0.f, ki[j] = false;
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
        A[t] = ki[j] ? x : 0.f;
        R[t] = ki[j] ? x + vi[j] : 0.f;
      }
    }
    if (tid == GAE_BLOCK - 1) carry_smem = x;  // the tile's leftmost position
    __syncthreads();
    carry = carry_smem;
    __syncthreads();
  }
}

}  // namespace fastrlhf
