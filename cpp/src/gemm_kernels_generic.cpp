// Micro-kernels for any CPU: the baseline instruction set only.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {

KernelSet<float> kernels_generic_f32() {
    return {{4, 8, micro_kernel<float, 4, 4, 2>},
            {4, 8, tap_kernel<float, 4, 4, 2>},
            {1, 16, tap_kernel<float, 4, 1, 4>},
            {2, 2, dot_kernel<float, 4, 2, 2>},
            {{4, 8, gather_a_kernel<float, 4, 4, 2>},
             {4, 4, gather_a_kernel<float, 4, 4, 1>},
             {4, 4, gather_a_kernel<float, 4, 4, 1>}},
            "generic"};
}

KernelSet<double> kernels_generic_f64() {
    return {{4, 4, micro_kernel<double, 2, 4, 2>},
            {4, 4, tap_kernel<double, 2, 4, 2>},
            {1, 8, tap_kernel<double, 2, 1, 4>},
            {2, 2, dot_kernel<double, 2, 2, 2>},
            {{4, 4, gather_a_kernel<double, 2, 4, 2>},
             {4, 2, gather_a_kernel<double, 2, 4, 1>},
             {4, 2, gather_a_kernel<double, 2, 4, 1>}},
            "generic"};
}

}  // namespace cnnbp::detail
