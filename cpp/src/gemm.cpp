// Chooses the micro-kernels from the CPU's features, once.
#include "gemm.hpp"

#include <chrono>
#include <vector>

#include "cnnbp/threads.hpp"
#include "isa.hpp"

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

// The kernel set for cpu_isa(); a build without the x86 kernels has only the baseline.
template <typename T>
KernelSet<T> choose(KernelSet<T> (*generic)(), KernelSet<T> (*avx2)(), KernelSet<T> (*avx512)()) {
#if defined(CNNBP_HAVE_X86_KERNELS)
    switch (cpu_isa()) {
        case Isa::avx512:
            return avx512();
        case Isa::avx2:
            return avx2();
        default:
            break;
    }
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

}  // namespace cnnbp::detail

namespace cnnbp {

const char* kernel_isa() { return detail::kernels_for_cpu<float>().isa; }

double micro_kernel_gflops(double seconds) {
    using namespace detail;
    // one thread, panels resident in L1: the arithmetic ceiling the convolution works against
    const auto& uk = kernels_for_cpu<float>().gemm;
    const int64_t kc = 256, panels = 4;
    std::vector<float> a(size_t(kc * uk.MR), 0.5f), b(size_t(kc * uk.NR * panels), 0.25f),
        c(size_t(uk.MR * uk.NR * panels), 0.0f);
    const auto start = std::chrono::steady_clock::now();
    double elapsed = 0;
    int64_t calls = 0;
    while (elapsed < seconds) {
        for (int i = 0; i < 64; ++i, ++calls) {
            const int64_t p = calls % panels;
            uk.run(kc, a.data(), b.data() + p * kc * uk.NR, c.data() + p * uk.NR, uk.NR * panels,
                   true, uk.MR, uk.NR);
        }
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    return 2.0 * double(kc * uk.MR * uk.NR) * double(calls) / elapsed / 1e9;
}

double fma_peak_gflops(double seconds) {
    using namespace detail;
    // one thread, independent multiply-add chains in registers, the widest vectors of cpu_isa()
    const auto chains = kernels_for_cpu<float>().fma_chains;
    float sink = 0;
    chains(1 << 12, &sink);  // warm up: wake the vector units, let the clock settle
    const auto start = std::chrono::steady_clock::now();
    double elapsed = 0, flops = 0;
    while (elapsed < seconds) {
        flops += chains(1 << 16, &sink);
        elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    volatile float keep = sink;
    (void)keep;
    return flops / elapsed / 1e9;
}

}  // namespace cnnbp
