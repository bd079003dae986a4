// The host side of the NCCL GIN engine (gin_engine.hpp). Compiled with and without NCCL: without
// it (MOECOMM_WITH_NCCL unset) only the version queries exist and the engine raises Unsupported.
// NCCL 2.28 and >= 2.30 differ in how device-communicator requirements are initialised and in how
// GIN support is reported (ncclCommQueryProperties exists from 2.30 on); both are handled here.
#include "transport/gin_engine.hpp"

#include <cuda_runtime_api.h>

#include <cstring>

#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/streams.hpp"

#ifdef MOECOMM_WITH_NCCL
#include <nccl.h>
#include <nccl_device.h>
#endif

namespace moecomm::detail {

std::string nccl_version_text(int code) {
  if (code <= 0) return "none";
  // NCCL_VERSION(X,Y,Z): X*10000 + Y*100 + Z from 2.9 on, X*1000 + Y*100 + Z before.
  const int major = code >= 10000 ? code / 10000 : code / 1000;
  const int minor = code >= 10000 ? (code % 10000) / 100 : (code % 1000) / 100;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(code % 100);
}

#ifndef MOECOMM_WITH_NCCL

int nccl_build_version() {
  return 0;
}
int nccl_runtime_version() {
  return 0;
}
bool gin_built() {
  return false;
}
std::string gin_build_note() {
  return "built without NCCL (MOECOMM_WITH_NCCL=OFF, or no NCCL >= 2.28 with its device API "
         "headers was found)";
}
std::vector<uint8_t> make_nccl_id() {
  throw Unsupported("the GIN engine: " + gin_build_note());
}

struct GinEngine::State {};
GinEngine::GinEngine(const uint8_t*, int, int, int, size_t, size_t, int) {
  throw Unsupported("the GIN engine: " + gin_build_note());
}
GinEngine::~GinEngine() = default;
uint8_t* GinEngine::buffer() const {
  return nullptr;
}
int GinEngine::lsa_size() const {
  return 0;
}
std::vector<uint8_t*> GinEngine::node_buffers(int, int) const {
  return {};
}
bool GinEngine::available() const {
  return false;
}
const std::string& GinEngine::missing() const {
  static const std::string note = gin_build_note();
  return note;
}
std::string GinEngine::describe() const {
  return "no GIN engine: " + gin_build_note();
}
const void* GinEngine::device_comm() const {
  return nullptr;
}
void* GinEngine::window() const {
  return nullptr;
}

#else  // MOECOMM_WITH_NCCL

static_assert(sizeof(ncclUniqueId) == kNcclIdSize, "the handle's NCCL id block");

namespace {

/// Raises Error naming the NCCL call and NCCL's message.
void nccl_check(ncclResult_t r, const char* call, ncclComm_t comm = nullptr) {
  if (r == ncclSuccess) return;
  std::string what = std::string("NCCL: ") + call + " failed: " + ncclGetErrorString(r);
  if (comm) {
    const char* last = ncclGetLastError(comm);
    if (last && *last) what += std::string(" (") + last + ")";
  }
  throw Error(what + " [NCCL " + nccl_version_text(nccl_runtime_version()) +
              "; NCCL_DEBUG=WARN says more]");
}

// The kernels' GIN code (transport/impl/gin.cuh) uses VA signals: signal words at window
// offsets, as the seam's signals are. NCCL has them from 2.32 (the version this was tested with).
constexpr int kGinDeviceMinVersion = 23200;

/// GIN contexts asked of NCCL: warps share them round-robin (a hint: NCCL may give fewer).
constexpr int kGinContexts = 4;

/// One thread: the load/store pointers of `count` LSA peers' windows, at offset 0.
__global__ void lsa_pointers(ncclWindow_t window, int count, uint8_t** out) {
  for (int i = 0; i < count; ++i) out[i] = static_cast<uint8_t*>(ncclGetLsaPointer(window, 0, i));
}

}  // namespace

int nccl_build_version() {
  return NCCL_VERSION_CODE;
}
int nccl_runtime_version() {
  int v = 0;
  return ncclGetVersion(&v) == ncclSuccess ? v : 0;
}
bool gin_built() {
#ifdef MOECOMM_WITH_NCCL_GIN
  return true;
#else
  return false;
#endif
}
std::string gin_build_note() {
  if (gin_built()) return {};
  return "built with NCCL " + nccl_version_text(NCCL_VERSION_CODE) +
         " headers, whose device API has no VA signals: the GIN device code needs NCCL >= " +
         nccl_version_text(kGinDeviceMinVersion);
}

std::vector<uint8_t> make_nccl_id() {
  ncclUniqueId id;
  nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  std::vector<uint8_t> bytes(kNcclIdSize);
  std::memcpy(bytes.data(), &id, kNcclIdSize);
  return bytes;
}

struct GinEngine::State {
  int rank = 0, size = 0, device = 0;
  size_t buffer_bytes = 0, window_bytes = 0;
  ncclComm_t comm = nullptr;
  void* buffer = nullptr;
  ncclWindow_t window = nullptr;
  ncclDevComm dev_comm{};
  bool have_dev_comm = false;
  ncclDevComm* dev_comm_on_device = nullptr;
  int lsa_size = 0;
  std::string missing, gin_type;

