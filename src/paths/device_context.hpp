// The plain-old-data view of one rank that every kernel takes by value: the runtime's part
// (RankContext: shape, peers, signal flags, epoch, error record) and each path's regions, as each
// path declares them in its own folder. A new path adds its member here and its line to
// claim_regions (paths/regions.cpp). Built once per communicator.
#pragma once

#include "ht/regions.hpp"
#include "internode/regions.hpp"
#include "layout/regions.hpp"
#include "ll/regions.hpp"
#include "runtime/device_context.hpp"

namespace moecomm::detail {

struct DeviceContext : RankContext {
  layout::Regions layout;
  ht::Regions ht;
  ll::Regions ll;
  internode::Regions internode;
};

}  // namespace moecomm::detail
