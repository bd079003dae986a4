# A host-only build with sanitizers (MOECOMM_SANITIZE, e.g. "address,undefined"), included from
# the top-level CMakeLists.txt in place of the library: CUDA device code cannot run under ASan, and
# the host code that can is the code that parses what users pass in. Any report fails the test
# (no recovery), with a stack trace.
set(moecomm_sanitize_flags -fsanitize=${MOECOMM_SANITIZE} -fno-sanitize-recover=all
  -fno-omit-frame-pointer -g)
target_compile_options(moecomm_reference PRIVATE ${moecomm_sanitize_flags})

add_library(moecomm_host_san STATIC
  src/core/config.cpp
  src/core/tensor.cpp
  src/core/validate.cpp
  src/runtime/config_digest.cpp
  src/runtime/node_layout.cpp
  src/runtime/engine_choice.cpp
  src/runtime/arena.cpp
  src/paths/regions.cpp
  src/layout/regions.cpp
  src/ht/regions.cpp
  src/ll/regions.cpp
  src/internode/regions.cpp)
target_include_directories(moecomm_host_san PUBLIC
  ${CMAKE_CURRENT_SOURCE_DIR}/include ${CMAKE_CURRENT_SOURCE_DIR}/src)
target_compile_options(moecomm_host_san PRIVATE -Wall -Wextra)
target_compile_options(moecomm_host_san PUBLIC ${moecomm_sanitize_flags})
target_link_options(moecomm_host_san PUBLIC -fsanitize=${MOECOMM_SANITIZE})

set(MOECOMM_HOST_LIBS moecomm_host_san)
enable_testing()
add_subdirectory(tests)