  ~State() {
    DeviceGuard guard(device);
    // Teardown reports nothing: a destructor cannot raise, and the process may be going down.
    if (dev_comm_on_device) cudaFree(dev_comm_on_device);
    if (have_dev_comm) ncclDevCommDestroy(comm, &dev_comm);
    if (window) ncclCommWindowDeregister(comm, window);
    if (buffer) ncclMemFree(buffer);
    if (comm) ncclCommDestroy(comm);
  }
};

GinEngine::GinEngine(const uint8_t* nccl_id, int rank, int size, int device, size_t buffer_bytes,
                     size_t window_bytes, int node_size)
    : s_(std::make_unique<State>()) {
  State& s = *s_;
  s.rank = rank;
  s.size = size;
  s.device = device;
  s.buffer_bytes = buffer_bytes;
  s.window_bytes = window_bytes;
  DeviceGuard guard(device);
  ncclUniqueId id;
  std::memcpy(&id, nccl_id, kNcclIdSize);
  nccl_check(ncclCommInitRank(&s.comm, size, id, rank), "ncclCommInitRank");
  // Symmetric windows need memory NCCL can map (cuMem): NCCL allocates it.
  nccl_check(ncclMemAlloc(&s.buffer, buffer_bytes), "ncclMemAlloc", s.comm);
  nccl_check(ncclCommWindowRegister(s.comm, s.buffer, buffer_bytes, &s.window, NCCL_WIN_DEFAULT),
             "ncclCommWindowRegister", s.comm);
  const ncclTeam lsa = ncclTeamLsa(s.comm);
  s.lsa_size = lsa.nRanks;

  const std::string version = "NCCL " + nccl_version_text(nccl_runtime_version());
  if (s.lsa_size != node_size) {
    s.missing = version + " sees " + std::to_string(s.lsa_size) +
                " rank(s) per load/store (NVLink) domain, the group's host ids give " +
                std::to_string(node_size) +
                " per node; NCCL must see the same nodes (NCCL_HOSTID, if set, must agree with "
                "ProcessGroupBuilder::set_host_id)";
    return;
  }
  // What the network offers is asked first, so that the message names it even where this
  // build's device code is absent too.
  const std::string no_device_code =
      gin_built() ? std::string()
                  : "; and this build has no GIN device code (" + gin_build_note() + ")";
#if NCCL_VERSION_CODE >= 23000
  ncclCommProperties_t props = NCCL_COMM_PROPERTIES_INITIALIZER;
  nccl_check(ncclCommQueryProperties(s.comm, &props), "ncclCommQueryProperties", s.comm);
  if (!props.deviceApiSupport) {
    s.missing = version + " reports no device API support on this communicator" + no_device_code;
    return;
  }
  if (props.ginType == NCCL_GIN_TYPE_NONE) {
    s.missing = version +
                " found no GIN-capable network (ncclCommQueryProperties: ginType none; GIN needs "
                "RDMA NICs with GPUDirect: InfiniBand or RoCE, GDAKI or proxy backend)" +
                no_device_code;
    return;
  }
  s.gin_type = props.ginType == NCCL_GIN_TYPE_GDAKI   ? "GDAKI"
               : props.ginType == NCCL_GIN_TYPE_PROXY ? "proxy"
                                                      : "type " + std::to_string(props.ginType);
#endif
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
  ncclDevCommRequirements_t reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
  reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;
#else
  ncclDevCommRequirements_t reqs{};
#endif
  reqs.ginForceEnable = true;  // ranks of one host declared as nodes still take GIN
  reqs.ginContextCount = kGinContexts;
  const ncclResult_t r = ncclDevCommCreate(s.comm, &reqs, &s.dev_comm);
  if (r != ncclSuccess) {
    const char* last = ncclGetLastError(s.comm);
    s.missing = version + " found no GIN-capable network (ncclDevCommCreate with " +
                std::to_string(kGinContexts) + " GIN contexts: " + ncclGetErrorString(r) +
                (last && *last ? std::string("; ") + last : std::string()) +
                "; GIN needs RDMA NICs with GPUDirect: InfiniBand or RoCE)" + no_device_code;
    return;
  }
  s.have_dev_comm = true;
  if (!gin_built()) {
    s.missing =
        version + " offers GIN, but this build has no GIN device code (" + gin_build_note() + ")";
    return;
  }
  MOECOMM_CUDA_CHECK(
      cudaMalloc(reinterpret_cast<void**>(&s.dev_comm_on_device), sizeof(ncclDevComm)));
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(s.dev_comm_on_device, &s.dev_comm, sizeof(ncclDevComm), cudaMemcpyHostToDevice));
}

