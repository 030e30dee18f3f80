// conv2d forward and backward.
// N batch, C in-channels, K out-channels, H/W input, P/Q output, R/S filter; CRS = C*R*S
// is the length of one filter, PQ = P*Q the pixels of one output plane.
//
// Per image the convolution is a matrix product with the im2col matrix of the image,
// col (CRS x PQ), col[(c,r,s), (p,q)] = input[c, p*sh-ph+r, q*sw-pw+s] (0 outside):
//   forward   output_n (K x PQ)   = weight (K x CRS) . col_n
//   dinput    dcol_n (CRS x PQ)   = weight^T . doutput_n (K x PQ), then col2im adds into dinput
//   dweight   dweight (K x CRS)  += doutput_n . col_n^T          (summed over the batch)
// col is never materialized whole. With dilation, tap (r, s) reads row p*sh-ph+r*dh and
// column q*sw-pw+s*dw instead. With groups, the batch is seen as N*G images of C/G channels
// (the same memory: image n's group g is view image n*G+g), and view image i convolves
// with group i % G's filters; every path below works on that view (group_view).
// make_plan chooses the paths by shape, and sizes their scratch memory:
//   - tiny problems (fewer multiply-adds than packing costs): direct loops (forward_direct,
//     dinput_direct, dweight_direct);
//   - unit strides: each image is copied once into a zero-padded stack, and on the
//     padded-width output grid every row of col is a contiguous run of that stack, read in
//     place by the tap and gather micro-kernels (forward_padded, dweight_padded); dinput is
//     the forward convolution of the padded doutput with the flipped, transposed weight
//     (dinput_as_forward);
//   - strides the dilated kernel spans: the same, on the padded image split into its
//     polyphase components (PaddedGrid), where every tap is again one offset along the
//     output grid (forward_padded, dweight_padded); dinput is, phase by phase, the
//     correlation of doutput with that phase's taps (dinput_polyphase);
//   - other strides: the forward packs col blocks into the GEMM (forward_gemm), dinput runs
//     the GEMM into dcol blocks and adds them back (dinput_gemm_col2im), dweight takes the
//     dot-product kernel on blocks of col rows (dweight_gemm_dot);
//   - depthwise (one input channel per group, the MobileNet case): direct loops over
//     planes, each tap a vectorized pass along a row (forward_depthwise, dinput_depthwise,
//     dweight_depthwise).
// Small planes take forward_padded (and dinput_as_forward) several images side by side on
// one stack. Threads split the batch (or fixed chunks of it for the dweight/dbias sums);
// with fewer images than threads, forward_padded splits each image's grid into bands of
// output rows, dinput_polyphase its (filters x pixels) tiles and forward_gemm its columns
// in whole tiles. Every output pixel of the tile kernels is the same sum in the same order
// wherever its tile starts, so results depend neither on the thread count nor on the
// stacking.
#include "cnnbp/conv2d.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "conv2d_paths.hpp"
#include "conv2d_rows.hpp"
#include "gemm.hpp"
#include "isa.hpp"
#include "parallel.hpp"

namespace cnnbp {

using detail::valid_range;

namespace {

// float rows through the AVX-512 row kernels (conv2d_rows.hpp) where the CPU has them
template <typename T>
bool use_avx512_rows() {
#if defined(CNNBP_AVX512_KERNELS)
    return std::is_same_v<T, float> && detail::avx512_kernels_enabled();
#else
    return false;
#endif
}

// Below this many multiply-adds per image, packing costs more than it saves.
constexpr int64_t kMinGemmWork = 4096;
// dweight gathers this many pixels of im2col rows at a time (bounded workspace; long rows
// amortize the dot-product kernel's final horizontal sums). A multiple of kVectorPad.
constexpr int64_t kPixelBlock = 1024;
// Waking the second thread costs microseconds: split the batch only above this many
// multiply-adds (about 10 us of work).
constexpr int64_t kMinConvParallelWork = int64_t(1) << 20;
// Grid pixels per gather-kernel call: about kGatherValues values of its B panel (pixels x
// NR), from 128 to 512 pixels. Longer runs amortize each call's loads and stores of its
// tile, so narrow panels take more pixels (measured); a wide panel's block stays in L1.
constexpr int64_t kGatherValues = 8192;
int64_t gather_block(int64_t NR) { return std::clamp<int64_t>(kGatherValues / NR, 128, 512); }
// Rows handed to the dot-product kernel are padded to a multiple of the widest vector.
constexpr int64_t kVectorPad = 16;

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Whether the batch (or its chunks) is split among threads.
bool split_batch(const Conv2dDims& d) {
    return d.N * d.K * d.P * d.Q * d.C * d.R * d.S >= kMinConvParallelWork;
}

// A batch smaller than the thread count splits each image's grid among the threads above
// this many multiply-adds (about 100 us on one thread). Below it the second core costs about
// what it brings: with the threads spinning, a 3x3 conv of 16 channels on 28x28 (1.8M) took
// 29 us on two threads against 39 us on one, but the next layer then read its output from the
// other core's cache, and the --arch resnet batch-1 forward gained 9% with every conv split
// (333 against 364 us, measured); a thread woken from sleep (a shared machine) costs 20-40 us.
constexpr int64_t kMinTileSplitWork = int64_t(1) << 22;

// Whether the threads split the tiles of each image instead of the batch: fewer images than
// threads, and enough work.
bool split_tiles(const Conv2dDims& d) {
    return d.N < detail::max_threads() &&
           d.N * d.K * d.P * d.Q * d.C * d.R * d.S >= kMinTileSplitWork;
}

// The convolution of one group on the (N*G, C/G, H, W) view of the input and the
// (N*G, K/G, P, Q) view of the output: view image i is group i % G of image i / G.
Conv2dDims group_view(const Conv2dDims& d) {
    Conv2dDims v = d;
    const int64_t G = d.params.groups;
    v.N = d.N * G, v.C = d.C / G, v.K = d.K / G;
    return v;
}

// The filters of view image i: group i % G's (K/G, C/G, R, S) block of the weight.
template <typename T>
const T* group_weight(const T* weight, const Conv2dDims& v, int64_t i) {
    return weight + (i % v.params.groups) * v.K * v.C * v.R * v.S;
}

// The dilated kernel's extent along each axis.
int64_t extent_h(const Conv2dDims& d) { return d.params.dilation_h * (d.R - 1) + 1; }
int64_t extent_w(const Conv2dDims& d) { return d.params.dilation_w * (d.S - 1) + 1; }

// Scratch memory of one path: `shared` values of T allocated once per call, `per_thread`
// values by each thread that runs it (at most `max_threads`: the images or the chunks of
// the batch split among threads), and `offsets` int64_t tap offsets.
struct Buffers {
    int64_t shared = 0, per_thread = 0, max_threads = 1, offsets = 0;

