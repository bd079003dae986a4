#include "runtime/group_state.hpp"

#include <cstring>
#include <span>
#include <string>

#include "moecomm/error.hpp"
#include "moecomm/version.hpp"
#include "runtime/config_digest.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/streams.hpp"
#include "transport/gin_engine.hpp"

namespace moecomm::detail {

void GroupState::allocate(int r) {
  DeviceGuard guard(device_of[r]);
  const cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&sym_base[r]), plan.bytes);
  if (err == cudaErrorMemoryAllocation) {
    // Say how much was asked for and what the device had: the config's sizes decide the first.
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    const bool known = cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess;
    cudaGetLastError();
    throw CudaError("rank " + std::to_string(r) + ": the communication buffer of " +
                    std::to_string(plan.bytes) + " bytes could not be allocated on cuda:" +
                    std::to_string(device_of[r]) + " (out of memory" +
                    (known ? "; " + std::to_string(free_bytes) + " of " +
                                 std::to_string(total_bytes) + " bytes free)"
                           : ")"));
  }
  MOECOMM_CUDA_CHECK(err);
  owned_[r] = true;
  // Signals start at 0 (the first call's seq is 1); data regions need no initial value.
  for (const ByteRange& z : plan.zeroed)
    MOECOMM_CUDA_CHECK(cudaMemset(sym_base[r] + z.offset, 0, z.bytes));
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
}

GroupState::GroupState(const Config& cfg, const RegionShape& region_shape, int rank, int device,
                       const SymmetricPlan& symmetric)
    : config(cfg), num_ranks(region_shape.num_ranks), shape(region_shape), plan(symmetric) {
  single_address_space = num_ranks == 1;
  local_ranks = 1;
  device_of.assign(num_ranks, device);
  sym_base.assign(num_ranks, nullptr);
  owned_.assign(num_ranks, false);
  ipc_mapped_.assign(num_ranks, false);
  allocate(rank);
}

// A handle is the rank's config digest (checked by every rank in check_handles), then the host
// id of its node, then its buffer's CUDA IPC handle.
namespace {
constexpr size_t kHostIdOffset = kConfigDigestSize;
constexpr size_t kMachineIdOffset = kHostIdOffset + kHostIdSize;
constexpr size_t kNcclIdOffset = kMachineIdOffset + kHostIdSize;
constexpr size_t kIpcOffset = kNcclIdOffset + kNcclIdSize;
}  // namespace

size_t GroupState::handle_size() {
  return kIpcOffset + sizeof(cudaIpcMemHandle_t);
}

std::vector<uint8_t> GroupState::export_handle(int rank, const std::string& host_id,
                                               const std::vector<uint8_t>& nccl_id) const {
  std::vector<uint8_t> bytes = encode_config_digest(config, rank, num_ranks, version());
  const std::vector<uint8_t> host = encode_host_id(host_id);
  const std::vector<uint8_t> machine = encode_host_id(machine_id());
  DeviceGuard guard(device_of[rank]);
  cudaIpcMemHandle_t h;
  MOECOMM_CUDA_CHECK(cudaIpcGetMemHandle(&h, sym_base[rank]));
  bytes.resize(handle_size());
  std::memcpy(bytes.data() + kHostIdOffset, host.data(), host.size());
  std::memcpy(bytes.data() + kMachineIdOffset, machine.data(), machine.size());
  if (nccl_id.size() == kNcclIdSize)
    std::memcpy(bytes.data() + kNcclIdOffset, nccl_id.data(), kNcclIdSize);
  std::memcpy(bytes.data() + kIpcOffset, &h, sizeof(h));
  return bytes;
}

bool GroupState::one_machine(const std::vector<uint8_t>& handles) const {
  const auto machine = [&](int r) {
    return decode_host_id(std::span<const uint8_t>(
                              handles.data() + r * handle_size() + kMachineIdOffset, kHostIdSize),
                          r);
  };
  const std::string first = machine(0);
  for (int r = 1; r < num_ranks; ++r)
    if (machine(r) != first) return false;
  return true;
}

void GroupState::start_gin(int rank, const std::vector<uint8_t>& handles, const NodeLayout& nodes) {
  const uint8_t* id = handles.data() + kNcclIdOffset;  // rank 0's handle
  bool any = false;
  for (size_t i = 0; i < kNcclIdSize; ++i) any = any || id[i] != 0;
  if (!any)
    throw Unsupported(
        "the GIN engine: rank 0's handle carries no NCCL unique id (rank 0 runs a build "
        "without NCCL, or ncclGetUniqueId failed there, or Config.engine=loopback)");
  const std::string engine_name = std::string("Config.engine=") + rdma_engine_name(config.engine);
  auto engine =
      std::make_shared<GinEngine>(id, rank, num_ranks, device_of[rank], plan.bytes,
                                  static_cast<size_t>(config.rdma_bytes), nodes.node_size);
  if (!engine->available())
    throw Unsupported(engine_name + ": the GIN engine is unavailable: " + engine->missing() +
                      " [set up so far: " + engine->describe() + "]");
  DeviceGuard guard(device_of[rank]);
  uint8_t* buffer = engine->buffer();
  for (const ByteRange& z : plan.zeroed)
    MOECOMM_CUDA_CHECK(cudaMemset(buffer + z.offset, 0, z.bytes));
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
  const int first = rank / nodes.node_size * nodes.node_size;
  const std::vector<uint8_t*> node = engine->node_buffers(first, nodes.node_size);
  if (owned_[rank]) MOECOMM_CUDA_CHECK(cudaFree(sym_base[rank]));
  owned_[rank] = false;
  for (int i = 0; i < nodes.node_size; ++i) sym_base[first + i] = node[i];
  sym_base[rank] = buffer;
  gin = std::move(engine);
}

