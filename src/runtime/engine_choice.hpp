// Which RDMA engine a group uses (Config::engine): pure host code, tested in
// tests/host/test_config.cpp. The choice uses only what every rank knows alike (the Config, the
// node count, the machine ids in the handles), so every rank makes the same choice.
#pragma once

#include <string>

#include "moecomm/config.hpp"

namespace moecomm::detail {

/// What the build and the group offer the choice.
struct EngineFacts {
  int num_nodes = 1;           // nodes of the group (host ids)
  bool one_machine = true;     // every rank runs on this machine (CUDA IPC reaches every buffer)
  bool virtual_group = false;  // every rank in this process (VirtualGroup)
  bool nccl_built = false;     // the build has NCCL (MOECOMM_WITH_NCCL): the GIN engine's host side
  std::string nccl_build_note;  // why not, when !nccl_built
};

/// The engine for a group: kLoopback or kGin. A group of one node needs no engine (kLoopback).
/// Raises Unsupported naming what is missing: GIN needed (ranks on several machines, or asked
/// for) but not built, GIN asked for by a VirtualGroup, loopback asked for across machines.
/// Whether the network supports GIN, and whether this build has the GIN device code, are told
/// once NCCL runs (GinEngine::missing), so that the NCCL setup itself is exercised everywhere.
RdmaEngine choose_engine(RdmaEngine requested, const EngineFacts& facts);

}  // namespace moecomm::detail