    template <typename T>
    int64_t bytes(int64_t threads) const {
        const int64_t workers = std::max<int64_t>(1, std::min(threads, max_threads));
        return int64_t(sizeof(T)) * (shared + workers * per_thread) +
               int64_t(sizeof(int64_t)) * offsets;
    }
};

Buffers no_buffers(const Conv2dDims&) { return {}; }  // the direct loops

// ---- direct loops (tiny problems) ----------------------------------------------------------

// The direct loops' walk over the filter taps: body(r, s, p_lo, p_hi, q_lo, q_hi, row, col)
// for every tap, where output rows [p_lo, p_hi) and columns [q_lo, q_hi) read inside the
// input, output (op, oq) reading input row op*sh+row, column oq*sw+col.
template <typename Body>
void for_each_tap(const Conv2dDims& d, Body&& body) {
    const auto& p = d.params;
    for (int64_t r = 0; r < d.R; ++r) {
        int64_t p_lo, p_hi;
        valid_range(d.P, d.H, p.stride_h, p.pad_h, r * p.dilation_h, p_lo, p_hi);
        for (int64_t s = 0; s < d.S; ++s) {
            int64_t q_lo, q_hi;
            valid_range(d.Q, d.W, p.stride_w, p.pad_w, s * p.dilation_w, q_lo, q_hi);
            body(r, s, p_lo, p_hi, q_lo, q_hi, r * p.dilation_h - p.pad_h,
                 s * p.dilation_w - p.pad_w);
        }
    }
}

// output = bias + weight . col, one (n, k) plane at a time, by direct loops.
template <typename T>
void forward_direct(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, per_image = d.K * PQ * d.C * d.R * d.S;
    detail::parallel_for(d.N * d.K, d.N * per_image, [&](int64_t begin, int64_t end) {
        for (int64_t nk = begin; nk < end; ++nk) {
            const int64_t i = nk / d.K, k = nk % d.K;
            const T* in_image = input + i * d.C * d.H * d.W;
            const T* filters = group_weight(weight, d, i);
            T* out = output + nk * PQ;
            std::fill(out, out + PQ, bias ? bias[(i % p.groups) * d.K + k] : T(0));
            for (int64_t c = 0; c < d.C; ++c) {
                const T* in = in_image + c * d.H * d.W;
                const T* wkc = filters + (k * d.C + c) * d.R * d.S;
                for_each_tap(d, [&](int64_t r, int64_t s, int64_t p_lo, int64_t p_hi, int64_t q_lo,
                                    int64_t q_hi, int64_t row, int64_t col) {
                    const T w = wkc[r * d.S + s];
                    for (int64_t op = p_lo; op < p_hi; ++op) {
                        const T* in_row = in + (op * p.stride_h + row) * d.W;
                        T* out_row = out + op * d.Q;
                        for (int64_t oq = q_lo; oq < q_hi; ++oq)
                            out_row[oq] += w * in_row[oq * p.stride_w + col];
                    }
                });
            }
        }
    });
}

// Inverts `output_n = weight . col_n` by direct loops, one (n, c) plane at a time: every
// input cell gathers weight . doutput over the windows that read it.
template <typename T>
void dinput_direct(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W, per_image = d.K * PQ * d.C * d.R * d.S;
    detail::parallel_for(d.N * d.C, d.N * per_image, [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc) {
            const int64_t i = nc / d.C, c = nc % d.C;
            const T* filters = group_weight(weight, d, i);
            T* din = dinput + nc * HW;
            std::fill(din, din + HW, T(0));
            for (int64_t k = 0; k < d.K; ++k) {
                const T* dout = doutput + (i * d.K + k) * PQ;
                const T* wkc = filters + (k * d.C + c) * d.R * d.S;
                for_each_tap(d, [&](int64_t r, int64_t s, int64_t p_lo, int64_t p_hi, int64_t q_lo,
                                    int64_t q_hi, int64_t row, int64_t col) {
                    const T w = wkc[r * d.S + s];
                    for (int64_t op = p_lo; op < p_hi; ++op) {
                        T* din_row = din + (op * p.stride_h + row) * d.W;
                        const T* dout_row = dout + op * d.Q;
                        for (int64_t oq = q_lo; oq < q_hi; ++oq)
                            din_row[oq * p.stride_w + col] += w * dout_row[oq];
                    }
                });
            }
        }
    });
}

// Sum of n values in a fixed order (8 interleaved partial sums), so it vectorizes.
template <typename T>
T sum_fixed_order(const T* v, int64_t n) {
    T lanes[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += v[i + l];
    for (; i < n; ++i) lanes[i % 8] += v[i];
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
           ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Inverts `output_n = weight . col_n` for dweight and dbias by direct loops on the calling
// thread, summing over the batch in order: packing would cost more than the arithmetic.
//   dweight[k,c,r,s] = sum_{n,p,q} doutput[n,k,p,q] * input[n,c,p*sh-ph+r*dh,q*sw-pw+s*dw]
// (over the view images of k's group).
template <typename T>
void dweight_direct(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W, G = p.groups, images = d.N / G;
    if (dbias)  // the output's channels k of the full (N, G*K, P, Q) array
        for (int64_t k = 0; k < G * d.K; ++k) {
            T sum = 0;
            for (int64_t n = 0; n < images; ++n)
                sum += sum_fixed_order(doutput + (n * G * d.K + k) * PQ, PQ);
            dbias[k] = sum;
        }
    if (!dweight) return;
    for (int64_t gkc = 0; gkc < G * d.K * d.C; ++gkc) {
        const int64_t g = gkc / (d.K * d.C), k = gkc / d.C % d.K, c = gkc % d.C;
        for_each_tap(d, [&](int64_t r, int64_t s, int64_t p_lo, int64_t p_hi, int64_t q_lo,
                            int64_t q_hi, int64_t row, int64_t col) {
            T sum = 0;
            for (int64_t n = 0; n < images; ++n) {
                const int64_t i = n * G + g;
                const T* plane = input + (i * d.C + c) * HW;
                const T* dout = doutput + (i * d.K + k) * PQ;
                for (int64_t op = p_lo; op < p_hi; ++op) {
                    const T* in_row = plane + (op * p.stride_h + row) * d.W;
                    const T* dout_row = dout + op * d.Q;
                    for (int64_t oq = q_lo; oq < q_hi; ++oq)
                        sum += dout_row[oq] * in_row[oq * p.stride_w + col];
                }
            }
            dweight[(gkc * d.R + r) * d.S + s] = sum;
        });
    }
}

// ---- im2col --------------------------------------------------------------------------------

// dst[t * stride] = col[(c,r,s), pixel_start + t] for t < count, where pixel (p,q) of the
// output reads input[c, p*sh-ph+r*dh, q*sw-pw+s*dw] (zero outside the plane). Runs along one
// output row at a time, so with unit strides the inside of each run is a plain copy.
template <typename T>
void im2col_tap(const T* image, const Conv2dDims& d, int64_t c, int64_t r, int64_t s,
                int64_t pixel_start, int64_t count, T* dst, int64_t stride) {
    const auto& prm = d.params;
    const T* plane = image + c * d.H * d.W;
    int64_t row_lo, row_hi;  // output columns that read inside an input row: same every row
    valid_range(d.Q, d.W, prm.stride_w, prm.pad_w, s * prm.dilation_w, row_lo, row_hi);
    const int64_t col = s * prm.dilation_w - prm.pad_w;  // input column of output column 0
    int64_t op = pixel_start / d.Q, oq = pixel_start % d.Q, t = 0;
    while (t < count) {
        const int64_t run = std::min(count - t, d.Q - oq);
        const int64_t ih = op * prm.stride_h - prm.pad_h + r * prm.dilation_h;
        T* o = dst + t * stride;  // o[(q - oq) * stride] is output column q
        if (ih < 0 || ih >= d.H) {
            for (int64_t u = 0; u < run; ++u) o[u * stride] = T(0);
        } else {
            const int64_t lo = std::clamp(row_lo, oq, oq + run);
            const int64_t hi = std::clamp(row_hi, lo, oq + run);
            const T* row = plane + ih * d.W;
            for (int64_t q = oq; q < lo; ++q) o[(q - oq) * stride] = T(0);
            if (stride == 1 && prm.stride_w == 1) {
                // runs are one output row: too short for a memmove call to pay off
                const T* from = row + col;
                T* to = o - oq;
                for (int64_t q = lo; q < hi; ++q) to[q] = from[q];
            } else
                for (int64_t q = lo; q < hi; ++q)
                    o[(q - oq) * stride] = row[q * prm.stride_w + col];
            for (int64_t q = hi; q < oq + run; ++q) o[(q - oq) * stride] = T(0);
        }
        t += run;
        oq = 0;
        ++op;
    }
}

// pack_b for the forward: rows (c,r,s) in [k0, k0+kc), columns (p,q) in [j0, j0+nc) of the
// im2col matrix of one image, as NR-wide micro-panels.
template <typename T>
void pack_im2col(const T* image, const Conv2dDims& d, int NR, int64_t k0, int64_t kc, int64_t j0,
                 int64_t nc, T* dst) {
    for (int64_t jp = 0; jp * NR < nc; ++jp) {
        const int64_t n = std::min<int64_t>(NR, nc - jp * NR);
        int64_t c = k0 / (d.R * d.S), r = (k0 / d.S) % d.R, s = k0 % d.S;
        for (int64_t k = 0; k < kc; ++k) {
            T* out = dst + (jp * kc + k) * NR;
            im2col_tap(image, d, c, r, s, j0 + jp * NR, n, out, 1);
            std::fill(out + n, out + NR, T(0));
            if (++s == d.S) {
                s = 0;
                if (++r == d.R) r = 0, ++c;
            }
        }
    }
}

// col rows (c,r,s) with row stride ld receive the im2col columns [pixel_start,
// pixel_start + count) of one image.
template <typename T>
void im2col_block(const T* image, const Conv2dDims& d, int64_t pixel_start, int64_t count,
                  int64_t ld, T* col) {
    int64_t i = 0;
    for (int64_t c = 0; c < d.C; ++c)
        for (int64_t r = 0; r < d.R; ++r)
            for (int64_t s = 0; s < d.S; ++s, ++i)
                im2col_tap(image, d, c, r, s, pixel_start, count, col + i * ld, 1);
}

// dinput_image += col2im(dcol) for output columns [j0, j0 + nc): dcol is (CRS x nc).
template <typename T>
void col2im_add(T* dimage, const T* dcol, const Conv2dDims& d, int64_t j0, int64_t nc) {
    const auto& prm = d.params;
    const int64_t p_start = j0 / d.Q, q_start = j0 % d.Q;
    int64_t i = 0;
    for (int64_t c = 0; c < d.C; ++c)
        for (int64_t r = 0; r < d.R; ++r)
            for (int64_t s = 0; s < d.S; ++s, ++i) {
                T* plane = dimage + c * d.H * d.W;
                const T* src = dcol + i * nc;
                int64_t op = p_start, oq = q_start, jj = 0;
                while (jj < nc) {
                    const int64_t run = std::min(nc - jj, d.Q - oq);
                    const int64_t ih = op * prm.stride_h - prm.pad_h + r * prm.dilation_h;
                    if (ih >= 0 && ih < d.H) {
                        int64_t q_lo, q_hi;
                        valid_range(d.Q, d.W, prm.stride_w, prm.pad_w, s * prm.dilation_w, q_lo,
                                    q_hi);
                        q_lo = std::clamp(q_lo, oq, oq + run);
                        q_hi = std::clamp(q_hi, q_lo, oq + run);
                        T* row = plane + ih * d.W;
                        // input column of output column 0
                        const int64_t col = s * prm.dilation_w - prm.pad_w;
                        const T* g = src + jj;  // g[q - oq] is column q
                        for (int64_t q = q_lo; q < q_hi; ++q)
                            row[q * prm.stride_w + col] += g[q - oq];
                    }
                    jj += run;
                    oq = 0;
                    ++op;
                }
            }
}

// ---- the padded-width grid ----------------------------------------------------------------

// An image zero-padded to (C, Hp, Wp), Hp = ph+H+pad_bottom and Wp = pw+W+pad_right, and
// split into its sh*sw polyphase components: phase (rho, sigma) of plane c holds the padded
// rows rho, rho+sh, ... and columns sigma, sigma+sw, ..., a (Hs, Ws) plane with
// Hs = ceil(Hp/sh) and Ws = ceil(Wp/sw), stored at ((c*sh + rho)*sw + sigma)*Hs*Ws. Tap (r, s)
// of output pixel (p, q) reads padded row p*sh + r*dh, which is row p + (r*dh)/sh of phase
// (r*dh)%sh, likewise the columns: on the output grid o = p*Ws + q every tap is one offset
// into the stack, whatever the strides (with unit strides the stack is the padded planes).
// With unit strides a row's right padding and the next row's left padding are the same
// zeros, so Ws = W + max(pw, pr) when the output rows fit in that (see padded_grid).
// Columns q >= Q of the grid are a margin. Grid pixels run up to grid_padded (the grid
// rounded up to whole tiles, short ones at its end); reading every tap there, the last rows
// run past the planes, so the stack holds `stack` values, which must exist and be zero --
// the grid's margin multiplies them by zero, and uninitialized memory could hold NaN.
struct PaddedGrid {
    int64_t Hs, Ws, grid, grid_padded, stack;
    int64_t tiled;  // grid pixels [0, tiled) in whole tiles, the rest in tail tiles
};

// Offsets of the filter taps (c,r,s) in the polyphase stack of (Hs, Ws) planes.
std::vector<int64_t> tap_offsets(const Conv2dDims& d, int64_t Hs, int64_t Ws) {
    const auto& p = d.params;
    std::vector<int64_t> offsets;
    for (int64_t c = 0; c < d.C; ++c)
        for (int64_t r = 0; r < d.R; ++r)
            for (int64_t s = 0; s < d.S; ++s) {
                const int64_t row = r * p.dilation_h, col = s * p.dilation_w;
                const int64_t phase =
                    (c * p.stride_h + row % p.stride_h) * p.stride_w + col % p.stride_w;
                offsets.push_back(phase * Hs * Ws + row / p.stride_h * Ws + col / p.stride_w);
            }
    return offsets;
}

// `tile` pixels per tile, the last ones in tiles of `tail` pixels (a divisor of tile) when
// that computes fewer pixels past the grid.
PaddedGrid padded_grid(const Conv2dDims& d, int64_t tile, int64_t tail = 0) {
    const auto& p = d.params;
    const int64_t Hp = d.H + p.pad_h + d.pad_bottom, Wp = d.W + p.pad_w + d.pad_right;
    const int64_t Hs = (Hp + p.stride_h - 1) / p.stride_h;
    int64_t Ws = (Wp + p.stride_w - 1) / p.stride_w;
    // Unit strides: a row's right padding and the next row's left padding can be the same
    // zeros (padded column W+pw+j is column j < pw of the next row), so the planes are
    // W + max(pw, pr) wide -- as long as the output rows still fit (Q <= that width).
    if (p.stride_h == 1 && p.stride_w == 1 && d.Q <= d.W + std::max(p.pad_w, d.pad_right))
        Ws = d.W + std::max(p.pad_w, d.pad_right);
    const int64_t grid = d.P * Ws;
    int64_t tiled = round_up(grid, tile), grid_padded = tiled;
    if (tail > 0 && round_up(grid, tail) < tiled)
        tiled = grid / tile * tile, grid_padded = round_up(grid, tail);
    // the last tap: channel C-1's phases lie (C-1)*sh*sw planes after channel 0's
    Conv2dDims first_channel = d;
    first_channel.C = 1;
    const std::vector<int64_t> offsets = tap_offsets(first_channel, Hs, Ws);
    const int64_t last_tap = (d.C - 1) * p.stride_h * p.stride_w * Hs * Ws +
                             *std::max_element(offsets.begin(), offsets.end());
    // (a tile that starts inside the grid reads up to a tile past it)
    return {Hs,
            Ws,
            grid,
            grid_padded,
            std::max(d.C * p.stride_h * p.stride_w * Hs * Ws, last_tap + grid + tile),
            tiled};
}

// Planes [c_begin, c_end) of one image into the interior of its zero-bordered polyphase
// stack (whose borders are already zero).
template <typename T>
void copy_into_padded(T* padded, const T* image, const Conv2dDims& d, const PaddedGrid& g,
                      int64_t c_begin, int64_t c_end) {
    const auto& prm = d.params;
    const int64_t sh = prm.stride_h, sw = prm.stride_w, plane = g.Hs * g.Ws;
    if (sh == 1 && sw == 1) {  // the padded planes themselves
        if (use_avx512_rows<T>()) {
            for (int64_t c = c_begin; c < c_end; ++c)
                detail::copy_rows_f32_avx512(
                    reinterpret_cast<float*>(padded + (c * g.Hs + prm.pad_h) * g.Ws + prm.pad_w),
                    g.Ws, reinterpret_cast<const float*>(image + c * d.H * d.W), d.W, d.H, d.W);
            return;
        }
        for (int64_t c = c_begin; c < c_end; ++c)
            for (int64_t h = 0; h < d.H; ++h)
                std::copy(image + (c * d.H + h) * d.W, image + (c * d.H + h + 1) * d.W,
                          padded + (c * g.Hs + h + prm.pad_h) * g.Ws + prm.pad_w);
        return;
    }
    for (int64_t c = c_begin; c < c_end; ++c)
        // padded row ih = h + ph is row i of phase rho = ih % sh, counted along without
        // dividing
        for (int64_t h = 0, rho = prm.pad_h % sh, i = prm.pad_h / sh; h < d.H; ++h) {
            const T* from = image + (c * d.H + h) * d.W;
            T* to = padded + (c * sh + rho) * sw * plane + i * g.Ws;
            if (++rho == sh) rho = 0, ++i;
            if (sw == 1) {
                std::copy(from, from + d.W, to + prm.pad_w);
                continue;
            }
            if (sw == 2) {  // input columns 2t and 2t+1 go to the two phases, side by side
                const int64_t a = prm.pad_w % 2;
                T* __restrict even = to + a * plane + prm.pad_w / 2;
                T* __restrict odd = to + (1 - a) * plane + (prm.pad_w + 1) / 2;
                for (int64_t t = 0; t < d.W / 2; ++t)
                    even[t] = from[2 * t], odd[t] = from[2 * t + 1];
                if (d.W % 2) even[d.W / 2] = from[d.W - 1];
                continue;
            }
            for (int64_t sigma = 0; sigma < sw; ++sigma) {
                // input columns w with (w + pw) % sw == sigma, from the first one
                const int64_t w0 = ((sigma - prm.pad_w) % sw + sw) % sw;
                T* phase_row = to + sigma * plane + (w0 + prm.pad_w) / sw;
                for (int64_t w = w0, j = 0; w < d.W; w += sw, ++j) phase_row[j] = from[w];
            }
        }
}

template <typename T>
void copy_into_padded(T* padded, const T* image, const Conv2dDims& d, const PaddedGrid& g) {
    copy_into_padded(padded, image, d, g, 0, d.C);
}

// ---- forward -------------------------------------------------------------------------------

// output_n (K x PQ) = bias + weight (K x CRS) . col_n for every image, through the GEMM
// with im2col packing (any strides). Threads split the batch, or, with fewer images than
// threads, every image's columns in runs of whole NR-wide tiles: kNC is a multiple of every
// NR, so each tile is the same kernel calls either way.
template <typename T>
void forward_gemm(T* output, const T* input, const T* weight, const T* bias, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q, G = d.params.groups;
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    // each group's weight (K x CRS), shared by its images
    std::vector<detail::PackedA<T>> packed_weight(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g)
        packed_weight[size_t(g)].pack(weight + g * d.K * CRS, CRS, 1, d.K, CRS, uk.MR);
    // columns [j0, j1) of output_i
    auto run_columns = [&](int64_t i, int64_t j0, int64_t j1, T* b_buffer) {
        const T* image = input + i * d.C * d.H * d.W;
        T* out = output + i * d.K * PQ;  // output_i (K x PQ)
        const T* group_bias = bias ? bias + (i % G) * d.K : nullptr;
        for (int64_t k = 0; k < d.K; ++k)
            std::fill(out + k * PQ + j0, out + k * PQ + j1, group_bias ? group_bias[k] : T(0));
        auto pack = [&](int64_t k0, int64_t kc, int64_t jj0, int64_t nc, T* dst) {
            pack_im2col(image, d, uk.NR, k0, kc, j0 + jj0, nc, dst);
        };
        detail::gemm(uk, packed_weight[size_t(i % G)], j1 - j0, pack, out + j0, PQ,
                     /*accumulate=*/true, b_buffer);
    };
    if (!split_tiles(d)) {
        detail::parallel_for_if(split_batch(d), d.N, [&](int64_t i_begin, int64_t i_end) {
            detail::Scratch<T> b_buffer(detail::b_buffer_size(uk));
            for (int64_t i = i_begin; i < i_end; ++i) run_columns(i, 0, PQ, b_buffer.data());
        });
        return;
    }
    const int64_t tiles = (PQ + uk.NR - 1) / uk.NR, threads = detail::max_threads();
    detail::WorkQueue queue(d.N * tiles,
                            detail::queue_grain(d.N * tiles, d.K * uk.NR * CRS, threads));
    detail::parallel_for_if(true, threads, [&](int64_t, int64_t) {
        detail::Scratch<T> b_buffer(detail::b_buffer_size(uk));
        queue.take([&](int64_t begin, int64_t end) {
            for (int64_t item = begin; item < end;) {  // one run of tiles per image
                const int64_t i = item / tiles, t0 = item % tiles;
                const int64_t t1 = std::min(tiles, t0 + (end - item));
                run_columns(i, t0 * uk.NR, std::min(t1 * uk.NR, PQ), b_buffer.data());
                item += t1 - t0;
            }
        });
    });
}

template <typename T>
Buffers forward_gemm_buffers(const Conv2dDims& d) {
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    // one B buffer per thread: with fewer images than threads they share the columns
    return {d.params.groups * detail::PackedA<T>::size(d.K, d.C * d.R * d.S, uk.MR),
            detail::b_buffer_size(uk), split_batch(d) ? std::numeric_limits<int64_t>::max() : 1};
}

// Images side by side. With unit strides and one group, `images` images copied next to each
// other into one padded stack, `pitch` = W + gap columns apart with gap = max(pw, pr) zero
// columns between them, are one wide image (`dims`, N = 1) whose output row holds every
// image's output row: wide column b * pitch + q is image b's column q, whose taps read image
// b and zeros only. Small planes waste most of a tile past their grid (a 4x4 plane with
// padding 1: 16 outputs on a grid of 20 computed in 32 pixels); side by side the waste is
// the gap columns (16 of 20). Every output pixel is the same sum, in the same order, wherever
// it lies on a grid, so the results are those of one image at a time. `images` is a power of
// two, the row about kWideColumns pixels, with at least 4 stacks in the batch; 1 when that
// computes more pixels per image.
constexpr int64_t kWideColumns = 96;

struct WideStack {
    int64_t images = 1, pitch = 0;
    Conv2dDims dims;
};

WideStack wide_stack(const Conv2dDims& d, int64_t tile, int64_t tail) {
    WideStack w;
    w.dims = d;
    const auto& p = d.params;
    if (p.stride_h != 1 || p.stride_w != 1 || p.groups != 1) return w;
    const int64_t gap = std::max(p.pad_w, d.pad_right);
    int64_t images = 1;
    while (images * 2 * (d.W + gap) <= kWideColumns && images * 2 * 4 <= d.N) images *= 2;
    if (images == 1) return w;
    Conv2dDims wide = d;
    wide.N = 1;
    wide.W = images * (d.W + gap) - gap;
    wide.Q = images * (d.W + gap) - gap + p.pad_w + d.pad_right - extent_w(d) + 1;
    // the wide grid must compute no more pixels per image than one image's grid (at as many,
    // it still makes fewer, longer kernel calls)
    if (padded_grid(wide, tile, tail).grid_padded > padded_grid(d, tile, tail).grid_padded * images)
        return w;
    w.images = images, w.pitch = d.W + gap, w.dims = wide;
    return w;
}

// Output rows [p_begin, p_end) of out (K, P, Q), every filter's, = bias + a band of the
// output grid: (K, ld) values whose column 0 is grid pixel p_begin * Ws, margin columns
// dropped.
// The epilogue's arrays from filter `first` on (a group's filters), or none.
template <typename T>
Conv2dEpilogue<T> epilogue_from(const Conv2dEpilogue<T>* then, int64_t first) {
    if (!then) return {};
    Conv2dEpilogue<T> e = *then;
    if (e.center) e.center += first, e.scale += first, e.shift += first;
    return e;
}

// to[j] = then(filter k's) of z(j), j < n: the conv's value, then the epilogue's operations
// in batch_norm2d_forward's and relu_forward's order (this file is compiled without
// contraction, as the batch norm kernels are).
template <typename T, typename Value>
inline void write_then(T* to, int64_t n, Value z, const Conv2dEpilogue<T>& then, int64_t k) {
    if (!then.center && !then.relu) {
        for (int64_t j = 0; j < n; ++j) to[j] = z(j);
    } else if (!then.center) {
        for (int64_t j = 0; j < n; ++j) {
            const T v = z(j);
            to[j] = v <= T(0) ? T(0) : v;
        }
    } else {
        const T m = then.center[k], scale = then.scale[k], shift = then.shift[k];
        if (then.relu) {
            for (int64_t j = 0; j < n; ++j) {
                const T y = (z(j) - m) * scale + shift;
                to[j] = y <= T(0) ? T(0) : y;
            }
        } else {
            for (int64_t j = 0; j < n; ++j) to[j] = (z(j) - m) * scale + shift;
        }
    }
}

// The epilogue over whole output planes, in place, for the paths that do not crop: plane j
// of the group view is filter j % (G * K) (each image of the view is one group's K planes).
template <typename T>
void epilogue_pass(T* output, const Conv2dDims& d, const Conv2dEpilogue<T>& then) {
    const int64_t PQ = d.P * d.Q, GK = d.params.groups * d.K;
    detail::parallel_for(d.N * d.K, d.N * d.K * PQ, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
            T* values = output + plane * PQ;
            write_then(values, PQ, [values](int64_t j) { return values[j]; }, then, plane % GK);
        }
    });
}

template <typename T>
void crop_band(T* __restrict out, const T* __restrict band, int64_t ld, const T* bias,
               const Conv2dDims& d, int64_t Ws, int64_t p_begin, int64_t p_end,
               const Conv2dEpilogue<T>& then) {
    if (use_avx512_rows<T>()) {
        for (int64_t k = 0; k < d.K; ++k) {
            const float affine[3] = {then.center ? float(then.center[k]) : 0.0f,
                                     then.center ? float(then.scale[k]) : 0.0f,
                                     then.center ? float(then.shift[k]) : 0.0f};
            detail::crop_rows_f32_avx512(reinterpret_cast<float*>(out + (k * d.P + p_begin) * d.Q),
                                         d.Q, reinterpret_cast<const float*>(band + k * ld), Ws,
                                         p_end - p_begin, d.Q, bias ? float(bias[k]) : 0.0f,
                                         then.center ? affine : nullptr, then.relu);
        }
        return;
    }
    if (!then.center && !then.relu) {  // the plain copy, its loop unchanged
        for (int64_t k = 0; k < d.K; ++k) {
            const T b = bias ? bias[k] : T(0);
            for (int64_t op = p_begin; op < p_end; ++op) {
                const T* from = band + k * ld + (op - p_begin) * Ws;
                T* to = out + (k * d.P + op) * d.Q;
                for (int64_t oq = 0; oq < d.Q; ++oq) to[oq] = b + from[oq];
            }
        }
        return;
    }
    for (int64_t k = 0; k < d.K; ++k) {
        const T b = bias ? bias[k] : T(0);
        for (int64_t op = p_begin; op < p_end; ++op) {
            const T* __restrict from = band + k * ld + (op - p_begin) * Ws;
            write_then(
                out + (k * d.P + op) * d.Q, d.Q, [from, b](int64_t j) { return b + from[j]; }, then,
                k);
        }
    }
}

// Bands of output rows, for large planes and for the threads when there are fewer images
// than threads: a band's (K, band) grid stays in cache from its tiles to its crop (the whole
// grid of a 224x224 plane's 64 filters is 13 MB). About this many values.
constexpr int64_t kBandValues = int64_t(1) << 15;

// Up to this many values an image's whole grid is one band: smaller bands made a batch of
// mid-sized planes slower ((16, 3, 112, 112) with 64 filters, a 3.2 MB grid, took 15% longer
// in bands of 4 rows), but a 224x224 plane's 13 MB grid 15-20% faster on one thread
// (measured).
constexpr int64_t kMaxWholeGridValues = int64_t(1) << 21;

int64_t band_rows(const Conv2dDims& d, const PaddedGrid& g) {
    return std::clamp<int64_t>(kBandValues / (d.K * g.Ws), 1, d.P);
}

// Output rows per band when the threads split the batch: the whole grid up to
// kMaxWholeGridValues, else band_rows.
int64_t batch_band_rows(const Conv2dDims& d, const PaddedGrid& g) {
    return d.K * g.grid > kMaxWholeGridValues ? band_rows(d, g) : d.P;
}

// output = bias + weight . col for unit strides, without im2col: each image is copied once
// into its padded stack, whose taps the tap kernel reads in place along the grid (one B row
// of the GEMM per tap); the grid's margin columns are computed, then dropped. Small planes
// go several images side by side (wide_stack); larger ones band by band of output rows.
// Threads split the batch, or, with fewer images than threads, the bands of every image's
// grid. Every output pixel is the same sum in the same order wherever its tile starts, so
// neither the stacking nor the bands nor the threads change the results.
template <typename T>
void forward_padded_then(T* output, const T* input, const T* weight, const T* bias,
                         const Conv2dDims& d, const Conv2dEpilogue<T>* then) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q, CHW = d.C * d.H * d.W;
    const auto& uk = detail::kernels_for_cpu<T>().tap_for(d.K);
    const auto& tail = detail::kernels_for_cpu<T>().tap_tail_for(d.K);
    const WideStack wide = wide_stack(d, uk.NR, tail.NR);
    const PaddedGrid g = padded_grid(wide.dims, uk.NR, tail.NR);  // of one stack
    const int64_t G = d.params.groups;
    // each group's weight (K x CRS), shared by its images
    std::vector<detail::PackedA<T>> packed_weights(static_cast<size_t>(G));
    for (int64_t group = 0; group < G; ++group)
        packed_weights[size_t(group)].pack(weight + group * d.K * CRS, CRS, 1, d.K, CRS, uk.MR);
    const std::vector<int64_t> tap_offset = tap_offsets(d, g.Hs, g.Ws);
    const int64_t panels = (d.K + uk.MR - 1) / uk.MR;
    // grid pixels [o_begin, o_end) of a stack into `out` (K, ld), column 0 = pixel o_begin:
    // whole tiles of uk.NR pixels, then tail.NR ones where that computes fewer pixels past
    // o_end (tail has uk's MR, so both read the same packed weight)
    auto run_band = [&](T* out, int64_t ld, const T* padded,
                        const detail::PackedA<T>& packed_weight, int64_t o_begin, int64_t o_end) {
        const int64_t pixels = o_end - o_begin;
        int64_t whole_end = round_up(pixels, uk.NR);
        if (round_up(pixels, tail.NR) < whole_end) whole_end = pixels / uk.NR * uk.NR;
        for (int64_t o = 0; o < pixels;) {
            const auto& kernel = o < whole_end ? uk : tail;
            const int nvalid = int(std::min<int64_t>(kernel.NR, pixels - o));
            for (int64_t ip = 0; ip < panels; ++ip) {
                const int m = int(std::min<int64_t>(uk.MR, d.K - ip * uk.MR));
                for (int64_t k0 = 0; k0 < CRS; k0 += packed_weight.kc) {
                    const int64_t kb = std::min(packed_weight.kc, CRS - k0);
                    kernel.run(kb, packed_weight.panel(ip, k0, kb), tap_offset.data() + k0,
                               padded + o_begin + o, out + ip * uk.MR * ld + o, ld, k0 > 0, m,
                               nvalid);
                }
            }
            o += kernel.NR;
        }
    };
    const T* no_bias = nullptr;
    auto group_bias = [&](int64_t i) { return bias ? bias + (i % G) * d.K : no_bias; };
    auto group_then = [&](int64_t i) { return epilogue_from(then, (i % G) * d.K); };
    if (wide.images > 1) {  // stacks of wide.images images side by side (one group)
        const int64_t per_stack = wide.images, stacks = (d.N + per_stack - 1) / per_stack;
        detail::parallel_for_if(split_batch(d), stacks, [&](int64_t s_begin, int64_t s_end) {
            detail::Scratch<T> padded(g.stack);                       // polyphase stack + slack
            detail::Scratch<T> grid_out(d.K * g.grid_padded);         // (K, grid_padded)
            std::fill(padded.data(), padded.data() + g.stack, T(0));  // borders stay zero
            for (int64_t stack = s_begin; stack < s_end; ++stack) {
                // a last, short stack leaves earlier images' columns in place: their outputs
                // are not read, and the gaps that border its images stay zero
                const int64_t i0 = stack * per_stack, count = std::min(per_stack, d.N - i0);
                for (int64_t b = 0; b < count; ++b)
                    copy_into_padded(padded.data() + b * wide.pitch, input + (i0 + b) * CHW, d, g);
                run_band(grid_out.data(), g.grid_padded, padded.data(), packed_weights[0], 0,
                         g.grid);
                for (int64_t b = 0; b < count; ++b)
                    crop_band(output + (i0 + b) * d.K * PQ, grid_out.data() + b * wide.pitch,
                              g.grid_padded, group_bias(i0 + b), d, g.Ws, 0, d.P,
                              group_then(i0 + b));
            }
        });
        return;
    }
    const bool split = split_tiles(d);
    const int64_t threads = split ? detail::max_threads() : 1;
    // output rows per band: one image's whole grid up to kMaxWholeGridValues, else about
    // kBandValues of grid; with fewer images than threads, kBandValues and at least 4 bands
    // per thread
    const int64_t rows =
        split ? std::min(band_rows(d, g), std::max<int64_t>(1, d.N * d.P / (4 * threads)))
              : batch_band_rows(d, g);
    const int64_t bands = (d.P + rows - 1) / rows, band_ld = round_up(rows * g.Ws, uk.NR);
    // band b of image i (stack `padded`) into `out`, then cropped
    auto run_image_band = [&](T* out, const T* padded, int64_t i, int64_t b) {
        const int64_t p0 = b * rows, p1 = std::min(d.P, p0 + rows);
        run_band(out, band_ld, padded, packed_weights[size_t(i % G)], p0 * g.Ws, p1 * g.Ws);
        crop_band(output + i * d.K * PQ, out, band_ld, group_bias(i), d, g.Ws, p0, p1,
                  group_then(i));
    };
    if (!split) {
        detail::parallel_for_if(split_batch(d), d.N, [&](int64_t i_begin, int64_t i_end) {
            detail::Scratch<T> padded(g.stack);                       // polyphase stack + slack
            detail::Scratch<T> band_out(d.K * band_ld);               // (K, band_ld)
            std::fill(padded.data(), padded.data() + g.stack, T(0));  // borders stay zero
            for (int64_t i = i_begin; i < i_end; ++i) {
                copy_into_padded(padded.data(), input + i * CHW, d, g);
                for (int64_t b = 0; b < bands; ++b)
                    run_image_band(band_out.data(), padded.data(), i, b);
            }
        });
        return;
    }
    // Fewer images than threads: one parallel region (one wake-up of the threads) in which
    // the threads take the bands from a queue; each thread copies the images of its bands
    // into a stack of its own (reading a stack another core wrote costs more than the copy).
    detail::Scratch<T> stacks(threads * g.stack);
    detail::Scratch<T> band_outs(threads * d.K * band_ld);  // one band per thread
    detail::WorkQueue band_queue(d.N * bands, 1);
    detail::parallel_team(true, [&](const detail::Team& team) {
        T* padded = stacks.data() + team.thread * g.stack;
        T* out = band_outs.data() + team.thread * d.K * band_ld;
        int64_t copied = -1;  // the image in this thread's stack
        band_queue.take([&](int64_t begin, int64_t end) {
            for (int64_t item = begin; item < end; ++item) {
                const int64_t i = item / bands;
                if (i != copied) {
                    if (copied < 0) std::fill(padded, padded + g.stack, T(0));  // zero borders
                    copy_into_padded(padded, input + i * CHW, d, g);
                    copied = i;
                }
                run_image_band(out, padded, i, item % bands);
            }
        });
    });
}

