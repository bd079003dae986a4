// The correctness gate: every output of a rank compared, element for element, with the host
// reference of the workload (throws VerificationError naming the rank, the tensor and the first
// difference), and the poison written into outputs before the call that is checked.
#pragma once

#include "moecomm/communicator.hpp"
#include "moecomm/tensor.hpp"
#include "workload.hpp"

namespace epb {

/// Fills a device view with a byte no correct output consists of (then waits for the device).
void poison(const moecomm::TensorView& v);
/// The output buffers of a dispatch; not the handle's metadata (a cached dispatch reads it).
void poison(const moecomm::DispatchOutput& d);

/// `form` names the call in the message ("HT dispatch", "HT cached dispatch"...).
void check_ht_dispatch(const Workload& wl, int rank, const moecomm::DispatchOutput& d,
                       const char* form);
void check_ll_dispatch(const Workload& wl, int rank, const moecomm::DispatchOutput& d,
                       const char* form);
void check_combine(const Workload& wl, int rank, const moecomm::TensorView& out, const char* form);

}  // namespace epb
