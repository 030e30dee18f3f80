// Internal: the register-blocked GEMM micro-kernel, written once with GCC/Clang vector
// extensions and compiled once per instruction set (gemm_kernels_*.cpp, each with its own
// -m flags). It computes one MR x NR tile of C from packed panels:
//
//   C[i, j] (+)= sum_k a[k * MR + i] * b[k * NR + j]      i < MR, j < NR = W * NV
//
// a: the A micro-panel, kc steps of MR values; b: the B micro-panel, kc steps of NR values
// (both zero-padded). Only the m x n corner of the tile is written to C (row stride ldc).
// The sum over k runs in order, so a tile's result does not depend on who computes it.
//
// Everything here has internal linkage: instantiated under AVX-512 flags it must never be
// picked by the linker for a caller on a machine without AVX-512.
#pragma once

#include <cstdint>

#include "gemm.hpp"

namespace {

// C tile (+)= the accumulators acc[MR][NV] (vectors of W): whole vectors for a full tile,
// the m x n corner through memory otherwise.
template <typename T, int W, int MR, int NV, typename V>
inline void store_tile(const V (&acc)[MR][NV], T* __restrict c, int64_t ldc, bool accumulate, int m,
                       int n) {
    typedef T VU __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T)), may_alias));
    constexpr int NR = W * NV;
    if (m == MR && n == NR) {
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
            for (int j = 0; j < NV; ++j) {
                VU* cp = reinterpret_cast<VU*>(c + i * ldc + j * W);
                *cp = accumulate ? *cp + acc[i][j] : acc[i][j];
            }
        return;
    }
    T tile[MR * NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NV; ++j) *reinterpret_cast<VU*>(tile + i * NR + j * W) = acc[i][j];
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j)
            c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i * NR + j] : tile[i * NR + j];
}

// The loop every tile kernel below runs: acc[i] = sum_k a(k, i) * (B row k), in order of k,
// where a(k, i) is A's value in row i at step k and B row k is the NR = W * NV contiguous
// values at b_row(k); then the tile is stored (store_tile).
template <typename T, int W, int MR, int NV, typename AValue, typename BRow>
__attribute__((always_inline)) inline void accumulate_tile(int64_t kc, AValue a, BRow b_row,
                                                           T* __restrict c, int64_t ldc,
                                                           bool accumulate, int m, int n) {
    typedef T V __attribute__((vector_size(W * sizeof(T))));
    typedef T VU __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T)), may_alias));
    V acc[MR][NV];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[i][j] = V{};
    for (int64_t k = 0; k < kc; ++k) {
        const T* b = b_row(k);
        V bv[NV];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) bv[j] = *reinterpret_cast<const VU*>(b + j * W);
#pragma GCC unroll 32
        for (int i = 0; i < MR; ++i) {
            const T av = a(k, i);
#pragma GCC unroll 8
            for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
        }
    }
    store_tile<T, W, MR, NV>(acc, c, ldc, accumulate, m, n);
}

// A and B both packed: a(k, i) = a[k * MR + i], B row k at b + k * NR.
template <typename T, int W, int MR, int NV>
void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict c,
                  int64_t ldc, bool accumulate, int m, int n) {
    accumulate_tile<T, W, MR, NV>(
        kc, [a](int64_t k, int i) { return a[k * MR + i]; },
        [b](int64_t k) { return b + k * (W * NV); }, c, ldc, accumulate, m, n);
}

// The same tile with B read straight from an image instead of a packed panel: row k of B
// starts at in + offsets[k] and its NR values are contiguous (a unit-stride convolution
// over a zero-padded image, where offsets[k] locates filter tap k). The image must extend
// NR values past every offset it is given.
template <typename T, int W, int MR, int NV>
void tap_kernel(int64_t kc, const T* __restrict a, const int64_t* __restrict offsets,
                const T* __restrict in, T* __restrict c, int64_t ldc, bool accumulate, int m,
                int n) {
    accumulate_tile<T, W, MR, NV>(
        kc, [a](int64_t k, int i) { return a[k * MR + i]; },
        [in, offsets](int64_t k) { return in + offsets[k]; }, c, ldc, accumulate, m, n);
}

// The tile with A read in place instead: row i of A starts at in + a_offsets[i] and runs
// contiguously along k (taps of a padded image read along the output grid), B is a packed
// panel. Rows past m re-read the last valid row (their sums are discarded).
template <typename T, int W, int MR, int NV>
void gather_a_kernel(int64_t kc, const T* __restrict in, const int64_t* __restrict a_offsets,
                     const T* __restrict b, T* __restrict c, int64_t ldc, bool accumulate, int m,
                     int n) {
    const T* a_row[MR];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) a_row[i] = in + a_offsets[i < m ? i : m - 1];
    accumulate_tile<T, W, MR, NV>(
        kc, [&a_row](int64_t k, int i) { return a_row[i][k]; },
        [b](int64_t k) { return b + k * (W * NV); }, c, ldc, accumulate, m, n);
}

