// Micro-kernels for AVX-512 (32 zmm registers). Compiled with -mavx512f -mfma; used only
// after the CPU reported AVX-512F.
#include "gemm_microkernel.hpp"

namespace cnnbp::detail {

KernelSet<float> kernels_avx512_f32() {
    return {{8, 48, micro_kernel<float, 16, 8, 3>},
            {8, 48, tap_kernel<float, 16, 8, 3>},
            {1, 128, tap_kernel<float, 16, 1, 8>},
            {4, 4, dot_kernel<float, 16, 4, 4>},
            {{6, 64, gather_a_kernel<float, 16, 6, 4>},
             {12, 16, gather_a_kernel<float, 16, 12, 1>},
             {12, 8, gather_a_kernel<float, 8, 12, 1>}},
            "avx512"};
}

KernelSet<double> kernels_avx512_f64() {
    return {{8, 24, micro_kernel<double, 8, 8, 3>},
            {8, 24, tap_kernel<double, 8, 8, 3>},
            {1, 64, tap_kernel<double, 8, 1, 8>},
            {4, 4, dot_kernel<double, 8, 4, 4>},
            {{6, 32, gather_a_kernel<double, 8, 6, 4>},
             {12, 8, gather_a_kernel<double, 8, 12, 1>},
             {12, 4, gather_a_kernel<double, 4, 12, 1>}},
            "avx512"};
}

}  // namespace cnnbp::detail
