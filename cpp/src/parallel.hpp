// Internal: parallel loops over the kernels' thread pool (thread_pool.cpp), plain loops
// when OpenMP's thread count (set_num_threads, OMP_NUM_THREADS) is 1 or cnnbp is built
// without OpenMP. Work below kMinParallelWork multiply-adds stays on the calling thread: for
// tiny layers, waking a thread costs more than the work. Every parallel loop gives each
// output element to exactly one thread, so results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#include "cnnbp/threads.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cnnbp::detail {

constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// Part `thread` of `threads` of a job, run by run_parts on the pool's threads.
using PartFn = void (*)(void* context, int64_t thread, int64_t threads);
// fn(context, t, threads) for t in [0, threads), part 0 on the calling thread and the others
// on the pool's, returning when all are done; false, having run nothing, when the parts
// cannot be shared (threads < 2, called from inside a part, the pool busy with another
// caller's job, no thread to be had): the caller then runs the work alone.
bool run_parts(int64_t threads, PartFn fn, void* context);
// Inside a job's parts: waits until all `threads` parts have arrived.
void parts_barrier(int64_t threads);

// The number of threads a parallel loop uses (1 without OpenMP).
inline int64_t max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// body(begin, end) over [0, count) split into one contiguous chunk per thread (as
// schedule(static)) when `parallel` (parallel_for: when work >= kMinParallelWork), else
// body(0, count) on the calling thread.
template <typename Body>
inline void parallel_for_if(bool parallel, int64_t count, const Body& body) {
    const int64_t threads = parallel && count > 1 ? std::min(max_threads(), count) : 1;
    if (threads > 1) {
        // An exception must not escape a part (a pool thread has no caller to take it): the
        // first one thrown (std::bad_alloc of a workspace) is rethrown here.
        struct Context {
            Context(const Body& b, int64_t n) : body(b), count(n) {}
            const Body& body;
            const int64_t count;
            std::atomic<bool> failed{false};
            std::exception_ptr error;
        } context(body, count);
        const PartFn part = [](void* opaque, int64_t t, int64_t n) {
            auto& c = *static_cast<Context*>(opaque);
            const int64_t begin = c.count * t / n, end = c.count * (t + 1) / n;
            try {
                if (begin < end) c.body(begin, end);
            } catch (...) {
                if (!c.failed.exchange(true)) c.error = std::current_exception();
            }
        };
        if (run_parts(threads, part, &context)) {
            if (context.error) std::rethrow_exception(context.error);
            return;
        }
    }
    if (count > 0) body(int64_t(0), count);
}

template <typename Body>
inline void parallel_for(int64_t count, int64_t work, const Body& body) {
    parallel_for_if(work >= kMinParallelWork, count, body);
}

// Items [0, count) handed out `grain` at a time to whichever thread of a parallel_team asks
// first (take(body) calls body(begin, end) until none are left): on a shared machine a
// thread that wakes late or is preempted takes fewer, instead of holding up the others. Which
// thread computes an item must never change how it is computed.
class WorkQueue {
 public:
    WorkQueue(int64_t count, int64_t grain) : count_(count), grain_(std::max<int64_t>(grain, 1)) {}

    template <typename Body>
    void take(const Body& body) {
        for (;;) {
            const int64_t begin = next_.fetch_add(grain_, std::memory_order_relaxed);
            if (begin >= count_) return;
            body(begin, std::min(begin + grain_, count_));
        }
    }

 private:
    std::atomic<int64_t> next_{0};
    const int64_t count_, grain_;
};

// The grain of a WorkQueue of `count` items of `item_work` multiply-adds each: takes of
// about kMinParallelWork * 4 multiply-adds (a few microseconds, so the queue's atomic is
// rare), and at least 4 takes per thread to balance.
inline int64_t queue_grain(int64_t count, int64_t item_work, int64_t threads) {
    const int64_t by_work =
        (kMinParallelWork * 4 + item_work - 1) / std::max<int64_t>(item_work, 1);
    return std::max<int64_t>(1, std::min(by_work, count / (4 * threads)));
}

// One thread of a parallel_team: barrier() waits for every thread of the team.
struct Team {
    int64_t thread, threads;

    void barrier() const { parts_barrier(threads); }
};

// body(team) on every thread of one job when `parallel` (else on the calling thread alone, a
// team of one): several steps separated by team.barrier() for the price of one wake-up of
// the threads. body must not throw -- a thread that left early would leave the others at
// the barrier -- so its memory is allocated before the team starts.
template <typename Body>
inline void parallel_team(bool parallel, const Body& body) noexcept {
    const int64_t threads = parallel ? max_threads() : 1;
    const PartFn part = [](void* opaque, int64_t t, int64_t n) {
        (*static_cast<const Body*>(opaque))(Team{t, n});
    };
    if (threads > 1 && run_parts(threads, part, const_cast<Body*>(&body))) return;
    body(Team{0, 1});
}

// Range of output positions o in [0, out_count) whose input position
// o * stride - pad + offset lies inside [0, in_size): returns [lo, hi) (empty if lo >= hi).
inline void valid_range(int64_t out_count, int64_t in_size, int64_t stride, int64_t pad,
                        int64_t offset, int64_t& lo, int64_t& hi) {
    const int64_t first = pad - offset;               // o * stride >= first
    lo = first <= 0 ? 0 : (first - 1) / stride + 1;   // ceil, no overflow for any stride
    const int64_t last = in_size - 1 + pad - offset;  // o * stride <= last
    hi = last < 0 ? 0 : last / stride + 1;
    if (hi > out_count) hi = out_count;
    if (lo > hi) lo = hi;
}

}  // namespace cnnbp::detail
