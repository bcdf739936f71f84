/*
 * mf_sim.h — a CPU executor for the kernels of shaders/ (tests only).
 *
 * shaders/mf_prelude.h maps the kernel dialect to host C++ when MF_SIM is defined:
 * kernels become plain functions, threadgroup arrays become thread_local storage, and
 * the thread indices, barriers and warp shuffles call into this executor. mf_sim_run
 * shares a grid's threadgroups out over OS threads (MF_SIM_THREADS, by default one per
 * CPU), each running one at a time; each thread of a group is a coroutine
 * that runs until its next barrier or shuffle, so barriers and shuffles mean what they
 * mean on a GPU, and the order in which the threads run between two of them is chosen
 * by a seed (forward, reverse, shuffled; per threadgroup): a read of threadgroup memory that lacks its
 * barrier sees a different value under another order. A barrier or shuffle no thread
 * can pass (divergent barrier, a shuffle with an exited lane) is reported as an error.
 *
 * What this cannot show: a GPU's own math library (expf etc. here are the C library's),
 * its memory model beyond barriers, its speed, and the tensor-core instructions (the
 * prelude's portable forms run instead).
 */
#ifndef MF_SIM_H
#define MF_SIM_H

#include <cstdint>
#include <functional>

// The running thread's position: threadgroup (x, y, z), thread index, group size.
struct mf_sim_pos {
    int tg[3];
    int lt, nt;
};

const mf_sim_pos *mf_sim_self();
void mf_sim_barrier();
// Every lane of the calling thread's warp passes v; each gets that of lane src.
uint32_t mf_sim_shfl(uint32_t v, int src);

// Runs body on every thread of a grid of grid[0] x grid[1] x grid[2] threadgroups of
// block[0] threads (block[1] = block[2] = 1, at most 1024 threads). seed 0 runs the
// threads in index order between synchronisation points, 1 in reverse, others in a
// shuffled order drawn from the seed. Returns 0, or -1 with *err set (a deadlock).
int mf_sim_run(const unsigned grid[3], const unsigned block[3],
               const std::function<void()> &body, unsigned seed, const char **err);

#endif /* MF_SIM_H */
