#pragma once

#define MOECOMM_VERSION_MAJOR 0
#define MOECOMM_VERSION_MINOR 1
#define MOECOMM_VERSION_PATCH 0

namespace moecomm {
/// "0.1.0"
const char* version();
}  // namespace moecomm