template <typename T>
void forward_padded(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& d) {
    forward_padded_then<T>(output, input, weight, bias, d, nullptr);
}

template <typename T>
Buffers forward_padded_buffers(const Conv2dDims& d) {
    const auto& uk = detail::kernels_for_cpu<T>().tap_for(d.K);
    const int64_t tail = detail::kernels_for_cpu<T>().tap_tail_for(d.K).NR;
    const WideStack wide = wide_stack(d, uk.NR, tail);
    const PaddedGrid g = padded_grid(wide.dims, uk.NR, tail);
    const int64_t CRS = d.C * d.R * d.S, packed = detail::PackedA<T>::size(d.K, CRS, uk.MR);
    if (wide.images > 1)
        return {d.params.groups * packed, g.stack + d.K * g.grid_padded,
                (d.N + wide.images - 1) / wide.images, CRS};
    // a stack and an image's grid (or band) per thread (with fewer images than threads, a
    // stack and a band per thread)
    return {d.params.groups * packed, g.stack + d.K * round_up(batch_band_rows(d, g) * g.Ws, uk.NR),
            d.N, CRS};
}

// ---- dinput --------------------------------------------------------------------------------

// With unit strides, dinput is itself a convolution: doutput (N, K, P, Q) padded by
// eh-1-ph rows on top and eh-1-pad_bottom below (eh the dilated kernel's extent, likewise
// the columns), correlated with the weight flipped in r, s and transposed in (k, c) (in each
// group), with the same dilation, gives dinput (N, C, H, W). These are its dims.
Conv2dDims as_forward_dims(const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t eh = extent_h(d), ew = extent_w(d);
    Conv2dParams params;
    params.pad_h = eh - 1 - p.pad_h, params.pad_w = ew - 1 - p.pad_w;
    params.dilation_h = p.dilation_h, params.dilation_w = p.dilation_w;
    params.groups = p.groups;
    return {d.N,
            d.K,
            d.P,
            d.Q,
            d.C,
            d.R,
            d.S,
            d.H,
            d.W,
            params,
            eh - 1 - d.pad_bottom,
            ew - 1 - d.pad_right};
}

