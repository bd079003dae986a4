// The ranks of a test's process group as child processes: fork them, carry their group handles
// over pipes, collect their exit codes. The parent never initialises CUDA (fork after CUDA
// initialisation is unsafe).
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <vector>

#include "moecomm/moecomm.hpp"

namespace moecomm::test {

/// Writes all n bytes to fd; false when the pipe broke.
inline bool write_all(int fd, const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  while (n) {
    const ssize_t w = write(fd, b, n);
    if (w <= 0) return false;
    b += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

/// Reads all n bytes from fd; false when the pipe broke.
inline bool read_all(int fd, void* p, size_t n) {
  uint8_t* b = static_cast<uint8_t*>(p);
  while (n) {
    const ssize_t r = read(fd, b, n);
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

/// In a child: sends this rank's handle to the parent and returns every rank's (rank order), as
/// run_children carries them; throws when a pipe broke.
inline std::vector<uint8_t> swap_handles(int to_parent, int from_parent,
                                         const std::vector<uint8_t>& mine, int ranks) {
  std::vector<uint8_t> all(ProcessGroupBuilder::handle_size() * ranks);
  if (!write_all(to_parent, mine.data(), mine.size()) ||
      !read_all(from_parent, all.data(), all.size()))
    throw std::runtime_error("the pipe to the parent broke");
  return all;
}

/// Forks `ranks` children, child r running body(r, to_parent, from_parent) and exiting with what
/// it returns (2 when it throws); carries their handles (one from every child, then all of them
/// to every child: swap_handles) and returns the exit codes (-1: the child did not exit).
/// *carried: the handles went round.
template <typename Body>
std::vector<int> run_children(int ranks, const Body& body, bool* carried) {
  std::fflush(stdout);  // else the children would print the parent's buffered output again
  std::vector<int> up(2 * ranks), down(2 * ranks);  // pipe r: [2r] read end, [2r + 1] write end
  std::vector<pid_t> pid(ranks);
  for (int r = 0; r < ranks; ++r) {
    if (pipe(&up[2 * r]) != 0 || pipe(&down[2 * r]) != 0) throw std::runtime_error("pipe failed");
    pid[r] = fork();
    if (pid[r] == 0) {
      close(up[2 * r]);
      close(down[2 * r + 1]);
      int rc = 2;
      try {
        rc = body(r, up[2 * r + 1], down[2 * r]);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      }
      std::fflush(stdout);
      _exit(rc);
    }
    // The parent keeps only its ends, so that a child's exit ends the parent's reads.
    close(up[2 * r + 1]);
    close(down[2 * r]);
  }
  std::vector<uint8_t> all;
  *carried = true;
  for (int r = 0; r < ranks && *carried; ++r) {
    std::vector<uint8_t> h(ProcessGroupBuilder::handle_size());
    *carried = read_all(up[2 * r], h.data(), h.size());
    all.insert(all.end(), h.begin(), h.end());
  }
  for (int r = 0; r < ranks && *carried; ++r)
    *carried = write_all(down[2 * r + 1], all.data(), all.size());
  for (int r = 0; r < ranks; ++r) {
    close(up[2 * r]);
    close(down[2 * r + 1]);
  }
  std::vector<int> rcs(ranks);
  for (int r = 0; r < ranks; ++r) {
    int status = 0;
    waitpid(pid[r], &status, 0);
    rcs[r] = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  return rcs;
}

}  // namespace moecomm::test
