// Chooses the GEMM micro-kernel from the CPU's features, once.
#include "gemm.hpp"

namespace cnnbp::detail {

#define CNNBP_DECLARE_KERNELS(isa)                 \
    MicroKernel<float> micro_kernel_##isa##_f32();   \
    MicroKernel<double> micro_kernel_##isa##_f64();  \
    DotKernel<float> dot_kernel_##isa##_f32();       \
    DotKernel<double> dot_kernel_##isa##_f64();      \
    GatherKernel<float> gather_kernel_##isa##_f32(); \
    GatherKernel<double> gather_kernel_##isa##_f64();
CNNBP_DECLARE_KERNELS(generic)
#if defined(CNNBP_HAVE_X86_KERNELS)
CNNBP_DECLARE_KERNELS(avx2)
CNNBP_DECLARE_KERNELS(avx512)
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

template <typename Kernel>
Kernel choose(Kernel (*generic)(), Kernel (*avx2)(), Kernel (*avx512)()) {
    switch (detect_isa()) {
        case Isa::avx512: return avx512();
        case Isa::avx2: return avx2();
        default: return generic();
    }
}

}  // namespace

#if defined(CNNBP_HAVE_X86_KERNELS)
#define CNNBP_CHOOSE(kind, type) choose(kind##_generic_##type, kind##_avx2_##type, kind##_avx512_##type)
#else
#define CNNBP_CHOOSE(kind, type) kind##_generic_##type()
#endif

template <>
const MicroKernel<float>& micro_kernel_for_cpu<float>() {
    static const MicroKernel<float> kernel = CNNBP_CHOOSE(micro_kernel, f32);
    return kernel;
}
template <>
const MicroKernel<double>& micro_kernel_for_cpu<double>() {
    static const MicroKernel<double> kernel = CNNBP_CHOOSE(micro_kernel, f64);
    return kernel;
}
template <>
const DotKernel<float>& dot_kernel_for_cpu<float>() {
    static const DotKernel<float> kernel = CNNBP_CHOOSE(dot_kernel, f32);
    return kernel;
}
template <>
const DotKernel<double>& dot_kernel_for_cpu<double>() {
    static const DotKernel<double> kernel = CNNBP_CHOOSE(dot_kernel, f64);
    return kernel;
}
template <>
const GatherKernel<float>& gather_kernel_for_cpu<float>() {
    static const GatherKernel<float> kernel = CNNBP_CHOOSE(gather_kernel, f32);
    return kernel;
}
template <>
const GatherKernel<double>& gather_kernel_for_cpu<double>() {
    static const GatherKernel<double> kernel = CNNBP_CHOOSE(gather_kernel, f64);
    return kernel;
}

}  // namespace cnnbp::detail
