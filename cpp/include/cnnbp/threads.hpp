// cnnbp/threads.hpp -- how many threads the kernels use.
//
// Kernels split their work among OpenMP threads when there is enough of it; every output
// element is computed by one thread in a fixed order, so results are the same for any
// count. Without OpenMP the kernels run on the calling thread and the count is always 1.
#pragma once

#include <cstdint>

namespace cnnbp {

// Threads for the kernels called from this thread afterwards (OpenMP's
// omp_set_num_threads: a setting of the calling thread). n >= 1, else std::invalid_argument.
void set_num_threads(int64_t n);
// The number of threads the next kernel may use (omp_get_max_threads), 1 without OpenMP.
int64_t get_num_threads();

}  // namespace cnnbp