GinEngine::~GinEngine() = default;

uint8_t* GinEngine::buffer() const {
  return static_cast<uint8_t*>(s_->buffer);
}
int GinEngine::lsa_size() const {
  return s_->lsa_size;
}

std::vector<uint8_t*> GinEngine::node_buffers(int first, int count) const {
  (void)first;  // LSA ranks are numbered within the node, as the group's local indices are
  if (count > s_->lsa_size)
    throw Error("GinEngine::node_buffers: " + std::to_string(count) + " ranks asked, NCCL's " +
                "load/store team has " + std::to_string(s_->lsa_size));
  DeviceGuard guard(s_->device);
  uint8_t** out = nullptr;
  MOECOMM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&out), sizeof(uint8_t*) * count));
  // clang-format off
  lsa_pointers<<<1, 1>>>(s_->window, count, out);
  // clang-format on
  std::vector<uint8_t*> host(count);
  const cudaError_t launched = cudaGetLastError();
  const cudaError_t copied =
      cudaMemcpy(host.data(), out, sizeof(uint8_t*) * count, cudaMemcpyDeviceToHost);
  cudaFree(out);
  MOECOMM_CUDA_CHECK(launched);
  MOECOMM_CUDA_CHECK(copied);
  return host;
}

bool GinEngine::available() const {
  return s_->missing.empty();
}
const std::string& GinEngine::missing() const {
  return s_->missing;
}

std::string GinEngine::describe() const {
  return "NCCL " + nccl_version_text(nccl_runtime_version()) + " (headers " +
         nccl_version_text(NCCL_VERSION_CODE) + "), " + std::to_string(s_->size) +
         " ranks, window of " + std::to_string(s_->window_bytes) + " bytes in a " +
         std::to_string(s_->buffer_bytes) + "-byte registered buffer, " +
         std::to_string(s_->lsa_size) + " rank(s) per load/store team, " +
         (available()
              ? "GIN " + (s_->gin_type.empty() ? std::string("on") : s_->gin_type) + " with " +
                    std::to_string(int(s_->dev_comm.ginContextCount)) + " context(s)"
              : "GIN unavailable: " + s_->missing);
}

const void* GinEngine::device_comm() const {
  return s_->dev_comm_on_device;
}
void* GinEngine::window() const {
  return s_->window;
}

#endif  // MOECOMM_WITH_NCCL

}  // namespace moecomm::detail
