// What a Handle refers to: the device metadata of one dispatch (a slot of the communicator's
// pool) and what the host learnt about it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "moecomm/config.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/streams.hpp"

namespace moecomm::detail {

class SlotPool;

/// Device metadata of one dispatch (a slot of the communicator's pool) and what the host knows.
struct HandleState {
  const void* owner = nullptr;  // the CommImpl that made it
  Mode mode = Mode::kHighThroughput;
  int64_t num_tokens = 0;
  int64_t num_recv = -1;  // HT, host-known N
  int buffer = 0;         // LL buffer
  uint64_t mask = 0;      // explicit rank mask when it was made (a cached dispatch needs it)
  std::vector<int> recv_per_expert_host;
  // Device arrays inside the slot.
  int32_t* send_row = nullptr;          // HT [T, R]
  int32_t* ll_slot = nullptr;           // LL [T, K]
  int32_t* num_recv_dev = nullptr;      // [1]
  int32_t* recv_per_expert = nullptr;   // [L] padded
  int32_t* recv_rank_prefix = nullptr;  // [R + 1]
  std::shared_ptr<SlotPool> pool;
  int slot = -1;
  ~HandleState();
};

// Handle storage: fixed-size slots of device memory, allocated in chunks up front so that no
// allocation (which may synchronise the device) happens while co-located ranks spin.
class SlotPool {
 public:
  static constexpr int kSlotsPerChunk = 32;

  SlotPool(int device, size_t slot_ints) : device_(device), slot_ints_(slot_ints) { grow(); }
  ~SlotPool() {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_);
    for (int32_t* c : chunks_) cudaFree(c);
    cudaSetDevice(prev);
  }

  int acquire() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) grow();
    const int s = free_.back();
    free_.pop_back();
    return s;
  }
  void release(int slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(slot);
  }
  int32_t* base(int slot) const {
    return chunks_[slot / kSlotsPerChunk] + (slot % kSlotsPerChunk) * slot_ints_;
  }

 private:
  void grow() {
    DeviceGuard guard(device_);
    int32_t* chunk = nullptr;
    MOECOMM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&chunk),
                                  sizeof(int32_t) * slot_ints_ * kSlotsPerChunk));
    const int first = static_cast<int>(chunks_.size()) * kSlotsPerChunk;
    chunks_.push_back(chunk);
    for (int i = kSlotsPerChunk - 1; i >= 0; --i) free_.push_back(first + i);
  }

  int device_;
  size_t slot_ints_;
  std::mutex mutex_;
  std::vector<int32_t*> chunks_;
  std::vector<int> free_;
};

}  // namespace moecomm::detail