// Inverts `output_n = weight . col_n` for unit strides as the forward convolution of
// as_forward_dims, through forward_padded: doutput is read in place.
template <typename T>
void dinput_as_forward(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    const int64_t KCRS = d.K * d.C * d.R * d.S;
    std::vector<T> flipped(size_t(d.params.groups * KCRS));  // (G, C, K, R, S)
    for (int64_t g = 0; g < d.params.groups; ++g)
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t c = 0; c < d.C; ++c)
                for (int64_t r = 0; r < d.R; ++r)
                    for (int64_t s = 0; s < d.S; ++s)
                        flipped[g * KCRS + ((c * d.K + k) * d.R + r) * d.S + s] =
                            weight[g * KCRS + ((k * d.C + c) * d.R + (d.R - 1 - r)) * d.S +
                                   (d.S - 1 - s)];
    forward_padded(dinput, doutput, flipped.data(), static_cast<const T*>(nullptr),
                   as_forward_dims(d));
}

template <typename T>
Buffers dinput_as_forward_buffers(const Conv2dDims& d) {
    Buffers b = forward_padded_buffers<T>(as_forward_dims(d));
    b.shared += d.params.groups * d.K * d.C * d.R * d.S;  // the flipped weight
    return b;
}

// With strides, dinput splits into the sh*sw polyphase components of the padded input (see
// PaddedGrid): padded cell (i*sh + rho, j*sw + sigma) is read only by the taps (r, s) with
// (r*dh)%sh == rho and (s*dw)%sw == sigma, output pixel (i - a, j - b) of each with
// a = (r*dh)/sh, b = (s*dw)/sw. So each phase is a unit-stride correlation of doutput with
// its own taps, on a zero-bordered (K, Hd, Wd) stack of doutput with A = max a rows on top
// and B = max b columns on the left: phase cell (i, j) is grid pixel o = i*Wd + j, and tap
// (k, r, s) reads o + k*Hd*Wd + (A - a)*Wd + (B - b). These are its sizes.
struct PhaseGrid {
    int64_t A, B, Hd, Wd, Hs, Ws, grid, grid_padded;
};