// The dot-product form, for products whose operands both run along k in memory:
//
//   C[i, j] += sum_k a[i * lda + k] * b[j * ldb + k]      i < m <= MR, j < n <= NR
//
// Each (i, j) keeps a vector of partial sums over k; the lanes are added in a fixed order
// at the end, then the scalar tail. Rows past m / n re-read the last valid row (their
// sums are discarded), so no padding is needed.
template <typename T, int W, int MR, int NR>
void dot_kernel(int64_t K, const T* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb,
                T* __restrict c, int64_t ldc, int m, int n) {
    typedef T V __attribute__((vector_size(W * sizeof(T))));
    typedef T VU __attribute__((vector_size(W * sizeof(T)), aligned(sizeof(T)), may_alias));
    const T* a_row[MR];
    const T* b_row[NR];
    for (int i = 0; i < MR; ++i) a_row[i] = a + (i < m ? i : m - 1) * lda;
    for (int j = 0; j < NR; ++j) b_row[j] = b + (j < n ? j : n - 1) * ldb;
    V acc[MR][NR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) acc[i][j] = V{};
    int64_t k = 0;
    for (; k + W <= K; k += W) {
        V av[MR], bv[NR];
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) av[i] = *reinterpret_cast<const VU*>(a_row[i] + k);
#pragma GCC unroll 16
        for (int j = 0; j < NR; ++j) bv[j] = *reinterpret_cast<const VU*>(b_row[j] + k);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
            for (int j = 0; j < NR; ++j) acc[i][j] += av[i] * bv[j];
    }
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            T sum = 0;
            for (int l = 0; l < W; ++l) sum += acc[i][j][l];
            for (int64_t kk = k; kk < K; ++kk) sum += a_row[i][kk] * b_row[j][kk];
            c[i * ldc + j] += sum;
        }
}

// The peak loop: CHAINS accumulators, each updated acc = acc * m + a once a step, with no
// dependence between them, so as many multiply-adds issue per cycle as the FMA units take
// (CHAINS covers latency times units on current x86 cores). The values converge to 1 and
// stay normal. They start from *sink, unknown to the compiler, so that no chain is folded
// into a constant (1 is a fixed point of the update), and their sum goes back to *sink so
// that the loop is not removed.
template <typename T, int W, int CHAINS>
double fma_chains(int64_t steps, T* sink) {
    typedef T V __attribute__((vector_size(W * sizeof(T))));
    V acc[CHAINS];
    const V m = V{} + T(0.999), a = V{} + T(0.001);
#pragma GCC unroll 32
    for (int i = 0; i < CHAINS; ++i) acc[i] = V{} + (*sink + T(i));
    for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 32
        for (int i = 0; i < CHAINS; ++i) acc[i] = acc[i] * m + a;
    }
    T sum = 0;
    for (int i = 0; i < CHAINS; ++i)
        for (int l = 0; l < W; ++l) sum += acc[i][l];
    *sink = sum;
    return 2.0 * W * CHAINS * double(steps);
}

// The kernel set of one instruction set: vectors of VectorBytes bytes (W values of T) and
// a register blocking counted in rows and vectors, the same for every T:
//   MR x NV             the gemm and tap kernels' tile; MR x 1 the tap kernel's tail
//   1 x NARROW_NV       tap_narrow's tile
//   DOT_MR x DOT_NR     the dot kernel's tile (DOT_NR in columns)
//   GMR x GNV           the widest gather tile; then MGMR x MGNV, NGMR rows of one vector,
//                       and NGMR rows of half a vector when HALF_GATHER (else of one vector
//                       again)
template <typename T, int VectorBytes, int MR, int NV, int NARROW_NV, int DOT_MR, int DOT_NR,
          int GMR, int GNV, int MGMR, int MGNV, int NGMR, bool HALF_GATHER>
cnnbp::detail::KernelSet<T> kernel_set(const char* isa) {
    constexpr int W = VectorBytes / int(sizeof(T));
    constexpr int W_last = HALF_GATHER ? W / 2 : W;
    return {{MR, W * NV, micro_kernel<T, W, MR, NV>},
            {MR, W * NV, tap_kernel<T, W, MR, NV>},
            {MR, W, tap_kernel<T, W, MR, 1>},
            {1, W * NARROW_NV, tap_kernel<T, W, 1, NARROW_NV>},
            {DOT_MR, DOT_NR, dot_kernel<T, W, DOT_MR, DOT_NR>},
            {{GMR, W * GNV, gather_a_kernel<T, W, GMR, GNV>},
             {MGMR, W * MGNV, gather_a_kernel<T, W, MGMR, MGNV>},
             {NGMR, W, gather_a_kernel<T, W, NGMR, 1>},
             {NGMR, W_last, gather_a_kernel<T, W_last, NGMR, 1>}},
            fma_chains<T, W, 12>,
            isa};
}

}  // namespace

// Defines kernels_<isa>_f32() and kernels_<isa>_f64() (chosen from in gemm.cpp), compiled
// with the including file's flags: kernel_set<T, vector_bytes, blocking...>.
#define CNNBP_KERNEL_SETS(isa, vector_bytes, ...)                   \
    namespace cnnbp::detail {                                       \
    KernelSet<float> kernels_##isa##_f32() {                        \
        return kernel_set<float, vector_bytes, __VA_ARGS__>(#isa);  \
    }                                                               \
    KernelSet<double> kernels_##isa##_f64() {                       \
        return kernel_set<double, vector_bytes, __VA_ARGS__>(#isa); \
    }                                                               \
    }
