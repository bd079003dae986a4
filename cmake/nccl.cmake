# NCCL for the GIN engine (docs/multinode.md). MOECOMM_WITH_NCCL: AUTO (default) uses NCCL where
# found, ON requires it, OFF builds without it (the loopback engine only; engine=gin then raises
# Unsupported naming the build). Searched in: NCCL_ROOT (variable or environment), the Python
# wheel nvidia-nccl-cu13 of the python3 on PATH, the CUDA toolkit, the system.
#
# Versions: the host side (communicator from our bootstrap, window registration, device
# communicator) builds with NCCL >= 2.28 (tested: 2.28.9, 2.32.3); the GIN device code needs VA
# signals, NCCL >= 2.32 (tested: 2.32.3). Sets MOECOMM_NCCL_FOUND, MOECOMM_NCCL_VERSION,
# MOECOMM_NCCL_GIN (device code built) and the imported target moecomm_nccl.
set(MOECOMM_WITH_NCCL AUTO CACHE STRING "Build the NCCL GIN engine: AUTO, ON or OFF")
set_property(CACHE MOECOMM_WITH_NCCL PROPERTY STRINGS AUTO ON OFF)
set(NCCL_ROOT "$ENV{NCCL_ROOT}" CACHE PATH "NCCL install (include/nccl.h, lib/libnccl.so*)")

set(MOECOMM_NCCL_FOUND OFF)
set(MOECOMM_NCCL_GIN OFF)
if(NOT MOECOMM_WITH_NCCL STREQUAL "OFF")
  set(_hints ${NCCL_ROOT})
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(COMMAND ${Python3_EXECUTABLE} -c
      "import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])"
      OUTPUT_VARIABLE _wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _rc)
    if(_rc EQUAL 0 AND _wheel)
      list(APPEND _hints ${_wheel})
    endif()
  endif()
  find_path(MOECOMM_NCCL_INCLUDE_DIR nccl.h HINTS ${_hints} ${CUDAToolkit_INCLUDE_DIRS}
    PATH_SUFFIXES include NO_CACHE)
  # The library beside the headers first (the wheel ships libnccl.so.2 only, no libnccl.so).
  if(MOECOMM_NCCL_INCLUDE_DIR)
    get_filename_component(_root ${MOECOMM_NCCL_INCLUDE_DIR} DIRECTORY)
    find_library(MOECOMM_NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR HINTS ${_root}
      PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH NO_CACHE)
  endif()
  if(NOT MOECOMM_NCCL_LIBRARY)
    find_library(MOECOMM_NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR HINTS ${_hints}
      ${CUDAToolkit_LIBRARY_DIR} PATH_SUFFIXES lib lib64 NO_CACHE)
  endif()
  set(_why "")
  if(NOT MOECOMM_NCCL_INCLUDE_DIR OR NOT MOECOMM_NCCL_LIBRARY)
    set(_why "nccl.h or libnccl not found (set NCCL_ROOT, or pip install nvidia-nccl-cu13)")
  elseif(NOT EXISTS ${MOECOMM_NCCL_INCLUDE_DIR}/nccl_device.h)
    set(_why "${MOECOMM_NCCL_INCLUDE_DIR} has no nccl_device.h (the device API: NCCL >= 2.28)")
  else()
    file(STRINGS ${MOECOMM_NCCL_INCLUDE_DIR}/nccl.h _code REGEX "^#define NCCL_VERSION_CODE [0-9]+")
    string(REGEX REPLACE ".* ([0-9]+)$" "\\1" MOECOMM_NCCL_VERSION "${_code}")
    if(MOECOMM_NCCL_VERSION LESS 22800)
      set(_why "NCCL ${MOECOMM_NCCL_VERSION} in ${MOECOMM_NCCL_INCLUDE_DIR} is older than 2.28")
    endif()
  endif()
  if(_why)
    if(MOECOMM_WITH_NCCL STREQUAL "ON")
      message(FATAL_ERROR "MOECOMM_WITH_NCCL=ON: ${_why}")
    endif()
    message(STATUS "moecomm: building without NCCL (the GIN engine): ${_why}")
  else()
    set(MOECOMM_NCCL_FOUND ON)
    if(MOECOMM_NCCL_VERSION GREATER_EQUAL 23200)
      set(MOECOMM_NCCL_GIN ON)
    endif()
    add_library(moecomm_nccl INTERFACE IMPORTED)
    # -I, not -isystem: it must come before the CUDA toolkit's include dir, which may hold an
    # older nccl.h (CUDA 13 ships NCCL 2.28 headers there).
    set_target_properties(moecomm_nccl PROPERTIES IMPORTED_NO_SYSTEM ON)
    target_include_directories(moecomm_nccl INTERFACE ${MOECOMM_NCCL_INCLUDE_DIR})
    target_link_libraries(moecomm_nccl INTERFACE ${MOECOMM_NCCL_LIBRARY})
    target_compile_definitions(moecomm_nccl INTERFACE MOECOMM_WITH_NCCL
      $<$<BOOL:${MOECOMM_NCCL_GIN}>:MOECOMM_WITH_NCCL_GIN>)
    message(STATUS "moecomm: NCCL ${MOECOMM_NCCL_VERSION} (${MOECOMM_NCCL_INCLUDE_DIR}, "
      "${MOECOMM_NCCL_LIBRARY}); GIN device code: ${MOECOMM_NCCL_GIN} (needs NCCL >= 2.32)")
  endif()
endif()
