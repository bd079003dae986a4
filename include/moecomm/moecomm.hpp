// Umbrella header.
#pragma once

#include "moecomm/communicator.hpp"
#include "moecomm/config.hpp"
#include "moecomm/error.hpp"
#include "moecomm/group.hpp"
#include "moecomm/handle.hpp"
#include "moecomm/tensor.hpp"
#include "moecomm/version.hpp"