PhaseGrid phase_grid(const Conv2dDims& d, int64_t tile) {
    const auto& p = d.params;
    const int64_t Hp = d.H + p.pad_h + d.pad_bottom, Wp = d.W + p.pad_w + d.pad_right;
    const int64_t Hs = (Hp + p.stride_h - 1) / p.stride_h, Ws = (Wp + p.stride_w - 1) / p.stride_w;
    const int64_t A = (d.R - 1) * p.dilation_h / p.stride_h;
    const int64_t B = (d.S - 1) * p.dilation_w / p.stride_w;
    const int64_t Hd = std::max(d.P, Hs) + A, Wd = std::max(d.Q, Ws) + B;
    return {A, B, Hd, Wd, Hs, Ws, Hs * Wd, round_up(Hs * Wd, tile)};
}

// The taps of each phase rho*sw + sigma: their (k, r, s) offsets into the doutput stack and
// their weight^T (C x K*taps), columns (k, tap) in the offsets' order.
template <typename T>
struct PhaseTaps {
    std::vector<std::vector<int64_t>> offsets;
    std::vector<std::vector<T>> weight_t;  // one per group and phase, (g, phase)
};

template <typename T>
PhaseTaps<T> phase_taps(const T* weight, const Conv2dDims& d, const PhaseGrid& g) {
    const auto& p = d.params;
    const int64_t phases = p.stride_h * p.stride_w, G = p.groups, RS = d.R * d.S;
    PhaseTaps<T> t;
    t.offsets.resize(size_t(phases));
    t.weight_t.resize(size_t(weight ? G * phases : 0));
    std::vector<std::vector<int64_t>> taps(
        static_cast<size_t>(phases));  // r*S + s of each phase's taps
    for (int64_t r = 0; r < d.R; ++r)
        for (int64_t s = 0; s < d.S; ++s) {
            const int64_t row = r * p.dilation_h, col = s * p.dilation_w;
            taps[size_t(row % p.stride_h * p.stride_w + col % p.stride_w)].push_back(r * d.S + s);
        }
    for (int64_t ph = 0; ph < phases; ++ph) {
        const auto& tp = taps[size_t(ph)];
        const int64_t nt = int64_t(tp.size());
        for (int64_t k = 0; k < d.K; ++k)
            for (int64_t rs : tp) {
                const int64_t a = rs / d.S * p.dilation_h / p.stride_h;
                const int64_t b = rs % d.S * p.dilation_w / p.stride_w;
                t.offsets[size_t(ph)].push_back(k * g.Hd * g.Wd + (g.A - a) * g.Wd + (g.B - b));
            }
        if (!weight) continue;
        for (int64_t grp = 0; grp < G; ++grp) {
            auto& wt = t.weight_t[size_t(grp * phases + ph)];
            wt.resize(size_t(d.C * d.K * nt));
            const T* w = weight + grp * d.K * d.C * RS;
            for (int64_t c = 0; c < d.C; ++c)
                for (int64_t k = 0; k < d.K; ++k)
                    for (int64_t u = 0; u < nt; ++u)
                        wt[size_t((c * d.K + k) * nt + u)] = w[(k * d.C + c) * RS + tp[size_t(u)]];
        }
    }
    return t;
}

// The doutput stack's size: its (K, Hd, Wd) planes, and the overrun of the last tap's reads
// along the padded grid (zero, see PaddedGrid).
int64_t phase_stack(const Conv2dDims& d, const PhaseGrid& g) {
    return std::max(d.K * g.Hd * g.Wd, (d.K - 1) * g.Hd * g.Wd + g.A * g.Wd + g.B + g.grid_padded);
}

// Inverts `output_n = weight . col_n` for strides on the polyphase components: doutput is
// copied once into its zero-bordered stack, and each phase's taps are read in place by the
// tap kernel along the phase's grid, as in forward_padded; every dinput cell lies in one
// phase, and is written from its grid cell.
template <typename T>
void dinput_polyphase(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    const auto& prm = d.params;
    const int64_t sh = prm.stride_h, sw = prm.stride_w, phases = sh * sw, G = prm.groups;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W;
    const auto& uk = detail::kernels_for_cpu<T>().tap_for(d.C);
    const PhaseGrid g = phase_grid(d, uk.NR);
    const PhaseTaps<T> taps = phase_taps(weight, d, g);
    std::vector<detail::PackedA<T>> packed(size_t(G * phases));  // (g, phase): C x K*taps
    for (int64_t grp = 0; grp < G; ++grp)
        for (int64_t ph = 0; ph < phases; ++ph) {
            const int64_t cols = int64_t(taps.offsets[size_t(ph)].size());
            if (cols)
                packed[size_t(grp * phases + ph)].pack(
                    taps.weight_t[size_t(grp * phases + ph)].data(), cols, 1, d.C, cols, uk.MR);
        }
    const int64_t stack = phase_stack(d, g), panels = (d.C + uk.MR - 1) / uk.MR;
    const int64_t tiles = (g.grid + uk.NR - 1) / uk.NR, plane = g.Hd * g.Wd;
    // doutput plane k of view image i into its place in the zero-bordered stack
    auto copy_plane = [&](T* padded, int64_t i, int64_t k) {
        const T* dout = doutput + (i * d.K + k) * PQ;
        for (int64_t op = 0; op < d.P; ++op)
            std::copy(dout + op * d.Q, dout + (op + 1) * d.Q,
                      padded + (k * g.Hd + g.A + op) * g.Wd + g.B);
    };
    // channels [ip*MR, ip*MR + MR) of tile `tile` of phase ph of view image i
    auto run_tile = [&](T* grid_out, const T* padded, int64_t i, int64_t ph, int64_t tile,
                        int64_t ip) {
        const auto& offsets = taps.offsets[size_t(ph)];
        const int64_t cols = int64_t(offsets.size()), o0 = tile * uk.NR;
        const int nvalid = int(std::min<int64_t>(uk.NR, g.grid - o0));
        const int m = int(std::min<int64_t>(uk.MR, d.C - ip * uk.MR));
        T* c_tile = grid_out + ph * d.C * g.grid_padded + ip * uk.MR * g.grid_padded + o0;
        if (!cols) {  // no tap reads this phase
            for (int row = 0; row < m; ++row)
                std::fill(c_tile + row * g.grid_padded, c_tile + row * g.grid_padded + nvalid,
                          T(0));
            return;
        }
        const detail::PackedA<T>& pw = packed[size_t((i % G) * phases + ph)];
        for (int64_t k0 = 0; k0 < cols; k0 += pw.kc) {
            const int64_t kb = std::min(pw.kc, cols - k0);
            uk.run(kb, pw.panel(ip, k0, kb), offsets.data() + k0, padded + o0, c_tile,
                   g.grid_padded, k0 > 0, m, nvalid);
        }
    };
    // dinput plane c of view image i from its phases' grids: cell (h, w) is phase
    // ((h+ph) % sh, (w+pw) % sw)'s cell ((h+ph)/sh, (w+pw)/sw)
    auto scatter_plane = [&](const T* grid_out, int64_t i, int64_t c) {
        T* dimage = dinput + i * d.C * HW;
        for (int64_t h = 0, rho = prm.pad_h % sh, row = prm.pad_h / sh; h < d.H; ++h) {
            // the row `row` of phase (rho, 0), row*sh + rho = h + ph counted along
            const T* from = grid_out + (rho * sw * d.C + c) * g.grid_padded + row * g.Wd;
            if (++rho == sh) rho = 0, ++row;
            const int64_t phase_stride = d.C * g.grid_padded;
            T* __restrict to = dimage + (c * d.H + h) * d.W;
            if (sw == 2) {  // columns 2t and 2t+1 from the two phases, side by side
                const int64_t a = prm.pad_w % 2;
                const T* __restrict even = from + a * phase_stride + prm.pad_w / 2;
                const T* __restrict odd = from + (1 - a) * phase_stride + (prm.pad_w + 1) / 2;
                for (int64_t t = 0; t < d.W / 2; ++t) to[2 * t] = even[t], to[2 * t + 1] = odd[t];
                if (d.W % 2) to[d.W - 1] = even[d.W / 2];
            } else
                for (int64_t w = 0; w < d.W; ++w) {
                    const int64_t iw = w + prm.pad_w;
                    to[w] = from[iw % sw * phase_stride + iw / sw];
                }
        }
    };
    if (!split_tiles(d)) {
        detail::parallel_for_if(split_batch(d), d.N, [&](int64_t i_begin, int64_t i_end) {
            detail::Scratch<T> padded(stack);                           // (K, Hd, Wd) + slack
            detail::Scratch<T> grid_out(phases * d.C * g.grid_padded);  // (phases, C, grid_padded)
            std::fill(padded.data(), padded.data() + stack, T(0));      // borders stay zero
            for (int64_t i = i_begin; i < i_end; ++i) {
                for (int64_t k = 0; k < d.K; ++k) copy_plane(padded.data(), i, k);
                for (int64_t ph = 0; ph < phases; ++ph)
                    for (int64_t tile = 0; tile < tiles; ++tile)
                        for (int64_t ip = 0; ip < panels; ++ip)
                            run_tile(grid_out.data(), padded.data(), i, ph, tile, ip);
                for (int64_t c = 0; c < d.C; ++c) scatter_plane(grid_out.data(), i, c);
            }
        });
        return;
    }
    // Fewer images than threads: every image's stack and grids, and one parallel region in
    // which the threads take from queues the planes of the copies (when large, else the
    // calling thread makes them first), the tiles of every phase, then the planes of dinput.
    const int64_t per_image = stack + phases * d.C * g.grid_padded;
    detail::Scratch<T> images(d.N * per_image);           // stack, then (phases, C, grid_padded)
    auto copy_planes = [&](int64_t begin, int64_t end) {  // (image, filter) pairs
        for (int64_t ik = begin; ik < end; ++ik) {
            const int64_t i = ik / d.K, k = ik % d.K;
            T* padded = images.data() + i * per_image;  // plane k and its zero borders
            std::fill(padded + k * plane, padded + (k + 1 == d.K ? stack : (k + 1) * plane), T(0));
            copy_plane(padded, i, k);
        }
    };
    const bool share_copies = d.N * stack >= detail::kMinParallelWork;
    if (!share_copies) copy_planes(0, d.N * d.K);
    const int64_t items = phases * tiles * panels, threads = detail::max_threads();  // per image
    detail::WorkQueue copies(d.N * d.K, detail::queue_grain(d.N * d.K, plane, threads));
    detail::WorkQueue tile_queue(
        d.N * items,
        detail::queue_grain(d.N * items, uk.MR * uk.NR * d.K * d.R * d.S / phases, threads));
    detail::WorkQueue scatters(d.N * d.C, detail::queue_grain(d.N * d.C, HW, threads));
    detail::parallel_team(true, [&](const detail::Team& team) {
        if (share_copies) {
            copies.take(copy_planes);
            team.barrier();
        }
        tile_queue.take([&](int64_t begin, int64_t end) {
            for (int64_t item = begin; item < end; ++item) {
                const int64_t i = item / items, ph = item / (tiles * panels) % phases;
                T* padded = images.data() + i * per_image;
                run_tile(padded + stack, padded, i, ph, item / panels % tiles, item % panels);
            }
        });
        team.barrier();
        scatters.take([&](int64_t begin, int64_t end) {
            for (int64_t ic = begin; ic < end; ++ic)
                scatter_plane(images.data() + ic / d.C * per_image + stack, ic / d.C, ic % d.C);
        });
    });
}

