// Micro-kernels for AVX-512 (32 zmm registers). Compiled with -mavx512f -mfma; used only
// after the CPU reported AVX-512F.
#include "gemm_microkernel.hpp"

// 32 vector registers of 64 bytes: kernel_set's MR 8, NV 3, NARROW_NV 8, DOT_MR 4, DOT_NR 4, GMR 6,
// GNV 4, MGMR 12, MGNV 2, NGMR 12, HALF_GATHER true
CNNBP_KERNEL_SETS(avx512, 64, 8, 3, 8, 4, 4, 6, 4, 12, 2, 12, true)
