// ep_bench with one process per GPU, started by an MPI launcher (`mpirun -np N ep_bench ...`, NCCL
// EP ep_bench's convention): every process is one rank of a process group (moecomm/mpi.hpp), checks
// its outputs against the host reference and times its calls; rank 0 prints the same table and
// writes the same JSON as the virtual-rank mode. See docs/bench.md, "One process per GPU".
#pragma once

#include "options.hpp"

namespace epb {

/// The number of processes an MPI launcher (Open MPI, MPICH / Hydra, PMIx, Slurm's srun) started,
/// from its environment; 1 when ep_bench was started on its own.
int launcher_world_size();

/// Runs the benchmark as this process's rank; returns the exit status (0, or 1 after an error or
/// a failed check, which every rank reports). Without MPI in the build, throws UsageError.
int run_processes(int argc, char** argv, Options& options);

}  // namespace epb