template <typename T>
Buffers dinput_polyphase_buffers(const Conv2dDims& d) {
    const auto& uk = detail::kernels_for_cpu<T>().tap_for(d.C);
    const PhaseGrid g = phase_grid(d, uk.NR);
    const PhaseTaps<T> taps = phase_taps(static_cast<const T*>(nullptr), d, g);
    int64_t packed = 0;
    for (const auto& offsets : taps.offsets)
        packed += detail::PackedA<T>::size(d.C, int64_t(offsets.size()), uk.MR);
    const int64_t KCRS = d.K * d.C * d.R * d.S;
    const int64_t phases = d.params.stride_h * d.params.stride_w;
    return {d.params.groups * (packed + KCRS), phase_stack(d, g) + phases * d.C * g.grid_padded,
            d.N, d.K * d.R * d.S};
}

// Inverts `output_n = weight . col_n` for any strides: dcol_n = weight^T . doutput_n by the
// GEMM, a block of columns at a time, and every input cell gathers the dcol entries of the
// windows that read it (col2im).
template <typename T>
void dinput_gemm_col2im(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q, HW = d.H * d.W, G = d.params.groups;
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    // each group's weight^T (CRS x K): row (c,r,s) reads column i
    std::vector<detail::PackedA<T>> packed_weight_t(static_cast<size_t>(G));
    for (int64_t g = 0; g < G; ++g)
        packed_weight_t[size_t(g)].pack(weight + g * d.K * CRS, 1, CRS, CRS, d.K, uk.MR);
    detail::parallel_for_if(split_batch(d), d.N, [&](int64_t i_begin, int64_t i_end) {
        detail::Scratch<T> b_buffer(detail::b_buffer_size(uk));
        detail::Scratch<T> dcol(CRS * std::min(detail::kNC, PQ));  // a column block of dcol_i
        for (int64_t i = i_begin; i < i_end; ++i) {
            T* dimage = dinput + i * d.C * HW;
            std::fill(dimage, dimage + d.C * HW, T(0));
            const T* dout = doutput + i * d.K * PQ;  // doutput_i (K x PQ)
            for (int64_t j0 = 0; j0 < PQ; j0 += detail::kNC) {
                const int64_t nc = std::min(detail::kNC, PQ - j0);
                auto pack = [&](int64_t k0, int64_t kc, int64_t jj0, int64_t ncc, T* dst) {
                    detail::pack_b_rows(dout + j0, PQ, uk.NR, k0, kc, jj0, ncc, dst);
                };
                detail::gemm(uk, packed_weight_t[size_t(i % G)], nc, pack, dcol.data(), nc, false,
                             b_buffer.data());
                col2im_add(dimage, dcol.data(), d, j0, nc);
            }
        }
    });
}

template <typename T>
Buffers dinput_gemm_col2im_buffers(const Conv2dDims& d) {
    const auto& uk = detail::kernels_for_cpu<T>().gemm;
    const int64_t CRS = d.C * d.R * d.S;
    return {d.params.groups * detail::PackedA<T>::size(CRS, d.K, uk.MR),
            detail::b_buffer_size(uk) + CRS * std::min(detail::kNC, d.P * d.Q), d.N};
}

// ---- dweight and dbias ---------------------------------------------------------------------

// The batch is split into a fixed number of chunks for the dweight/dbias reduction, so
// the order of the sums depends on N only, never on the number of threads.
int64_t reduction_chunks(int64_t N) { return std::min<int64_t>(N, 8); }

// out (rows x cols) = the sum of `chunks` >= 1 partials in chunk order, stored
// `chunk_stride` values apart, each (rows x cols) or, when `transposed`, (cols x rows).
template <typename T>
void add_partials(T* out, const T* partials, int64_t chunks, int64_t chunk_stride, int64_t rows,
                  int64_t cols, bool transposed) {
    const int64_t size = rows * cols;
    // the sums in the partials' order, a vector pass per chunk; transposed into out after
    std::vector<T> transposed_sums(size_t(transposed ? size : 0));
    T* __restrict acc = transposed ? transposed_sums.data() : out;
    std::copy(partials, partials + size, acc);
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
        const T* __restrict partial = partials + chunk * chunk_stride;
        for (int64_t i = 0; i < size; ++i) acc[i] += partial[i];
    }
    if (!transposed) return;
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = acc[c * rows + r];
}

// dweight and dbias as sums over reduction_chunks(N) chunks of the batch (N >= 1 images,
// N*G view images; conv2d_backward answers an empty batch itself): each chunk sums into partials of
// its own, then the partials add up in chunk order. dbias sums doutput's planes; for dweight every
// thread makes one worker (make_worker()) and, group after group, calls add(dw, i, last) for each
// view image i of the group in its chunks, dw the chunk's partial of the group, (K, CRS) or (CRS,
// K) when `transposed`, and last true for the chunk's last image of the group.
template <typename T, typename MakeWorker>
void sum_over_chunks(T* dweight, T* dbias, const T* doutput, const Conv2dDims& d, bool transposed,
                     const MakeWorker& make_worker) {
    const int64_t G = d.params.groups, images = d.N / G;
    const int64_t CRS = d.C * d.R * d.S, KCRS = d.K * CRS, PQ = d.P * d.Q;
    const int64_t GK = G * d.K, GKCRS = G * KCRS;  // the whole weight's and bias' sizes
    const int64_t chunks = reduction_chunks(images);
    std::vector<T> partial_w(size_t(dweight ? chunks * GKCRS : 0));
    std::vector<T> partial_b(size_t(chunks * GK));
    detail::parallel_for_if(split_batch(d), chunks, [&](int64_t chunk_begin, int64_t chunk_end) {
        std::optional<decltype(make_worker())> add;
        if (dweight) add.emplace(make_worker());
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
            const int64_t n_begin = images * chunk / chunks;
            const int64_t n_end = images * (chunk + 1) / chunks;
            T* dw = dweight ? partial_w.data() + chunk * GKCRS : nullptr;
            T* db = partial_b.data() + chunk * GK;
            std::fill(db, db + GK, T(0));
            for (int64_t n = n_begin; n < n_end; ++n) {
                const T* dout = doutput + n * GK * PQ;  // doutput_n (G*K x PQ)
                for (int64_t k = 0; k < GK; ++k) db[k] += sum_fixed_order(dout + k * PQ, PQ);
            }
            if (!dw) continue;
            std::fill(dw, dw + GKCRS, T(0));
            for (int64_t g = 0; g < G; ++g)
                for (int64_t n = n_begin; n < n_end; ++n)
                    (*add)(dw + g * KCRS, n * G + g, n + 1 == n_end);
        }
    });
    if (dweight)
        for (int64_t g = 0; g < G; ++g)
            add_partials(dweight + g * KCRS, partial_w.data() + g * KCRS, chunks, GKCRS, d.K, CRS,
                         transposed);
    if (dbias) add_partials(dbias, partial_b.data(), chunks, GK, 1, GK, false);
}

// The partial sums of sum_over_chunks, with `per_thread` values of each worker's buffers.
Buffers chunk_buffers(const Conv2dDims& d, int64_t per_thread, int64_t offsets) {
    const int64_t chunks = reduction_chunks(d.N / d.params.groups);
    return {chunks * d.params.groups * d.K * (d.C * d.R * d.S + 1), per_thread, chunks, offsets};
}

