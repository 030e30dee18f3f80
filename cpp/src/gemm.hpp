// Internal: a packed, register-blocked GEMM (the BLIS loop structure) for the convolution.
//
//   C (M x N) (+)= A (M x K) . B (K x N)
//
// A is packed once into MR-row micro-panels (it is the filter, shared by every image);
// B is packed block by block by a caller-supplied function, so the convolution can pack
// straight from the image (implicit im2col) without materializing the im2col matrix.
// The micro-kernels are chosen once from the CPU's features (AVX-512, AVX2, or baseline).
//
// Determinism: every element of C is summed over k in the same order whatever thread
// computes it; callers split work over whole images or tiles, never over k.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace cnnbp::detail {

// Workspace that is written before it is read: allocated without zero-filling, which
// would cost more than a small convolution itself.
template <typename T>
class Scratch {
 public:
    explicit Scratch(int64_t count) : data_(new T[size_t(count)]) {}
    T* data() { return data_.get(); }

 private:
    std::unique_ptr<T[]> data_;
};

// The micro-kernels (gemm_microkernel.hpp), each computing an MR x NR tile of C by `run`.
template <typename Run>
struct Kernel {
    int MR, NR;
    Run* run;
};

// C (+)= packed A panel . packed B panel.
template <typename T>
using MicroKernel = Kernel<void(int64_t kc, const T* a, const T* b, T* c, int64_t ldc,
                                bool accumulate, int m, int n)>;
// C (+)= packed A panel . B, row k of B read in place at in + offsets[k] (tap_kernel).
template <typename T>
using TapKernel = Kernel<void(int64_t kc, const T* a, const int64_t* offsets, const T* in, T* c,
                              int64_t ldc, bool accumulate, int m, int n)>;
// C += A . B^T with A rows and B rows both contiguous along k (dot_kernel).
template <typename T>
using DotKernel = Kernel<void(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                              int64_t ldc, int m, int n)>;
// C (+)= A . packed B panel, row i of A read in place at in + a_offsets[i] (gather_a_kernel).
template <typename T>
using GatherKernel = Kernel<void(int64_t kc, const T* in, const int64_t* a_offsets, const T* b,
                                 T* c, int64_t ldc, bool accumulate, int m, int n)>;

// Every kernel of one instruction set; shapes vary so that small matrices waste little.
template <typename T>
struct KernelSet {
    MicroKernel<T> gemm;
    TapKernel<T> tap;         // many output rows (filters)
    TapKernel<T> tap_tail;    // tap's rows, one vector of pixels: short last tiles
    TapKernel<T> tap_narrow;  // one row at a time, a long run of pixels
    DotKernel<T> dot;
    GatherKernel<T> gather[4];  // widest NR first
    // `steps` steps of `chains` independent vector multiply-adds each (fused where the
    // instruction set has FMA); returns their flop count: the machine's arithmetic peak
    double (*fma_chains)(int64_t steps, T* sink);
    const char* isa;

    const TapKernel<T>& tap_for(int64_t rows) const { return rows * 2 < tap.MR ? tap_narrow : tap; }
    // The kernel for the last pixels of a grid that tap_for(rows) tiles.
    const TapKernel<T>& tap_tail_for(int64_t rows) const {
        return rows * 2 < tap.MR ? tap_narrow : tap_tail;
    }
    // The widest B panel that pads `cols` by at most a third.
    const GatherKernel<T>& gather_for(int64_t cols) const {
        for (const auto& g : gather)
            if ((cols + g.NR - 1) / g.NR * g.NR * 3 <= cols * 4) return g;
        return gather[3];
    }
};

// The kernels for this CPU (AVX-512, AVX2+FMA or baseline), chosen on first use.
template <typename T>
const KernelSet<T>& kernels_for_cpu();

// C (M x N) += A (M x K, row stride lda) . B^T (B: N x K, row stride ldb), tile by tile.
template <typename T>
void gemm_dot(const DotKernel<T>& dk, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
              const T* B, int64_t ldb, T* C, int64_t ldc) {
    for (int64_t j0 = 0; j0 < N; j0 += dk.NR)
        for (int64_t i0 = 0; i0 < M; i0 += dk.MR)
            dk.run(K, A + i0 * lda, lda, B + j0 * ldb, ldb, C + i0 * ldc + j0, ldc,
                   int(std::min<int64_t>(dk.MR, M - i0)), int(std::min<int64_t>(dk.NR, N - j0)));
}

// Cache blocking: a k-block of A (MR x kc) stays in L1 across a row of tiles, a packed
// block of B (kc x kNC) stays in L2. kNC is a multiple of every kernel's NR, so a gemm over
// columns [j0, j1) with j0 a multiple of NR computes each tile as the whole one does.
constexpr int64_t kMaxKC = 256;
constexpr int64_t kNC = 384;

inline int64_t k_block_size(int64_t K) {
    const int64_t blocks = (K + kMaxKC - 1) / kMaxKC;
    return (K + blocks - 1) / blocks;  // balanced blocks, none tiny
}

// A (M x K), A(i, k) = src[i * row_stride + k * col_stride], packed as: for each k-block
// (k0, kc), for each micro-panel of MR rows, kc steps of MR values (rows past M are zero).
template <typename T>
struct PackedA {
    int64_t M = 0, K = 0, kc = 0, M_padded = 0;
    int MR = 1;
    std::vector<T> data;

