#include "runtime/config_digest.hpp"

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "moecomm/error.hpp"

namespace moecomm::detail {

namespace {

constexpr const char* kHeader = "moecomm-handle 1";

using Entries = std::vector<std::pair<std::string, std::string>>;

/// The "key = value" lines of one digest, in order; nullopt if `bytes` is not a digest.
std::optional<Entries> parse(std::span<const uint8_t> bytes) {
  if (bytes.size() < kConfigDigestSize) return std::nullopt;
  const auto* begin = reinterpret_cast<const char*>(bytes.data());
  const auto* nul = static_cast<const char*>(std::memchr(begin, '\0', kConfigDigestSize));
  if (nul == nullptr) return std::nullopt;  // the text must end inside the block
  const std::string text(begin, nul);
  Entries entries;
  size_t pos = 0;
  bool first = true;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (first) {
      if (line != kHeader) return std::nullopt;
      first = false;
      continue;
    }
    const size_t eq = line.find(" = ");
    if (eq == std::string::npos) return std::nullopt;
    entries.emplace_back(line.substr(0, eq), line.substr(eq + 3));
  }
  if (first) return std::nullopt;
  return entries;
}

const std::string* find(const Entries& entries, const std::string& key) {
  for (const auto& [k, v] : entries)
    if (k == key) return &v;
  return nullptr;
}

/// "ranks 0,2 have 7168, rank 1 has 4096" when the ranks disagree on `key`; empty if they agree.
std::string disagreement(const std::vector<Entries>& all, const std::string& key) {
  std::vector<std::pair<std::string, std::vector<int>>> groups;  // value -> ranks, first seen
  for (size_t r = 0; r < all.size(); ++r) {
    const std::string* v = find(all[r], key);
    const std::string value = v ? *v : "(no such field)";
    auto it =
        std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == value; });
    if (it == groups.end()) {
      groups.push_back({value, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(static_cast<int>(r));
  }
  if (groups.size() < 2) return {};
  std::string text;
  for (const auto& [value, ranks] : groups) {
    if (!text.empty()) text += ", ";
    text += (ranks.size() == 1 ? "rank " : "ranks ") + rank_list(ranks) +
            (ranks.size() == 1 ? " has " : " have ") + value;
  }
  return text;
}

}  // namespace

std::string rank_list(const std::vector<int>& ranks) {
  std::string text;
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    if (!text.empty()) text += ",";
    if (j - i >= 2) {
      text += std::to_string(ranks[i]) + "-" + std::to_string(ranks[j]);
      i = j + 1;
    } else {
      text += std::to_string(ranks[i]);
      ++i;
    }
  }
  return text;
}

std::vector<uint8_t> encode_config_digest(const Config& config, int rank, int num_ranks,
                                          const std::string& version) {
  const std::string text = std::string(kHeader) + "\nrank = " + std::to_string(rank) +
                           "\nranks = " + std::to_string(num_ranks) + "\nversion = " + version +
                           "\n" + config.to_text();
  // One byte stays NUL: the reader finds the end of the text inside the block.
  if (text.size() >= kConfigDigestSize)
    throw InvalidArgument("config: its text takes " + std::to_string(text.size()) +
                          " bytes, a process group handle has room for " +
                          std::to_string(kConfigDigestSize - 1) +
                          " (are the fields within Config::validate()'s ranges?)");
  std::vector<uint8_t> block(kConfigDigestSize, 0);
  std::memcpy(block.data(), text.data(), text.size());
  return block;
}

void check_config_digests(const std::vector<std::span<const uint8_t>>& digests) {
  std::vector<Entries> all;
  for (size_t r = 0; r < digests.size(); ++r) {
    auto entries = parse(digests[r]);
    if (!entries)
      throw InvalidArgument("all_handles: entry " + std::to_string(r) +
                            " is not a moecomm handle (expected the bytes of rank " +
                            std::to_string(r) +
                            "'s ProcessGroupBuilder::local_handle(), in rank order)");
    all.push_back(std::move(*entries));
  }
  if (const std::string d = disagreement(all, "version"); !d.empty())
    throw InvalidArgument("library version differs: " + d +
                          " (every rank of a group must load the same moecomm)");
  if (const std::string d = disagreement(all, "ranks"); !d.empty())
    throw InvalidArgument("group size differs: " + d +
                          " (every rank's ProcessGroupBuilder needs the same size)");
  if (const std::string* size = all.empty() ? nullptr : find(all[0], "ranks");
      size && *size != std::to_string(all.size()))
    throw InvalidArgument("all_handles: expected " + *size +
                          " handles (the group size every rank passed), got " +
                          std::to_string(all.size()));
  for (size_t r = 0; r < all.size(); ++r) {
    const std::string* rank = find(all[r], "rank");
    if (!rank || *rank != std::to_string(r))
      throw InvalidArgument("all_handles: entry " + std::to_string(r) + " holds rank " +
                            (rank ? *rank : "?") +
                            "'s handle; expected the handles in rank order (entry r from rank r)");
  }
  // Every field of Config (the keys after the header lines), in the order of rank 0's text and
  // then any key only other ranks have.
  std::vector<std::string> keys;
  for (const Entries& entries : all)
    for (const auto& [k, v] : entries)
      if (k != "rank" && k != "ranks" && k != "version" &&
          std::find(keys.begin(), keys.end(), k) == keys.end())
        keys.push_back(k);
  std::string message;
  for (const std::string& key : keys)
    if (const std::string d = disagreement(all, key); !d.empty())
      message += (message.empty() ? "" : "; ") + ("Config." + key + " differs: " + d);
  if (!message.empty())
    throw InvalidArgument(message + " (every rank of a group needs the same Config)");
}

}  // namespace moecomm::detail
