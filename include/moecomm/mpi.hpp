// One process per GPU under MPI (mpirun, srun): the process group's bootstrap over an MPI
// communicator. Header-only, so the library itself does not depend on MPI: include it from code
// that links MPI (e.g. ep_bench built with MOECOMM_WITH_MPI).
//
//   MPI_Init(&argc, &argv);
//   auto comm = moecomm::mpi_connect(config, MPI_COMM_WORLD, local_rank % num_gpus);
//
// Every rank of `mpi_comm` becomes the rank of the same number in the group; ranks of one host
// must be contiguous (mpirun's default --map-by slot does so). Across hosts, Config::engine
// decides the engine (docs/multinode.md).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moecomm/error.hpp"
#include "moecomm/group.hpp"

namespace moecomm {

/// This process's rank among the processes of its host (MPI_COMM_TYPE_SHARED): the GPU to take.
inline int mpi_local_rank(MPI_Comm mpi_comm) {
  MPI_Comm local;
  if (MPI_Comm_split_type(mpi_comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local) != MPI_SUCCESS)
    throw Error("MPI_Comm_split_type failed");
  int rank = 0;
  MPI_Comm_rank(local, &rank);
  MPI_Comm_free(&local);
  return rank;
}

/// Builds this rank's communicator of a process group over `mpi_comm` (one collective: every
/// rank calls it with the same Config): ProcessGroupBuilder, then MPI_Allgather of the handles,
/// then connect(). `host_id`, when not empty, overrides the host id (ProcessGroupBuilder::
/// set_host_id: processes of one machine declared as nodes). Raises what connect() raises, the
/// same on every rank; an MPI failure raises Error naming the call.
inline std::unique_ptr<MoECommunicator> mpi_connect(const Config& config, MPI_Comm mpi_comm,
                                                    int device, const std::string& host_id = {}) {
  int rank = 0, size = 0;
  if (MPI_Comm_rank(mpi_comm, &rank) != MPI_SUCCESS ||
      MPI_Comm_size(mpi_comm, &size) != MPI_SUCCESS)
    throw Error("MPI_Comm_rank / MPI_Comm_size failed");
  ProcessGroupBuilder builder(config, rank, size, device);
  if (!host_id.empty()) builder.set_host_id(host_id);
  const std::vector<uint8_t> mine = builder.local_handle();
  std::vector<uint8_t> all(mine.size() * static_cast<size_t>(size));
  if (MPI_Allgather(mine.data(), static_cast<int>(mine.size()), MPI_BYTE, all.data(),
                    static_cast<int>(mine.size()), MPI_BYTE, mpi_comm) != MPI_SUCCESS)
    throw Error("MPI_Allgather of the process-group handles failed");
  return builder.connect(all);
}

}  // namespace moecomm