// doutput_n^T on the padded-width grid for the gather kernel: panel jp holds filters
// [jp*NR, jp*NR + NR) as (grid, NR), zero for filters past K and on the grid's margin.
template <typename T>
void pack_doutput_panels(T* panels_out, const T* dout, const Conv2dDims& d, const PaddedGrid& g,
                         int NR) {
    const int64_t PQ = d.P * d.Q, panels = (d.K + NR - 1) / NR;
    for (int64_t jp = 0; jp < panels; ++jp) {
        const int64_t n = std::min<int64_t>(NR, d.K - jp * NR);
        T* panel = panels_out + jp * g.grid * NR;
        const T* from_k = dout + jp * NR * PQ;
        for (int64_t op = 0; op < d.P; ++op) {
            T* row = panel + op * g.Ws * NR;
            // 16 pixels of each filter at a time: doutput rows lie PQ apart (often 4 KiB, one
            // cache set), so each line is read once, whole
            for (int64_t q0 = 0; q0 < d.Q; q0 += 16) {
                const int64_t count = std::min<int64_t>(16, d.Q - q0);
                for (int64_t jj = 0; jj < n; ++jj) {
                    const T* from = from_k + jj * PQ + op * d.Q + q0;
                    T* to = row + q0 * NR + jj;
                    for (int64_t t = 0; t < count; ++t) to[t * NR] = from[t];
                }
            }
            if (n < NR)
                for (int64_t oq = 0; oq < d.Q; ++oq)
                    std::fill(row + oq * NR + n, row + (oq + 1) * NR, T(0));
            std::fill(row + d.Q * NR, row + g.Ws * NR, T(0));  // grid margin
        }
    }
}

// Inverts `output_n = weight . col_n` for dweight and dbias with unit strides, without
// im2col, on the padded-width grid of forward_padded:
//   dweight^T[(c,r,s), k] = sum_n sum_o padded_n[tap(c,r,s) + o] * doutput_n[k, o]
// (o runs over grid pixels; the grid's margin columns carry a zero doutput). The image
// taps are read in place by the gather kernel; doutput_n^T is packed into NR-wide panels.
template <typename T>
void dweight_padded(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q;
    const auto& gk = detail::kernels_for_cpu<T>().gather_for(d.K);
    const PaddedGrid g = padded_grid(d, 1);
    const int64_t panels = (d.K + gk.NR - 1) / gk.NR;  // NR-wide panels of filters
    const int64_t block = gather_block(gk.NR);
    const std::vector<int64_t> tap_offset = tap_offsets(d, g.Hs, g.Ws);
    sum_over_chunks(dweight, dbias, doutput, d, /*transposed=*/true, [&] {
        detail::Scratch<T> padded(g.stack);  // polyphase stack + overrun, borders zero
        std::fill(padded.data(), padded.data() + g.stack, T(0));
        return [&, padded = std::move(padded),
                dout_panels = detail::Scratch<T>(panels * g.grid * gk.NR)](T* dwt, int64_t i,
                                                                           bool) mutable {
            copy_into_padded(padded.data(), input + i * d.C * d.H * d.W, d, g);
            pack_doutput_panels(dout_panels.data(), doutput + i * d.K * PQ, d, g, gk.NR);
            for (int64_t o0 = 0; o0 < g.grid; o0 += block) {
                const int64_t kb = std::min(block, g.grid - o0);
                for (int64_t jp = 0; jp < panels; ++jp) {
                    const int nk = int(std::min<int64_t>(gk.NR, d.K - jp * gk.NR));
                    const T* b = dout_panels.data() + (jp * g.grid + o0) * gk.NR;
                    for (int64_t i0 = 0; i0 < CRS; i0 += gk.MR)
                        gk.run(kb, padded.data() + o0, tap_offset.data() + i0, b,
                               dwt + i0 * d.K + jp * gk.NR, d.K, true,
                               int(std::min<int64_t>(gk.MR, CRS - i0)), nk);
                }
            }
        };
    });
}

template <typename T>
Buffers dweight_padded_buffers(const Conv2dDims& d) {
    const auto& gk = detail::kernels_for_cpu<T>().gather_for(d.K);
    const PaddedGrid g = padded_grid(d, 1);
    const int64_t panels = (d.K + gk.NR - 1) / gk.NR;
    return chunk_buffers(d, g.stack + panels * g.grid * gk.NR, d.C * d.R * d.S);
}

// Row stride of dweight_gemm_dot's pixel blocks: a whole chunk's pixels when they are fewer
// than kPixelBlock, padded to whole vectors.
int64_t pixel_block(const Conv2dDims& d) {
    const int64_t images = d.N / d.params.groups,
                  chunks = std::max<int64_t>(1, reduction_chunks(images));
    const int64_t chunk_pixels = std::max<int64_t>(1, (images + chunks - 1) / chunks) * d.P * d.Q;
    return std::min(kPixelBlock, round_up(chunk_pixels, kVectorPad));
}

// Inverts `output_n = weight . col_n` for dweight and dbias, any strides:
// dweight = sum_n doutput_n . col_n^T. Pixels of a chunk's images are gathered into blocks
// (doutput rows and im2col rows, side by side), and each block adds its
// doutput_block . col_block^T with the dot-product kernel: both run along the pixels.
template <typename T>
void dweight_gemm_dot(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d) {
    const int64_t CRS = d.C * d.R * d.S, PQ = d.P * d.Q, ld = pixel_block(d);
    const auto& dk = detail::kernels_for_cpu<T>().dot;
    sum_over_chunks(dweight, dbias, doutput, d, /*transposed=*/false, [&] {
        return [&, col = detail::Scratch<T>(CRS * ld),      // col_block (CRS x ld)
                dout_block = detail::Scratch<T>(d.K * ld),  // doutput_block (K x ld)
                filled = int64_t(0)](T* dw, int64_t i, bool last) mutable {
            auto flush = [&] {  // rows padded with zeros to whole vectors: no scalar tail
                const int64_t len = round_up(filled, kVectorPad);
                for (int64_t i = 0; i < CRS; ++i)
                    std::fill(col.data() + i * ld + filled, col.data() + i * ld + len, T(0));
                for (int64_t k = 0; k < d.K; ++k)
                    std::fill(dout_block.data() + k * ld + filled, dout_block.data() + k * ld + len,
                              T(0));
                detail::gemm_dot(dk, d.K, CRS, len, dout_block.data(), ld, col.data(), ld, dw, CRS);
                filled = 0;
            };
            const T* image = input + i * d.C * d.H * d.W;
            const T* dout = doutput + i * d.K * PQ;  // doutput_i (K x PQ)
            for (int64_t p0 = 0; p0 < PQ;) {
                const int64_t count = std::min(PQ - p0, ld - filled);
                im2col_block(image, d, p0, count, ld, col.data() + filled);
                for (int64_t k = 0; k < d.K; ++k)
                    std::copy(dout + k * PQ + p0, dout + k * PQ + p0 + count,
                              dout_block.data() + k * ld + filled);
                filled += count;
                p0 += count;
                if (filled == ld) flush();
            }
            if (last && filled) flush();
        };
    });
}

Buffers dweight_gemm_dot_buffers(const Conv2dDims& d) {
    return chunk_buffers(d, (d.C * d.R * d.S + d.K) * pixel_block(d), 0);
}

// ---- depthwise (one input channel per group) ------------------------------------------------
// View image i is one plane, and its K view filters (the channel multiplier) are filters
// f = (i % G) * K + k of the whole weight, each (R, S). Every kernel runs along rows: one
// tap of one row is a vectorizable pass (unit stride) over the output columns it reaches.

// The output columns [lo, hi) that tap column s reads inside the input, for every s.
std::vector<std::array<int64_t, 2>> tap_columns(const Conv2dDims& d) {
    const auto& p = d.params;
    std::vector<std::array<int64_t, 2>> columns(size_t(d.S));
    for (int64_t s = 0; s < d.S; ++s)
        valid_range(d.Q, d.W, p.stride_w, p.pad_w, s * p.dilation_w, columns[size_t(s)][0],
                    columns[size_t(s)][1]);
    return columns;
}

// out[q] += w * in[q * stride + col] for q in [lo, hi) (in[] read inside its row only).
template <typename T>
inline void add_tap(T* __restrict out, const T* __restrict in, T w, int64_t lo, int64_t hi,
                    int64_t stride, int64_t col) {
    if (lo >= hi) return;
    if (stride == 1) {
        const T* from = in + (lo + col);
        for (int64_t q = lo; q < hi; ++q) out[q] += w * from[q - lo];
    } else
        for (int64_t q = lo; q < hi; ++q) out[q] += w * in[q * stride + col];
}

// in[q * stride + col] += w * out[q] for q in [lo, hi): add_tap's scatter, for dinput.
template <typename T>
inline void scatter_tap(T* __restrict in, const T* __restrict out, T w, int64_t lo, int64_t hi,
                        int64_t stride, int64_t col) {
    if (lo >= hi) return;
    if (stride == 1) {
        T* to = in + (lo + col);
        for (int64_t q = lo; q < hi; ++q) to[q - lo] += w * out[q];
    } else
        for (int64_t q = lo; q < hi; ++q) in[q * stride + col] += w * out[q];
}

// lanes[l] += a[q] * b[q * stride + col] for q in [lo, hi), q - lo = l mod 8: a dot product
// in a fixed order that vectorizes.
template <typename T>
inline void dot_tap(T* __restrict lanes, const T* __restrict a, const T* __restrict b, int64_t lo,
                    int64_t hi, int64_t stride, int64_t col) {
    int64_t q = lo;
    if (stride == 1) {
        const T* from = b + col;
        for (; q + 8 <= hi; q += 8)
            for (int l = 0; l < 8; ++l) lanes[l] += a[q + l] * from[q + l];
    }
    for (int l = 0; q < hi; ++q, l = (l + 1) % 8) lanes[l] += a[q] * b[q * stride + col];
}

// output plane (i, k) = bias[f] + sum_{r,s} weight[f,r,s] * input plane i shifted by the tap,
// one output row at a time (it stays in L1 across the taps).
template <typename T>
void forward_depthwise(T* output, const T* input, const T* weight, const T* bias,
                       const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W, RS = d.R * d.S, GK = p.groups * d.K;
    const auto columns = tap_columns(d);
    detail::parallel_for(d.N * d.K, d.N * d.K * PQ * RS, [&](int64_t begin, int64_t end) {
        for (int64_t ik = begin; ik < end; ++ik) {
            const int64_t f = ik % GK;  // the filter: group (ik / K) % G, multiple ik % K
            const T* in = input + ik / d.K * HW;
            const T* w = weight + f * RS;
            for (int64_t op = 0; op < d.P; ++op) {
                T* out_row = output + ik * PQ + op * d.Q;
                std::fill(out_row, out_row + d.Q, bias ? bias[f] : T(0));
                for (int64_t r = 0; r < d.R; ++r) {
                    const int64_t ih = op * p.stride_h - p.pad_h + r * p.dilation_h;
                    if (ih < 0 || ih >= d.H) continue;
                    for (int64_t s = 0; s < d.S; ++s)
                        add_tap(out_row, in + ih * d.W, w[r * d.S + s], columns[size_t(s)][0],
                                columns[size_t(s)][1], p.stride_w, s * p.dilation_w - p.pad_w);
                }
            }
        }
    });
}

// dinput plane i = the sum over its K filters of doutput plane (i, k) scattered back
// through every tap (each input plane is one thread's).
template <typename T>
void dinput_depthwise(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W, RS = d.R * d.S, GK = p.groups * d.K;
    const auto columns = tap_columns(d);
    detail::parallel_for(d.N, d.N * d.K * PQ * RS, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            T* din = dinput + i * HW;
            std::fill(din, din + HW, T(0));
            for (int64_t k = 0; k < d.K; ++k) {
                const int64_t ik = i * d.K + k;
                const T* w = weight + ik % GK * RS;
                for (int64_t op = 0; op < d.P; ++op) {
                    const T* dout_row = doutput + ik * PQ + op * d.Q;
                    for (int64_t r = 0; r < d.R; ++r) {
                        const int64_t ih = op * p.stride_h - p.pad_h + r * p.dilation_h;
                        if (ih < 0 || ih >= d.H) continue;
                        for (int64_t s = 0; s < d.S; ++s)
                            scatter_tap(din + ih * d.W, dout_row, w[r * d.S + s],
                                        columns[size_t(s)][0], columns[size_t(s)][1], p.stride_w,
                                        s * p.dilation_w - p.pad_w);
                    }
                }
            }
        }
    });
}

