// Groups: who the ranks are. A VirtualGroup runs R ranks in one process, on one GPU or spread
// over several, each with its own stream and SM budget; every kernel runs for real.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moecomm/communicator.hpp"
#include "moecomm/config.hpp"

namespace moecomm {

namespace detail {
class CommImpl;
class GroupState;
}  // namespace detail

/// R ranks in this process. Rank r lives on devices[r % devices.size()]. Ranks on one device
/// spin on each other, so their kernels must be resident together: the constructor raises
/// InvalidArgument unless the sum of num_sms over the ranks of each device fits its SM count.
///
/// num_nodes > 1 declares virtual nodes: ranks r*G .. r*G+G-1 (G = R / num_nodes) form node r.
/// Ranks of one node use loads and stores; ranks of different nodes reach each other only
/// through the RDMA engine (here the loopback engine, with Config's NIC model), exactly as on a
/// cluster. Needs Config::rdma_bytes >= required_rdma_bytes(config, R, num_nodes).
class VirtualGroup {
 public:
  VirtualGroup(const Config& config, int num_ranks, std::vector<int> devices = {0},
               int num_nodes = 1);
  ~VirtualGroup();
  VirtualGroup(const VirtualGroup&) = delete;
  VirtualGroup& operator=(const VirtualGroup&) = delete;

  int size() const;
  /// Nodes of the group (1 unless declared).
  int num_nodes() const;
  MoECommunicator& operator[](int rank);

  /// Runs fn(rank) for every rank, each on its own host thread, and waits for all; rethrows the
  /// first exception. Needed for calls that wait on the host (exact HT sizing); calls that do not
  /// may also be issued rank after rank from one thread.
  void parallel_for(const std::function<void(int rank)>& fn);
  /// Waits for every rank's stream; raises the first device error.
  void synchronize();

  /// One low-latency dispatch of every rank as a single kernel: the results of rank r calling
  /// dispatch(args[r], options), with the GPU's front end paid once instead of once per rank
  /// (plain launches on R streams of one GPU serialise: about 29 us for 8 ranks before any work).
  /// It runs on rank 0's stream after all work issued so far on every rank's stream, and every
  /// rank's stream waits for it; it can be captured into a CUDA graph from rank 0's stream with
  /// the other ranks' streams forked from it. Needs every rank on one GPU, at most 8 ranks, every
  /// call on the LL path, and options without stream, async or return_recv_hook. Every rank's
  /// arguments are checked before any state changes.
  std::vector<DispatchOutput> dispatch_all(const std::vector<DispatchArgs>& args,
                                           const DispatchOptions& options = {});
  /// One low-latency combine of every rank as a single kernel (as dispatch_all), with handles[r]
  /// from rank r's LL dispatch. options: no stream, async, return_recv_hook or out. Every rank's
  /// expert outputs are complete when the kernel starts and stay until it ends (the streams are
  /// joined around it), so it needs no round between the ranks: no outputs published or awaited,
  /// no done barrier.
  std::vector<CombineOutput> combine_all(const std::vector<CombineArgs>& args,
                                         const std::vector<Handle>& handles,
                                         const CombineOptions& options = {});

 private:
  void launch_once(const std::function<void(cudaStream_t)>& launch);
  bool on_one_device() const;
  std::vector<detail::CommImpl*> impls() const;

  std::shared_ptr<detail::GroupState> state_;
  std::vector<std::unique_ptr<MoECommunicator>> comms_;
  struct Pool;
  std::unique_ptr<Pool> pool_;
};

/// One rank of a group whose ranks are separate processes (one GPU each, or several processes
/// on one GPU under MPS). Peers' buffers are mapped with CUDA IPC. Two steps, so that any
/// launcher can carry the exchange (MPI, torch.distributed, a file):
///
///   ProcessGroupBuilder builder(config, rank, size, device);
///   std::vector<uint8_t> mine = builder.local_handle();
///   std::vector<uint8_t> all = allgather(mine);          // size * handle_size() bytes, rank order
///   std::unique_ptr<MoECommunicator> comm = builder.connect(all);
///
/// The ranks of a VirtualGroup share one Config by construction; those of a process group each
/// pass their own, and connect() checks that they agree.
///
/// Nodes: each handle carries the id of the rank's host (by default its host name; set_host_id
/// overrides it, e.g. to declare processes of one machine as separate nodes in tests). connect()
/// derives the nodes from them: the ranks of one host form a node, which must be a contiguous
/// block of ranks (node n holds ranks n*G .. n*G+G-1), and every node must hold the same number
/// G of ranks. A group of N > 1 nodes needs Config::rdma_bytes >= required_rdma_bytes(config,
/// size, N). The buffer allocated by the constructor does not depend on N (its RDMA window is
/// Config::rdma_bytes bytes), so nothing is reallocated when the nodes become known.
///
/// In such a group, combine reads its inputs from registered memory: dispatch outputs and
/// MoECommunicator::combine_buffer are registered; other tensors are first copied in.
class ProcessGroupBuilder {
 public:
  ProcessGroupBuilder(const Config& config, int rank, int size, int device);
  ~ProcessGroupBuilder();
  ProcessGroupBuilder(const ProcessGroupBuilder&) = delete;
  ProcessGroupBuilder& operator=(const ProcessGroupBuilder&) = delete;

  /// Replaces the host id this rank reports (default: the host name). Ranks that report the same
  /// id are one node. 1..255 bytes without NUL, else InvalidArgument; must come before
  /// local_handle() (InvalidArgument after it).
  void set_host_id(const std::string& host_id);
  /// The host id this rank reports.
  const std::string& host_id() const;

  /// This rank's handle (handle_size() bytes): a digest of the library version, the rank, the
  /// group size and every Config field, then the host id, then the CUDA IPC handle of its buffer.
  std::vector<uint8_t> local_handle() const;
  /// The same on every rank of every group of this library version.
  static size_t handle_size();
  /// Checks that every rank runs the same library version with the same Config and group size,
  /// and that all_handles is in rank order; otherwise raises InvalidArgument, the same on every
  /// rank, naming the field and the ranks ("Config.hidden differs: ranks 0,2 have 7168, rank 1
  /// has 4096"). Then derives the nodes from the host ids (InvalidArgument naming the hosts and
  /// their ranks if a host's ranks are not contiguous or hosts hold different numbers of ranks)
  /// and checks Config::rdma_bytes against them (InvalidArgument naming the size needed when a
  /// group spanning nodes has too small a window); every rank sees the same bytes, so every rank
  /// raises the same error. Then maps every peer and returns this rank's communicator. Call once.
  std::unique_ptr<MoECommunicator> connect(const std::vector<uint8_t>& all_handles);
  /// Nodes of the group: 1 before connect(), then what the host ids gave.
  int num_nodes() const;

 private:
  std::shared_ptr<detail::GroupState> state_;
  int rank_;
  std::string host_id_;
  mutable bool exported_ = false;
  bool connected_ = false;
};

/// Number of SMs of a CUDA device (raises CudaError/Unsupported without one).
int device_sm_count(int device);
/// Number of visible CUDA devices; 0 where there is none (never raises).
int cuda_device_count();

}  // namespace moecomm
