// Micro-kernels for any CPU: the baseline instruction set only.
#include "gemm_microkernel.hpp"

// 16 vector registers of 16 bytes: kernel_set's MR 4, NV 2, NARROW_NV 4, DOT_MR 2, DOT_NR 2, GMR 4,
// GNV 2, MGMR 4, MGNV 2 (the widest again), NGMR 4, HALF_GATHER false
CNNBP_KERNEL_SETS(generic, 16, 4, 2, 4, 2, 2, 4, 2, 4, 2, 4, false)
