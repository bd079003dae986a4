// Which ranks of a process group share a node, from the host id each rank reports in its handle.
// Pure host code (no CUDA), tested in tests/host/test_config.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moecomm::detail {

/// Size of the host-id block of a process-group handle. Fixed, so that
/// ProcessGroupBuilder::handle_size() is a constant: a host id has at most kHostIdSize - 1 bytes.
inline constexpr size_t kHostIdSize = 256;

/// The nodes of a group: ranks n*node_size .. n*node_size+node_size-1 form node n.
struct NodeLayout {
  int num_nodes = 1;
  int node_size = 0;
};

/// The node layout of a group whose rank r runs on host host_ids[r]. Ranks of one host must be
/// contiguous and every host must hold the same number of ranks; otherwise raises
/// InvalidArgument naming the hosts and ranks, e.g. "host 'a' holds ranks 0,2 and host 'b' rank
/// 1: expected the ranks of each host to be contiguous". Raises for an empty list.
NodeLayout node_layout(const std::vector<std::string>& host_ids);

/// Raises InvalidArgument unless num_nodes divides num_ranks (nodes of equal size, at least one):
/// "num_nodes: expected a divisor of num_ranks 16, got 3".
void check_node_count(int num_ranks, int num_nodes);

/// Raises InvalidArgument unless `host_id` can name a host in a handle: 1..kHostIdSize-1 bytes,
/// no NUL byte.
void check_host_id(const std::string& host_id);
/// The host-id block of a handle: the id, NUL-padded to kHostIdSize bytes (check_host_id first).
std::vector<uint8_t> encode_host_id(const std::string& host_id);
/// The host id in a block (at least kHostIdSize bytes); raises InvalidArgument naming `entry`
/// (the rank whose handle it is) if it holds none.
std::string decode_host_id(std::span<const uint8_t> block, int entry);
/// This machine's host name (gethostname); "localhost" if it has none.
std::string default_host_id();
/// What tells machines apart, whatever host ids a group declares: the host name and the boot id
/// (/proc/sys/kernel/random/boot_id where it exists), at most kHostIdSize - 1 bytes. Ranks with
/// the same machine id can map each other's buffers (CUDA IPC); the engine choice uses it.
std::string machine_id();

}  // namespace moecomm::detail