// dweight[f, r, s] = sum over the images n of sum_{p,q} doutput plane (n*G + g, k) times
// input plane n*G + g shifted by the tap, and dbias[f] the sum of those doutput planes;
// each filter f = g*K + k is one thread's, summed in a fixed order.
template <typename T>
void dweight_depthwise(T* dweight, T* dbias, const T* doutput, const T* input,
                       const Conv2dDims& d) {
    const auto& p = d.params;
    const int64_t PQ = d.P * d.Q, HW = d.H * d.W, RS = d.R * d.S, G = p.groups;
    const int64_t images = d.N / G;
    const auto columns = tap_columns(d);
    detail::parallel_for(G * d.K, d.N * d.K * PQ * RS, [&](int64_t begin, int64_t end) {
        std::vector<T> lanes(size_t(RS * 8));  // 8 partial sums of every tap
        for (int64_t f = begin; f < end; ++f) {
            const int64_t g = f / d.K, k = f % d.K;
            std::fill(lanes.begin(), lanes.end(), T(0));
            T bias_sum = 0;
            for (int64_t n = 0; n < images; ++n) {
                const int64_t i = n * G + g;
                const T* in = input + i * HW;
                const T* dout = doutput + (i * d.K + k) * PQ;
                if (dbias) bias_sum += sum_fixed_order(dout, PQ);
                if (!dweight) continue;
                for (int64_t op = 0; op < d.P; ++op)
                    for (int64_t r = 0; r < d.R; ++r) {
                        const int64_t ih = op * p.stride_h - p.pad_h + r * p.dilation_h;
                        if (ih < 0 || ih >= d.H) continue;
                        for (int64_t s = 0; s < d.S; ++s)
                            dot_tap(lanes.data() + (r * d.S + s) * 8, dout + op * d.Q,
                                    in + ih * d.W, columns[size_t(s)][0], columns[size_t(s)][1],
                                    p.stride_w, s * p.dilation_w - p.pad_w);
                    }
            }
            if (dbias) dbias[f] = bias_sum;
            if (dweight)
                for (int64_t t = 0; t < RS; ++t) {
                    const T* l = lanes.data() + t * 8;
                    dweight[f * RS + t] =
                        ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
                }
        }
    });
}

// ---- the plan ------------------------------------------------------------------------------

// One path: the function that runs it and the sizes of its scratch memory for given dims.
template <typename Run>
struct Path {
    Run* run;
    Buffers (*buffers)(const Conv2dDims& d);
};

// The paths of one convolution: forward, dinput, and dweight with dbias.
template <typename T>
struct Conv2dPlan {
    Path<void(T* output, const T* input, const T* weight, const T* bias, const Conv2dDims& d)>
        forward;
    Path<void(T* dinput, const T* doutput, const T* weight, const Conv2dDims& d)> dinput;
    Path<void(T* dweight, T* dbias, const T* doutput, const T* input, const Conv2dDims& d)> dweight;
};

// Whether a strided convolution takes the padded paths on its polyphase stack: when every
// phase holds taps (the dilated kernel spans the stride), else most of the stack's copy is
// never read (a 1x1 filter with stride 2 is faster on im2col, measured).
bool strided_padded(const Conv2dDims& d) {
    return extent_h(d) >= d.params.stride_h && extent_w(d) >= d.params.stride_w;
}

// The one place that chooses the paths, by the (group view) dims alone (the thread count
// changes only how many threads' buffers are allocated, Buffers::bytes).
template <typename T>
Conv2dPlan<T> make_plan(const Conv2dDims& d) {
    using Plan = Conv2dPlan<T>;
    const auto& p = d.params;
    const bool unit = p.stride_h == 1 && p.stride_w == 1;
    // dinput as a forward needs padding below the dilated kernel's extent
    const bool dinput_as_forward_fits = std::max(p.pad_h, d.pad_bottom) < extent_h(d) &&
                                        std::max(p.pad_w, d.pad_right) < extent_w(d);
    if (p.groups > 1 && d.C == 1) {  // depthwise
        // With unit strides the tap kernel runs along the padded plane's grid, faster than the
        // row passes (measured on (32, 64, 56, 56), 3x3); dweight's dot products are not a
        // GEMM at all.
        if (unit)
            return {{forward_padded<T>, forward_padded_buffers<T>},
                    dinput_as_forward_fits
                        ? decltype(Plan::dinput){dinput_as_forward<T>, dinput_as_forward_buffers<T>}
                        : decltype(Plan::dinput){dinput_depthwise<T>, no_buffers},
                    {dweight_depthwise<T>, no_buffers}};
        return {{forward_depthwise<T>, no_buffers},
                {dinput_depthwise<T>, no_buffers},
                {dweight_depthwise<T>, no_buffers}};
    }
    if (d.K * d.P * d.Q * d.C * d.R * d.S < kMinGemmWork)  // tiny: direct loops
        return {{forward_direct<T>, no_buffers},
                {dinput_direct<T>, no_buffers},
                {dweight_direct<T>, no_buffers}};
    Plan plan;
    const bool padded = unit || strided_padded(d);
    plan.forward = padded ? decltype(Plan::forward){forward_padded<T>, forward_padded_buffers<T>}
                          : decltype(Plan::forward){forward_gemm<T>, forward_gemm_buffers<T>};
    // dinput as a forward reads doutput in place instead of adding C*R*S rows back through
    // col2im: faster for every channel count measured (1 to 64); with strides, each
    // polyphase component of dinput is such a forward of doutput with its own taps.
    plan.dinput =
        unit && dinput_as_forward_fits
            ? decltype(Plan::dinput){dinput_as_forward<T>, dinput_as_forward_buffers<T>}
        // a few input channels leave the tap kernel's rows mostly empty: (64, 3, 56, 56)
        // with 7x7 filters, stride 2, is faster through col2im (measured)
        : !unit && padded && d.C >= 4
            ? decltype(Plan::dinput){dinput_polyphase<T>, dinput_polyphase_buffers<T>}
            : decltype(Plan::dinput){dinput_gemm_col2im<T>, dinput_gemm_col2im_buffers<T>};
    // dweight in place: below the narrowest gather panel of filters the dot-product path is
    // faster (measured), and it serves the strided convolutions off the polyphase stack.
    plan.dweight = padded && d.K > detail::kernels_for_cpu<T>().gather[3].NR
                       ? decltype(Plan::dweight){dweight_padded<T>, dweight_padded_buffers<T>}
                       : decltype(Plan::dweight){dweight_gemm_dot<T>, dweight_gemm_dot_buffers};
    return plan;
}

}  // namespace

template <typename T>
void conv2d_forward(T* output, const T* input, const T* weight, const T* bias,
                    const Conv2dDims& d) {
    conv2d_forward(output, input, weight, bias, d, Conv2dEpilogue<T>{});
}

template <typename T>
void conv2d_forward(T* output, const T* input, const T* weight, const T* bias, const Conv2dDims& d,
                    const Conv2dEpilogue<T>& then) {
    if (d.N == 0) return;  // an empty batch: an empty output
    const Conv2dDims v = group_view(d);
    const auto run = make_plan<T>(v).forward.run;
    if (run == forward_padded<T>) return forward_padded_then(output, input, weight, bias, v, &then);
    run(output, input, weight, bias, v);
    if (then.center || then.relu) epilogue_pass(output, v, then);
}

template <typename T>
void conv2d_backward(T* dinput, T* dweight, T* dbias, const T* doutput, const T* input,
                     const T* weight, const Conv2dDims& d) {
    if (d.N == 0) {  // an empty batch: no input gradient, zero parameter gradients
        if (dweight) std::fill(dweight, dweight + d.K * (d.C / d.params.groups) * d.R * d.S, T(0));
        if (dbias) std::fill(dbias, dbias + d.K, T(0));
        return;
    }
    const Conv2dDims v = group_view(d);
    const Conv2dPlan<T> plan = make_plan<T>(v);
    if (dinput) plan.dinput.run(dinput, doutput, weight, v);
    if (dweight || dbias) plan.dweight.run(dweight, dbias, doutput, input, v);
}

template <typename T>
int64_t conv2d_workspace_bytes(const Conv2dDims& d, int64_t threads) {
    const Conv2dDims v = group_view(d);
    const Conv2dPlan<T> plan = make_plan<T>(v);
    return std::max({plan.forward.buffers(v).template bytes<T>(threads),
                     plan.dinput.buffers(v).template bytes<T>(threads),
                     plan.dweight.buffers(v).template bytes<T>(threads)});
}

namespace detail {

std::array<const char*, 3> conv2d_path_names(const Conv2dDims& d) {
    const Conv2dDims v = group_view(d);
    const Conv2dPlan<float> plan = make_plan<float>(v);
    using F = float;
    const auto& f = plan.forward.run;
    const auto& i = plan.dinput.run;
    const auto& w = plan.dweight.run;
    return {f == forward_direct<F>      ? "forward_direct"
            : f == forward_padded<F>    ? "forward_padded"
            : f == forward_gemm<F>      ? "forward_gemm"
            : f == forward_depthwise<F> ? "forward_depthwise"
                                        : "?",
            i == dinput_direct<F>        ? "dinput_direct"
            : i == dinput_as_forward<F>  ? "dinput_as_forward"
            : i == dinput_polyphase<F>   ? "dinput_polyphase"
            : i == dinput_gemm_col2im<F> ? "dinput_gemm_col2im"
            : i == dinput_depthwise<F>   ? "dinput_depthwise"
                                         : "?",
            w == dweight_direct<F>      ? "dweight_direct"
            : w == dweight_padded<F>    ? "dweight_padded"
            : w == dweight_gemm_dot<F>  ? "dweight_gemm_dot"
            : w == dweight_depthwise<F> ? "dweight_depthwise"
                                        : "?"};
}

int64_t conv2d_images_side_by_side(const Conv2dDims& d) {
    const Conv2dDims v = group_view(d);
    const auto& kernels = kernels_for_cpu<float>();
    return wide_stack(v, kernels.tap_for(v.K).NR, kernels.tap_tail_for(v.K).NR).images;
}

}  // namespace detail

#define CNNBP_INSTANTIATE(T)                                                              \
    template void conv2d_forward<T>(T*, const T*, const T*, const T*, const Conv2dDims&); \
    template void conv2d_forward<T>(T*, const T*, const T*, const T*, const Conv2dDims&,  \
                                    const Conv2dEpilogue<T>&);                            \
    template int64_t conv2d_workspace_bytes<T>(const Conv2dDims&, int64_t);               \
    template void conv2d_backward<T>(T*, T*, T*, const T*, const T*, const T*, const Conv2dDims&);
CNNBP_INSTANTIATE(float)
CNNBP_INSTANTIATE(double)

}  // namespace cnnbp