    // values pack() stores for (rows x cols) with MR = mr
    static int64_t size(int64_t rows, int64_t cols, int mr) {
        return (rows + mr - 1) / mr * mr * cols;
    }
    void pack(const T* src, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t cols,
              int mr) {
        M = rows, K = cols, MR = mr, kc = k_block_size(cols);
        M_padded = (rows + mr - 1) / mr * mr;
        data.assign(size_t(size(rows, cols, mr)), T(0));
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            const int64_t kb = std::min(kc, K - k0);
            if (row_stride == 1) {  // a panel's rows at one step are contiguous in src too
                for (int64_t i0 = 0; i0 < M; i0 += MR) {
                    const int64_t m = std::min<int64_t>(MR, M - i0);
                    T* dst = data.data() + M_padded * k0 + i0 * kb;
                    const T* s = src + i0 + k0 * col_stride;
                    for (int64_t k = 0; k < kb; ++k) {
                        const T* from = s + k * col_stride;
                        T* to = dst + k * MR;
                        int64_t r = 0;
#if defined(__SSE2__)
                        if constexpr (std::is_same_v<T, float>)
                            for (; r + 4 <= m; r += 4)
                                _mm_storeu_ps(to + r, _mm_loadu_ps(from + r));
#endif
                        for (; r < m; ++r) to[r] = from[r];  // (a library copy is a call)
                    }
                }
                continue;
            }
            int64_t i = 0;
#if defined(__SSE2__)
            // float rows along k: 4 rows by 4 steps at a time through a 4x4 transpose (a
            // store per 4 values instead of one per value; the values are only moved)
            if constexpr (std::is_same_v<T, float>) {
                if (col_stride == 1 && MR % 4 == 0)
                    for (; i + 4 <= M; i += 4) {
                        float* dst = data.data() + M_padded * k0 + (i / MR) * MR * kb + i % MR;
                        const float* s = src + i * row_stride + k0;
                        int64_t k = 0;
                        for (; k + 4 <= kb; k += 4) {
                            __m128 r0 = _mm_loadu_ps(s + k), r1 = _mm_loadu_ps(s + row_stride + k),
                                   r2 = _mm_loadu_ps(s + 2 * row_stride + k),
                                   r3 = _mm_loadu_ps(s + 3 * row_stride + k);
                            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
                            _mm_storeu_ps(dst + k * MR, r0);
                            _mm_storeu_ps(dst + (k + 1) * MR, r1);
                            _mm_storeu_ps(dst + (k + 2) * MR, r2);
                            _mm_storeu_ps(dst + (k + 3) * MR, r3);
                        }
                        for (; k < kb; ++k)
                            for (int64_t r = 0; r < 4; ++r) dst[k * MR + r] = s[r * row_stride + k];
                    }
            }
#endif
            for (; i < M; ++i) {
                T* dst = data.data() + M_padded * k0 + (i / MR) * MR * kb + i % MR;
                const T* s = src + i * row_stride + k0 * col_stride;
                for (int64_t k = 0; k < kb; ++k) dst[k * MR] = s[k * col_stride];
            }
        }
    }
    const T* panel(int64_t ip, int64_t k0, int64_t kb) const {
        return data.data() + M_padded * k0 + ip * MR * kb;
    }
};

// Size of the buffer that pack_b fills: one k-block by kNC columns, NR-padded.
template <typename T>
int64_t b_buffer_size(const MicroKernel<T>& uk) {
    return kMaxKC * ((kNC + uk.NR - 1) / uk.NR * uk.NR);
}

// C (+)= A . B over all N columns. pack_b(k0, kc, j0, nc, dst) writes rows [k0, k0+kc) and
// columns [j0, j0+nc) of B into dst as ceil(nc / NR) micro-panels of kc x NR values
// (columns past nc zero). With accumulate false, C is overwritten.
template <typename T, typename PackB>
void gemm(const MicroKernel<T>& uk, const PackedA<T>& A, int64_t N, PackB&& pack_b, T* C,
          int64_t ldc, bool accumulate, T* b_buffer) {
    const int64_t panels = (A.M + uk.MR - 1) / uk.MR;
    for (int64_t j0 = 0; j0 < N; j0 += kNC) {
        const int64_t nc = std::min(kNC, N - j0);
        for (int64_t k0 = 0; k0 < A.K; k0 += A.kc) {
            const int64_t kb = std::min(A.kc, A.K - k0);
            pack_b(k0, kb, j0, nc, b_buffer);
            const bool acc = accumulate || k0 > 0;
            for (int64_t ip = 0; ip < panels; ++ip) {
                const T* a = A.panel(ip, k0, kb);
                const int m = int(std::min<int64_t>(uk.MR, A.M - ip * uk.MR));
                T* c_row = C + ip * uk.MR * ldc + j0;
                for (int64_t jp = 0; jp * uk.NR < nc; ++jp) {
                    const int n = int(std::min<int64_t>(uk.NR, nc - jp * uk.NR));
                    uk.run(kb, a, b_buffer + jp * kb * uk.NR, c_row + jp * uk.NR, ldc, acc, m, n);
                }
            }
        }
    }
}

// pack_b for a plain row-major matrix B (K x N) with row stride ldb.
template <typename T>
void pack_b_rows(const T* B, int64_t ldb, int NR, int64_t k0, int64_t kc, int64_t j0, int64_t nc,
                 T* dst) {
    for (int64_t jp = 0; jp * NR < nc; ++jp) {
        const int64_t n = std::min<int64_t>(NR, nc - jp * NR);
        for (int64_t k = 0; k < kc; ++k) {
            const T* src = B + (k0 + k) * ldb + j0 + jp * NR;
            T* out = dst + (jp * kc + k) * NR;
            std::copy(src, src + n, out);
            std::fill(out + n, out + NR, T(0));
        }
    }
}

}  // namespace cnnbp::detail
