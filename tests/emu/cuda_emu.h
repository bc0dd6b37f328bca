// Runs the CUDA device code of csrc/*.cuh on the CPU, for tests on machines without a GPU.
//
// One std::thread per CUDA thread of a block, the blocks of a grid one after another on the same threads.
// Because only one block is resident at a time, `static` storage behaves as __shared__ memory;
// __syncthreads is a std::barrier over the block's threads; atomics are std::atomic_ref.
// cub::BlockReduce and cub::BlockScan are replaced by plain versions with the same calling convention
// and the same contract: results of Reduce/Sum are defined in thread 0 only (the other threads get their
// own input back, as a wrong value to rely on), and the temp storage must not be reused before the caller's
// next __syncthreads (these versions end without a barrier, as cub's do).
// What this checks: the kernels' arithmetic, indexing, tiling, block-level synchronization and their use of
// the block primitives. What it cannot: warp-level behaviour, the memory model of a GPU, launch limits,
// performance.
#pragma once
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <math.h>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static

namespace emu {
struct Index {
  unsigned x = 0, y = 0, z = 0;
};
inline std::barrier<>* block_barrier = nullptr;

// Runs kernel() for every block of a 1-D grid of `grid` blocks of `block` threads.
template <typename Kernel>
void launch(unsigned grid, unsigned block, Kernel kernel);
}  // namespace emu

inline thread_local emu::Index threadIdx, blockIdx;

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline float __expf(float x) { return std::exp(x); }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  std::atomic_ref<unsigned long long> ref(*address);
  unsigned long long old = ref.load();
  while (value < old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}

template <typename Kernel>
void emu::launch(unsigned grid, unsigned block, Kernel kernel) {
  std::barrier<> barrier(block);
  block_barrier = &barrier;
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (unsigned t = 0; t < block; ++t) {
    threads.emplace_back([&, t] {
      threadIdx.x = t;
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        kernel();
        barrier.arrive_and_wait();  // the next block starts when every thread of this one is done
      }
    });
  }
  for (auto& th : threads) th.join();
  block_barrier = nullptr;
}

namespace emu {
// The temp storage of the block primitives below: one value per thread, published to the block.
template <typename T, int BLOCK>
struct Slots {
  T slot[BLOCK];
  void publish(T input) {
    slot[threadIdx.x] = input;
    __syncthreads();
  }
};
}  // namespace emu

namespace cub {

template <typename T, int BLOCK>
struct BlockReduce {
  using TempStorage = emu::Slots<T, BLOCK>;
  TempStorage& storage;
  explicit BlockReduce(TempStorage& s) : storage(s) {}

  template <typename Op>
  T Reduce(T input, Op op) {
    storage.publish(input);
    if (threadIdx.x != 0) return input;
    // cub's default order (BLOCK_REDUCE_WARP_REDUCTIONS): a tree within each warp of 32, then the warp
    // aggregates in order, so rounding errors are those of the GPU's, not of one long sequential sum.
    T acc = warp_tree(0, op);
    for (int w = 32; w < BLOCK; w += 32) acc = op(acc, warp_tree(w, op));
    return acc;
  }
  T Sum(T input) { return Reduce(input, std::plus<T>()); }

 private:
  template <typename Op>
  T warp_tree(int first, Op op) const {
    T lane[32];
    const int n = BLOCK - first < 32 ? BLOCK - first : 32;
    for (int i = 0; i < n; ++i) lane[i] = storage.slot[first + i];
    for (int step = 1; step < n; step *= 2)
      for (int i = 0; i + step < n; i += 2 * step) lane[i] = op(lane[i], lane[i + step]);
    return lane[0];
  }
};

template <typename T, int BLOCK>
struct BlockScan {
  using TempStorage = emu::Slots<T, BLOCK>;
  TempStorage& storage;
  explicit BlockScan(TempStorage& s) : storage(s) {}

  // output = init op x_0 op ... op x_{tid-1} (left to right)
  template <typename Op>
  void ExclusiveScan(T input, T& output, T init, Op op) {
    storage.publish(input);
    output = init;
    for (unsigned i = 0; i < threadIdx.x; ++i) output = op(output, storage.slot[i]);
  }
  // output = x_0 + ... + x_{tid-1}, aggregate = x_0 + ... + x_{BLOCK-1} in every thread
  void ExclusiveSum(T input, T& output, T& aggregate) {
    storage.publish(input);
    output = T(0);
    for (unsigned i = 0; i < threadIdx.x; ++i) output += storage.slot[i];
    aggregate = output;
    for (int i = threadIdx.x; i < BLOCK; ++i) aggregate += storage.slot[i];
  }
};

}  // namespace cub
