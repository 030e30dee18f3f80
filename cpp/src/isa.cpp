// The run-time choice between the AVX-512 and the portable pooling and elementwise kernels.
#include "isa.hpp"

#include <cstdlib>
#include <cstring>

namespace cnnbp::detail {

bool avx512_kernels_enabled() {
#if defined(CNNBP_AVX512_KERNELS)
    static const bool enabled = [] {
        const char* cap = std::getenv("CNNBP_ISA");
        if (cap && (std::strcmp(cap, "generic") == 0 || std::strcmp(cap, "avx2") == 0))
            return false;
        __builtin_cpu_init();
        return bool(__builtin_cpu_supports("avx512f"));
    }();
    return enabled;
#else
    return false;
#endif
}

}  // namespace cnnbp::detail
