#include "runtime/node_layout.hpp"

#include <unistd.h>

#include <climits>
#include <cstring>
#include <fstream>
#include <utility>

#include "moecomm/error.hpp"
#include "runtime/config_digest.hpp"

namespace moecomm::detail {

namespace {

using HostRanks = std::vector<std::pair<std::string, std::vector<int>>>;

/// "'a' (ranks 0-3), 'b' (rank 4)": every host and its ranks.
std::string hosts_text(const HostRanks& hosts) {
  std::string text;
  for (const auto& [host, ranks] : hosts)
    text += (text.empty() ? "'" : ", '") + host + "' (" + (ranks.size() == 1 ? "rank " : "ranks ") +
            rank_list(ranks) + ")";
  return text;
}

}  // namespace

NodeLayout node_layout(const std::vector<std::string>& host_ids) {
  if (host_ids.empty()) throw InvalidArgument("host ids: expected one per rank, got none");
  // Hosts in order of their first rank, each with its ranks.
  HostRanks hosts;
  for (size_t r = 0; r < host_ids.size(); ++r) {
    auto it = hosts.begin();
    while (it != hosts.end() && it->first != host_ids[r]) ++it;
    if (it == hosts.end()) {
      hosts.push_back({host_ids[r], {}});
      it = hosts.end() - 1;
    }
    it->second.push_back(static_cast<int>(r));
  }
  for (const auto& [host, ranks] : hosts)
    if (ranks.back() - ranks.front() + 1 != static_cast<int>(ranks.size()))
      throw InvalidArgument("host ids: the ranks of host '" + host +
                            "' are not contiguous; expected every host's ranks to be consecutive "
                            "(node n holds ranks n*G..n*G+G-1), got hosts " +
                            hosts_text(hosts));
  const size_t node_size = hosts.front().second.size();
  for (const auto& [host, ranks] : hosts)
    if (ranks.size() != node_size)
      throw InvalidArgument(
          "host ids: hosts hold different numbers of ranks; expected the same "
          "number on every host, got hosts " +
          hosts_text(hosts));
  return {static_cast<int>(hosts.size()), static_cast<int>(node_size)};
}

void check_node_count(int num_ranks, int num_nodes) {
  if (num_nodes < 1 || num_ranks % num_nodes != 0)
    throw InvalidArgument("num_nodes: expected a divisor of num_ranks " +
                          std::to_string(num_ranks) + ", got " + std::to_string(num_nodes));
}

void check_host_id(const std::string& host_id) {
  if (host_id.empty() || host_id.size() >= kHostIdSize || host_id.find('\0') != std::string::npos)
    throw InvalidArgument("host_id: expected 1.." + std::to_string(kHostIdSize - 1) +
                          " bytes without a NUL byte, got " + std::to_string(host_id.size()) +
                          " bytes");
}

std::vector<uint8_t> encode_host_id(const std::string& host_id) {
  check_host_id(host_id);
  std::vector<uint8_t> block(kHostIdSize, 0);
  std::memcpy(block.data(), host_id.data(), host_id.size());
  return block;
}

std::string decode_host_id(std::span<const uint8_t> block, int entry) {
  const auto* begin = reinterpret_cast<const char*>(block.data());
  const void* nul = block.size() >= kHostIdSize ? std::memchr(begin, '\0', kHostIdSize) : nullptr;
  if (nul == nullptr || nul == begin)
    throw InvalidArgument("all_handles: entry " + std::to_string(entry) +
                          " holds no host id (expected the bytes of rank " + std::to_string(entry) +
                          "'s ProcessGroupBuilder::local_handle())");
  return std::string(begin, static_cast<const char*>(nul));
}

std::string default_host_id() {
  char name[HOST_NAME_MAX + 1] = {};
  if (gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "localhost";
  std::string id(name);
  if (id.size() >= kHostIdSize) id.resize(kHostIdSize - 1);
  return id;
}

std::string machine_id() {
  std::string id = default_host_id();
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  if (boot && std::getline(boot, boot_id) && !boot_id.empty()) id += "/" + boot_id;
  if (id.size() >= kHostIdSize) id.resize(kHostIdSize - 1);
  return id;
}

}  // namespace moecomm::detail
