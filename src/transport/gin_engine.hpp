// The host side of the NCCL GIN engine (GPU-initiated networking): one rank's NCCL communicator,
// built from the unique id rank 0 put into its process-group handle; the symmetric buffer
// allocated by NCCL (ncclMemAlloc: NCCL windows need cuMem memory) and registered as one window;
// the device communicator the kernels drive (transport/impl/gin.cuh). Plain C++: no NCCL type
// crosses this header, so core/ and runtime/ build alike with and without NCCL.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moecomm::detail {

/// Bytes of an NCCL unique id (ncclUniqueId) in a process-group handle.
inline constexpr size_t kNcclIdSize = 128;

/// NCCL_VERSION_CODE of the NCCL headers of this build (e.g. 23203 for 2.32.3); 0 without NCCL.
int nccl_build_version();
/// NCCL_VERSION_CODE of the NCCL library loaded at run time; 0 without NCCL.
int nccl_runtime_version();
/// "2.32.3" for a version code.
std::string nccl_version_text(int code);
/// True when this build has the GIN engine's device code (the kernels can drive GIN).
bool gin_built();
/// Why not, when !gin_built(): "built without NCCL (MOECOMM_WITH_NCCL=OFF)" or "NCCL 2.28.9
/// headers: the GIN device code needs NCCL >= 2.32 (VA signals)".
std::string gin_build_note();
/// A fresh NCCL unique id (kNcclIdSize bytes; ncclGetUniqueId); raises Unsupported without NCCL.
std::vector<uint8_t> make_nccl_id();

/// One rank's GIN engine. The constructor is collective over the group (every rank constructs
/// its engine with the same id): it creates the NCCL communicator, allocates and registers the
/// window, then asks NCCL for a device communicator with GIN contexts. Setup failures raise
/// Error naming the NCCL call; a network without GIN does not raise here: available() is false
/// and missing() says what is missing, so the caller chooses how to report it.
class GinEngine {
 public:
  /// `buffer_bytes`: the whole symmetric buffer (the window is its first `window_bytes`, but the
  /// whole buffer is registered: same-node peers reach the rest through NCCL's mapping).
  /// `node_size`: ranks per node (the NCCL LSA team must match the group's nodes).
  GinEngine(const uint8_t* nccl_id, int rank, int size, int device, size_t buffer_bytes,
            size_t window_bytes, int node_size);
  ~GinEngine();
  GinEngine(const GinEngine&) = delete;
  GinEngine& operator=(const GinEngine&) = delete;

  /// This rank's symmetric buffer (NCCL memory, registered as the window).
  uint8_t* buffer() const;
  /// The window's ranks per NCCL LSA team as NCCL sees them (the ranks one node's loads reach).
  int lsa_size() const;
  /// Pointers to the buffers of ranks first .. first + count - 1 (this rank's node), through
  /// NCCL's load/store mapping (ncclGetLsaPointer).
  std::vector<uint8_t*> node_buffers(int first, int count) const;
  /// True when NCCL gave a device communicator with GIN contexts.
  bool available() const;
  /// Empty when available(); else what is missing, e.g. "NCCL 2.28.9 found no GIN-capable
  /// network (ncclDevCommCreate with 4 GIN contexts: ...)".
  const std::string& missing() const;
  /// One-line description: NCCL version, ranks, window bytes, GIN type and contexts.
  std::string describe() const;
  /// Device copies for the kernels (RdmaContext): the ncclDevComm and the window (ncclWindow_t).
  const void* device_comm() const;
  void* window() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace moecomm::detail
