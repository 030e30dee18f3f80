// set_num_threads / get_num_threads over OpenMP's own setting, so that the kernels' parallel
// regions and anything else in the process using OpenMP agree on the count.
#include "cnnbp/threads.hpp"

#include "cnnbp/shapes.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cnnbp {

void set_num_threads(int64_t n) {
    check_num_threads(n);
#ifdef _OPENMP
    omp_set_num_threads(static_cast<int>(n));
#endif
}

int64_t get_num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace cnnbp
