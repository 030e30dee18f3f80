// Chooses the GEMM micro-kernel from the CPU's features, once.
#include "gemm.hpp"

namespace cnnbp::detail {

MicroKernel<float> micro_kernel_generic_f32();
MicroKernel<double> micro_kernel_generic_f64();
#if defined(CNNBP_HAVE_X86_KERNELS)
MicroKernel<float> micro_kernel_avx2_f32();
MicroKernel<double> micro_kernel_avx2_f64();
MicroKernel<float> micro_kernel_avx512_f32();
MicroKernel<double> micro_kernel_avx512_f64();
#endif

namespace {

enum class Isa { generic, avx2, avx512 };

Isa detect_isa() {
#if defined(CNNBP_HAVE_X86_KERNELS)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
    return Isa::generic;
}

template <typename T>
MicroKernel<T> choose(MicroKernel<T> (*generic)(), MicroKernel<T> (*avx2)(),
                      MicroKernel<T> (*avx512)()) {
    switch (detect_isa()) {
        case Isa::avx512: return avx512();
        case Isa::avx2: return avx2();
        default: return generic();
    }
}

}  // namespace

template <>
const MicroKernel<float>& micro_kernel_for_cpu<float>() {
#if defined(CNNBP_HAVE_X86_KERNELS)
    static const MicroKernel<float> kernel =
        choose(micro_kernel_generic_f32, micro_kernel_avx2_f32, micro_kernel_avx512_f32);
#else
    static const MicroKernel<float> kernel = micro_kernel_generic_f32();
#endif
    return kernel;
}

template <>
const MicroKernel<double>& micro_kernel_for_cpu<double>() {
#if defined(CNNBP_HAVE_X86_KERNELS)
    static const MicroKernel<double> kernel =
        choose(micro_kernel_generic_f64, micro_kernel_avx2_f64, micro_kernel_avx512_f64);
#else
    static const MicroKernel<double> kernel = micro_kernel_generic_f64();
#endif
    return kernel;
}

}  // namespace cnnbp::detail
