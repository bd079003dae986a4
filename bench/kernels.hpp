// ep_bench's own kernels: the launch gate that keeps host launch time out of the timings, and
// the two kernels of the naive pipeline (permute, unpermute) that moecomm is compared with.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace epb {

/// Spins one thread until *open != 0 (host-mapped memory), or until timeout_ns have passed, in
/// which case *timed_out is set. Everything queued behind it on `stream` waits meanwhile. The
/// global-timer time at which it saw the gate open goes to *released_ns.
void launch_gate(const volatile int* open, int* timed_out, uint64_t* released_ns,
                 uint64_t timeout_ns, cudaStream_t stream);

/// Gathers rows: dst[i] = src[src_row[i]] for i < rows; rows are `row_bytes` bytes apart in
/// both buffers (a multiple of 16).
void launch_permute(const void* src, const int32_t* src_row, int64_t rows, int64_t row_bytes,
                    void* dst, cudaStream_t stream);

/// Reduces returned rows per token: out[t] = bf16(acc) with acc = 0 and, for the entries j of
/// token t in order (offsets[t] .. offsets[t+1]), acc += row[rows_of[j]] or, with weights,
/// acc = fmaf(weights[j], row[rows_of[j]], acc). rows: bf16 [*, hidden], hidden % 8 == 0.
void launch_unpermute(const uint16_t* rows, const int32_t* offsets, const int32_t* rows_of,
                      const float* weights, int64_t tokens, int hidden, uint16_t* out,
                      cudaStream_t stream);

}  // namespace epb