NodeLayout GroupState::check_handles(const std::vector<uint8_t>& handles) const {
  if (handles.size() != handle_size() * static_cast<size_t>(num_ranks))
    throw InvalidArgument("all_handles: expected " + std::to_string(num_ranks) + " x " +
                          std::to_string(handle_size()) +
                          " bytes (one handle per rank, rank order), got " +
                          std::to_string(handles.size()) +
                          " (a rank with another moecomm version has another handle size)");
  // Every rank compares every digest: a mismatch raises the same error on every rank, before
  // any peer is mapped.
  std::vector<std::span<const uint8_t>> digests;
  for (int r = 0; r < num_ranks; ++r)
    digests.emplace_back(handles.data() + r * handle_size(), kConfigDigestSize);
  check_config_digests(digests);
  std::vector<std::string> hosts;
  for (int r = 0; r < num_ranks; ++r)
    hosts.push_back(decode_host_id(
        std::span<const uint8_t>(handles.data() + r * handle_size() + kHostIdOffset, kHostIdSize),
        r));
  return node_layout(hosts);
}

void GroupState::map_peers(int rank, const std::vector<uint8_t>& handles) {
  if (handles.size() != handle_size() * static_cast<size_t>(num_ranks))
    throw InvalidArgument("all_handles: expected " + std::to_string(num_ranks) + " x " +
                          std::to_string(handle_size()) + " bytes, got " +
                          std::to_string(handles.size()));
  DeviceGuard guard(device_of[rank]);
  for (int r = 0; r < num_ranks; ++r) {
    if (r == rank) continue;
    cudaIpcMemHandle_t h;
    std::memcpy(&h, handles.data() + r * handle_size() + kIpcOffset, sizeof(h));
    void* ptr = nullptr;
    const cudaError_t err = cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it
      // Most often a peer on another host: CUDA IPC maps buffers of one host only.
      throw Unsupported("rank " + std::to_string(rank) + ": the buffer of rank " +
                        std::to_string(r) + " cannot be mapped through CUDA IPC (" +
                        cudaGetErrorName(err) +
                        "); every rank of a process group must run on this host (a group across "
                        "hosts needs a network RDMA engine, which this build does not have; "
                        "processes of one host may be declared as nodes with set_host_id)");
    }
    sym_base[r] = static_cast<uint8_t*>(ptr);
    ipc_mapped_[r] = true;
  }
}

GroupState::GroupState(const Config& cfg, const RegionShape& region_shape, std::vector<int> devices,
                       const SymmetricPlan& symmetric)
    : config(cfg), num_ranks(region_shape.num_ranks), shape(region_shape), plan(symmetric) {
  local_ranks = num_ranks;
  owned_.assign(num_ranks, false);
  ipc_mapped_.assign(num_ranks, false);
  for (int r = 0; r < num_ranks; ++r) device_of.push_back(devices[r % devices.size()]);

  // Peer access between every pair of distinct devices in use.
  for (int a : devices)
    for (int b : devices) {
      if (a == b) continue;
      int can = 0;
      MOECOMM_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, a, b));
      if (!can)
        throw Unsupported("devices: cuda:" + std::to_string(a) + " cannot access cuda:" +
                          std::to_string(b) + " directly (no NVLink/PCIe peer access)");
      DeviceGuard guard(a);
      const cudaError_t err = cudaDeviceEnablePeerAccess(b, 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled)
        cudaGetLastError();
      else
        MOECOMM_CUDA_CHECK(err);
    }

  sym_base.assign(num_ranks, nullptr);
  try {
    for (int r = 0; r < num_ranks; ++r) allocate(r);
  } catch (...) {
    for (int r = 0; r < num_ranks; ++r)
      if (sym_base[r]) cudaFree(sym_base[r]);
    throw;
  }
}

GroupState::~GroupState() {
  for (int r = 0; r < num_ranks; ++r) {
    if (!sym_base[r]) continue;
    int prev = 0;
    cudaGetDevice(&prev);
    cudaSetDevice(device_of[r]);
    if (owned_[r])
      cudaFree(sym_base[r]);
    else if (ipc_mapped_[r])
      cudaIpcCloseMemHandle(sym_base[r]);  // GIN buffers are NCCL's: the engine frees them
    cudaSetDevice(prev);
  }
}

void GroupState::claim_stream(int rank, cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread)
    if (local_ranks > 1)
      throw InvalidArgument("stream: rank " + std::to_string(rank) +
                            " passed the default stream; co-located ranks need streams of their "
                            "own (pass nullptr in the options to use the rank's stream())");
  std::lock_guard<std::mutex> lock(mutex_);
  auto [it, inserted] = stream_owner_.emplace(stream, rank);
  if (!inserted && it->second != rank && device_of[it->second] == device_of[rank])
    throw InvalidArgument("stream: rank " + std::to_string(rank) + " passed a stream that rank " +
                          std::to_string(it->second) +
                          " already uses; co-located ranks must use distinct streams");
}

}  // namespace moecomm::detail
