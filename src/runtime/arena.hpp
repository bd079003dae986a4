// How memory is carved, and the shape of a group that every path sizes its regions from. The
// runtime lays out a list of regions it does not interpret: each path appends its own (see
// paths/regions.hpp) and keeps the offsets or pointers in its part of the DeviceContext.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "moecomm/config.hpp"
#include "runtime/device_context.hpp"

namespace moecomm::detail {

/// A byte range of an allocation.
struct ByteRange {
  size_t offset = 0;
  size_t bytes = 0;
};

/// Appends regions one after another, each 256-byte aligned, and is the one way moecomm carves
/// memory. The symmetric buffer is carved into offsets (every rank maps it at another address);
/// private memory into pointers from `base` (a first pass without a base measures the size).
/// Regions that must start at zero (signal words) are recorded, so that only they are cleared.
class Arena {
 public:
  Arena() = default;
  explicit Arena(void* base) : base_(reinterpret_cast<uintptr_t>(base)) {}
  /// Offsets that start at `origin` (a part of the symmetric buffer that begins past another).
  static Arena at_offset(size_t origin) {
    Arena a;
    a.size_ = (origin + kAlign - 1) / kAlign * kAlign;
    return a;
  }
  static constexpr size_t kAlign = 256;

  /// Offset of a new region of `count` elements of T.
  template <typename T>
  size_t offset(size_t count, bool zeroed = false) {
    const size_t at = size_;
    const size_t bytes = sizeof(T) * count;
    size_ += (bytes + kAlign - 1) / kAlign * kAlign;
    if (zeroed && bytes > 0) {
      if (!zeroed_.empty() && zeroed_.back().offset + zeroed_.back().bytes == at)
        zeroed_.back().bytes = size_ - zeroed_.back().offset;
      else
        zeroed_.push_back({at, size_ - at});
    }
    return at;
  }
  /// Pointer to a new region of `count` elements of T (meaningless while measuring).
  template <typename T>
  T* take(size_t count) {
    return reinterpret_cast<T*>(base_ + offset<T>(count));
  }
  size_t size() const { return size_; }
  /// The regions taken with zeroed = true, adjacent ones merged.
  const std::vector<ByteRange>& zeroed() const { return zeroed_; }

 private:
  uintptr_t base_ = 0;
  size_t size_ = 0;
  std::vector<ByteRange> zeroed_;
};

/// The dimensions every path sizes its regions from, derived once from the Config.
struct RegionShape {
  int num_ranks = 0;      // R
  int num_experts = 0;    // E
  int local_experts = 0;  // L
  int topk = 0;           // K
  int hidden = 0;         // H
  int max_tokens = 0;     // Tmax: largest T of any call (HT max_tokens_per_rank, LL capacity)
  int words = 0;          // W = ceil(Tmax / 32)
  /// Ranks in separate processes: a combine input that is not registered memory must be staged.
  bool separate_processes = false;
  int num_nodes = 1;  // N: nodes of the group (ranks r*G .. r*G+G-1 form node r)
  int node_size = 0;  // G = R / N
};

/// The shape of a group of num_ranks ranks on num_nodes nodes (num_nodes divides num_ranks).
RegionShape region_shape(const Config& config, int num_ranks, bool separate_processes,
                         int num_nodes = 1);

/// What a group allocates per rank: the symmetric buffer's size and the ranges to clear. The
/// buffer starts with the RDMA window (Config::rdma_bytes, cleared whole), then the rest.
struct SymmetricPlan {
  size_t bytes = 0;
  size_t window_bytes = 0;
  std::vector<ByteRange> zeroed;
};

/// The arena of the symmetric regions outside the RDMA window: they start past it.
inline Arena symmetric_arena(const Config& config) {
  return Arena::at_offset(static_cast<size_t>(config.rdma_bytes));
}

/// The runtime's own regions, laid out before every path's: the signal flags in the symmetric
/// buffer, and the call epoch, block ticket, grid barrier and abort flag in private memory.
/// Their sizes depend on no Config field (flags are kept for kMaxRanks sources).
void claim_common_regions(Arena& symmetric, Arena& local, RankContext& ctx);

}  // namespace moecomm::detail
