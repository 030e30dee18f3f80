// cnnbp/threads.hpp -- how many threads the kernels use, and which instruction set.
//
// Kernels split their work among OpenMP threads when there is enough of it; every output
// element is computed by one thread in a fixed order, so results are the same for any
// count. Without OpenMP the kernels run on the calling thread and the count is always 1.
#pragma once

#include <cstdint>

namespace cnnbp {

// Threads for the kernels called from this thread afterwards (OpenMP's
// omp_set_num_threads: a setting of the calling thread). 1 <= n <= 1024, else
// std::invalid_argument.
void set_num_threads(int64_t n);
// The number of threads the next kernel may use (omp_get_max_threads), 1 without OpenMP.
int64_t get_num_threads();

// The instruction set the kernels were chosen for at run time: "avx512", "avx2" or
// "generic". The environment variable CNNBP_ISA (same names) caps it, for testing.
const char* kernel_isa();
// GFLOP/s of the float GEMM micro-kernel on one thread with its data in L1, measured for
// about `seconds`: this machine's practical arithmetic peak, for benchmarks.
double micro_kernel_gflops(double seconds);
// GFLOP/s of independent float multiply-add chains on one thread in the widest vectors
// kernel_isa() allows, measured for about `seconds`: this core's fp32 peak, for benchmarks
// (times the threads for the machine's).
double fma_peak_gflops(double seconds);

namespace detail {
// Internal: while one is alive (on any thread), the kernels' pool threads wait for their next
// part spinning instead of sleeping, a call of cnnbp's being under way: its parallel loops
// follow each other microseconds apart, less than a sleeping thread takes to wake. Layers,
// losses and optimizers hold one per call (InUse::Hold; those nested in one call on one
// thread count once); the first one wakes the pool's threads ahead of the call's first loop.
class Busy {
 public:
    Busy() noexcept;
    ~Busy();
    Busy(const Busy&) = delete;
    Busy& operator=(const Busy&) = delete;

 private:
    bool active_ = false;
};
}  // namespace detail

}  // namespace cnnbp
