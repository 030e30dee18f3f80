// The run-time choice of instruction set, shared by the GEMM, pooling and elementwise kernels.
#include "isa.hpp"

#include <cstdlib>
#include <string>

namespace cnnbp::detail {

Isa cpu_isa() {
    static const Isa isa = [] {
        const char* cap = std::getenv("CNNBP_ISA");
        const std::string limit = cap ? cap : "";
        const Isa ceiling = limit == "generic" ? Isa::generic
                            : limit == "avx2"  ? Isa::avx2
                                               : Isa::avx512;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        if (ceiling >= Isa::avx512 && __builtin_cpu_supports("avx512f")) return Isa::avx512;
        if (ceiling >= Isa::avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            return Isa::avx2;
#else
        (void)ceiling;
#endif
        return Isa::generic;
    }();
    return isa;
}

bool avx512_kernels_enabled() {
#if defined(CNNBP_AVX512_KERNELS)
    return cpu_isa() == Isa::avx512;
#else
    return false;
#endif
}

}  // namespace cnnbp::detail
