// A minimal test harness (no external dependency, so the same tests build on the GPU machine):
//   TEST_CASE(name) { CHECK(cond) << "context"; CHECK_EQ(a, b); CHECK_THROWS(expr, Type, "text"); }
//   int main(int argc, char** argv) { return moecomm::test::run_all(argc, argv); }
// Each case runs in order; a failed CHECK records the failure and the case continues. The
// summary line is "N passed, N failed" (", N skipped" when some skipped).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace moecomm::test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct State {
  int failures_in_case = 0;
  bool skipped = false;
  std::string skip_reason;
};
inline State& state() {
  static State s;
  return s;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) {
    registry().push_back({name, std::move(fn)});
  }
};

/// Collects a message and reports a failure when destroyed (if the check failed).
class Failure {
 public:
  Failure(bool ok, const char* file, int line, std::string what)
      : ok_(ok), file_(file), line_(line), what_(std::move(what)) {}
  ~Failure() {
    if (ok_) return;
    ++state().failures_in_case;
    if (state().failures_in_case <= 20)
      std::fprintf(stderr, "  FAIL %s:%d: %s %s\n", file_, line_, what_.c_str(),
                   extra_.str().c_str());
  }
  template <typename T>
  Failure& operator<<(const T& v) {
    if (!ok_) extra_ << v;
    return *this;
  }

 private:
  bool ok_;
  const char* file_;
  int line_;
  std::string what_;
  std::ostringstream extra_;
};

template <typename A, typename B>
std::string describe_eq(const char* ea, const char* eb, const A& a, const B& b) {
  std::ostringstream os;
  os << ea << " == " << eb << " (" << a << " vs " << b << ")";
  return os.str();
}

/// Marks the current case as skipped (e.g. "no CUDA device").
inline void skip(const std::string& reason) {
  state().skipped = true;
  state().skip_reason = reason;
}

/// Seed: MOECOMM_TEST_SEED if given on the command line (--seed N), else from the clock. Printed.
inline uint64_t& seed_storage() {
  static uint64_t seed = 0;
  return seed;
}
inline uint64_t seed() {
  return seed_storage();
}

inline int run_all(int argc, char** argv) {
  uint64_t s = 0;
  bool have_seed = false;
  std::string filter, exclude;  // substrings of the case names to run / to leave out
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--seed" && i + 1 < argc) {
      s = std::strtoull(argv[++i], nullptr, 10);
      have_seed = true;
    } else if (a == "--filter" && i + 1 < argc) {
      filter = argv[++i];
    } else if (a == "--exclude" && i + 1 < argc) {
      exclude = argv[++i];
    }
  }
  if (!have_seed)
    s = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count() %
                              1000000007ULL);
  seed_storage() = s;
  std::printf("seed %llu (rerun with --seed %llu)\n", static_cast<unsigned long long>(s),
              static_cast<unsigned long long>(s));
  int passed = 0, failed = 0, skipped = 0;
  for (auto& c : registry()) {
    if (!filter.empty() && std::string(c.name).find(filter) == std::string::npos) continue;
    if (!exclude.empty() && std::string(c.name).find(exclude) != std::string::npos) continue;
    state() = State{};
    std::fflush(stdout);
    try {
      c.fn();
    } catch (const std::exception& e) {
      ++state().failures_in_case;
      std::fprintf(stderr, "  FAIL %s: unexpected exception: %s\n", c.name, e.what());
    }
    if (state().failures_in_case > 0) {
      ++failed;
      std::printf("[FAIL] %s (%d failed checks)\n", c.name, state().failures_in_case);
    } else if (state().skipped) {
      ++skipped;
      std::printf("[SKIP] %s: skipped: %s\n", c.name, state().skip_reason.c_str());
    } else {
      ++passed;
      std::printf("[ OK ] %s\n", c.name);
    }
    std::fflush(stdout);
  }
  if (skipped)
    std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  else
    std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace moecomm::test

#define MC_CONCAT2(a, b) a##b
#define MC_CONCAT(a, b) MC_CONCAT2(a, b)
#define TEST_CASE(name)                                             \
  static void MC_CONCAT(test_fn_, __LINE__)();                      \
  static ::moecomm::test::Registrar MC_CONCAT(test_reg_, __LINE__)( \
      name, &MC_CONCAT(test_fn_, __LINE__));                        \
  static void MC_CONCAT(test_fn_, __LINE__)()

#define CHECK(cond) ::moecomm::test::Failure(static_cast<bool>(cond), __FILE__, __LINE__, #cond)
#define CHECK_EQ(a, b)                                     \
  ::moecomm::test::Failure((a) == (b), __FILE__, __LINE__, \
                           ::moecomm::test::describe_eq(#a, #b, (a), (b)))
/// Passes when `expr` throws `Type` whose what() contains `text`.
#define CHECK_THROWS(expr, Type, text)                                                        \
  do {                                                                                        \
    bool mc_thrown = false;                                                                   \
    std::string mc_msg;                                                                       \
    try {                                                                                     \
      (void)(expr);                                                                           \
    } catch (const Type& mc_e) {                                                              \
      mc_thrown = true;                                                                       \
      mc_msg = mc_e.what();                                                                   \
    }                                                                                         \
    ::moecomm::test::Failure(mc_thrown, __FILE__, __LINE__, "expected " #Type " from " #expr) \
        << "";                                                                                \
    if (mc_thrown)                                                                            \
      ::moecomm::test::Failure(mc_msg.find(text) != std::string::npos, __FILE__, __LINE__,    \
                               "message of " #expr)                                           \
          << "'" << mc_msg << "' lacks '" << text << "'";                                     \
  } while (0)
