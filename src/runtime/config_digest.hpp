// The block every rank of a process group puts in front of its handle, so that connect() can
// check that all ranks run the same library with the same Config before any peer is mapped.
// Pure host code (no CUDA), tested in tests/host/test_config_digest.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "moecomm/config.hpp"

namespace moecomm::detail {

/// Size of a digest block. Fixed, so that ProcessGroupBuilder::handle_size() is a constant; large
/// enough for Config::to_text() of any valid config, with room for fields added later.
inline constexpr size_t kConfigDigestSize = 2048;

/// The digest of one rank: NUL-padded text (portable across hosts: no binary integers)
///   moecomm-handle 1
///   rank = <rank>
///   ranks = <group size>
///   version = <library version>
///   <Config::to_text(): one "field = value" line per field>
/// Raises InvalidArgument if the text does not fit (a config far outside validate()'s ranges).
std::vector<uint8_t> encode_config_digest(const Config& config, int rank, int num_ranks,
                                          const std::string& version);

/// Checks the digests of every rank (digests[r] from rank r, at least kConfigDigestSize bytes
/// each; bytes past the block are ignored) and raises InvalidArgument, identically on every rank,
/// for the first of these that fails:
///  - an entry that is not a digest: "all_handles: entry 1 is not a moecomm handle ...";
///  - "library version differs: ranks 0,2 have 0.1.0, rank 1 has 0.2.0";
///  - "group size differs: ..." (the size each rank passed to its builder; also when it is not
///    digests.size());
///  - an entry in the wrong place: "all_handles: entry 1 holds rank 2's handle ...";
///  - every Config field that differs, one clause each, e.g.
///    "Config.hidden differs: ranks 0,2 have 7168, rank 1 has 4096".
void check_config_digests(const std::vector<std::span<const uint8_t>>& digests);

/// "0", "0,2", "0-5,7": ranks in ascending order, runs of three or more as a range.
std::string rank_list(const std::vector<int>& ranks);

}  // namespace moecomm::detail
