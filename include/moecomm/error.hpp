// Errors raised by moecomm. Every failure is a moecomm::Error (or a subclass) whose message names
// the argument or the peer involved and what was expected.
#pragma once

#include <stdexcept>
#include <string>

namespace moecomm {

/// Base class of every exception moecomm throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// A caller-supplied argument is out of range or of the wrong shape, dtype or device.
/// The message starts with the argument's name.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A CUDA (or NCCL) call failed; the message names the call, the file and the line.
class CudaError : public Error {
 public:
  using Error::Error;
};

/// A device-side wait exceeded Config::timeout_seconds. The message says which rank waited for
/// which peer, in which phase and on which channel. The communicator is unusable afterwards.
class TimeoutError : public Error {
 public:
  using Error::Error;
};

/// The requested feature does not exist for this group or build (e.g. no CUDA device).
class Unsupported : public Error {
 public:
  using Error::Error;
};

}  // namespace moecomm
