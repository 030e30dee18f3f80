// Micro-kernels for AVX2 + FMA (16 ymm registers). Compiled with -mavx2 -mfma; used only
// after the CPU reported both.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {

KernelSet<float> kernels_avx2_f32() {
    return {{6, 16, micro_kernel<float, 8, 6, 2>},
            {6, 16, tap_kernel<float, 8, 6, 2>},
            {1, 64, tap_kernel<float, 8, 1, 8>},
            {2, 4, dot_kernel<float, 8, 2, 4>},
            {{4, 16, gather_a_kernel<float, 8, 4, 2>},
             {8, 8, gather_a_kernel<float, 8, 8, 1>},
             {8, 4, gather_a_kernel<float, 4, 8, 1>}},
            "avx2"};
}

KernelSet<double> kernels_avx2_f64() {
    return {{6, 8, micro_kernel<double, 4, 6, 2>},
            {6, 8, tap_kernel<double, 4, 6, 2>},
            {1, 32, tap_kernel<double, 4, 1, 8>},
            {2, 4, dot_kernel<double, 4, 2, 4>},
            {{4, 8, gather_a_kernel<double, 4, 4, 2>},
             {8, 4, gather_a_kernel<double, 4, 8, 1>},
             {8, 2, gather_a_kernel<double, 2, 8, 1>}},
            "avx2"};
}

}  // namespace cnnbp::detail
