// Chooses the micro-kernels from the CPU's features, once.
#include "gemm.hpp"

#include <cstdlib>
#include <string>

namespace cnnbp::detail {

KernelSet<float> kernels_generic_f32();
KernelSet<double> kernels_generic_f64();
#if defined(CNNBP_HAVE_X86_KERNELS)
KernelSet<float> kernels_avx2_f32();
KernelSet<double> kernels_avx2_f64();
KernelSet<float> kernels_avx512_f32();
KernelSet<double> kernels_avx512_f64();
#endif

namespace {

// The widest instruction set the CPU supports, capped by the environment variable
// CNNBP_ISA ("generic", "avx2" or "avx512") so the narrower kernels can be tested on a
// wide machine. A cap the CPU cannot honour selects the best it can.
template <typename T>
KernelSet<T> choose(KernelSet<T> (*generic)(), KernelSet<T> (*avx2)(), KernelSet<T> (*avx512)()) {
    const char* cap = std::getenv("CNNBP_ISA");
    const std::string limit = cap ? cap : "";
    const int level = limit == "generic" ? 0 : limit == "avx2" ? 1 : 2;  // unknown: no cap
#if defined(CNNBP_HAVE_X86_KERNELS)
    __builtin_cpu_init();
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (level >= 2 && __builtin_cpu_supports("avx512f")) return avx512();
    if (level >= 1 && has_avx2) return avx2();
#else
    (void)avx2;
    (void)avx512;
#endif
    return generic();
}

}  // namespace

#if defined(CNNBP_HAVE_X86_KERNELS)
#define CNNBP_KERNELS(type) kernels_avx2_##type, kernels_avx512_##type
#else
#define CNNBP_KERNELS(type) nullptr, nullptr
#endif

template <>
const KernelSet<float>& kernels_for_cpu<float>() {
    static const KernelSet<float> kernels = choose(kernels_generic_f32, CNNBP_KERNELS(f32));
    return kernels;
}
template <>
const KernelSet<double>& kernels_for_cpu<double>() {
    static const KernelSet<double> kernels = choose(kernels_generic_f64, CNNBP_KERNELS(f64));
    return kernels;
}

const char* kernel_isa() { return kernels_for_cpu<float>().isa; }

}  // namespace cnnbp::detail
