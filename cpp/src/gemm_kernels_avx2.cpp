// Micro-kernels for AVX2 + FMA (16 ymm registers). Compiled with -mavx2 -mfma; used only
// after the CPU reported both.
#include "gemm_microkernel.hpp"

// 16 vector registers of 32 bytes: kernel_set's MR 6, NV 2, NARROW_NV 8, DOT_MR 2, DOT_NR 4, GMR 4,
// GNV 2, MGMR 4, MGNV 2 (the widest again: 16 registers hold no other), NGMR 8, HALF_GATHER true
CNNBP_KERNEL_SETS(avx2, 32, 6, 2, 8, 2, 4, 4, 2, 4, 2, 8, true)
