// The kernels' thread pool (see parallel.hpp): the calling thread runs part 0 of a job and
// the pool's threads the others.
//
// Waiting. A pool thread waits for its next part spinning while a cnnbp call is under way (a
// Busy guard is alive: layers, losses and optimizers hold one per call), so the many short
// loops of one training step do not each pay a sleeping thread's wake-up, 20-40 us on a
// virtual machine. Outside calls, and after kSpinLimit without work, it sleeps.
//
// Contention. A spinning thread that other processes keep from its core is the worst case:
// it burns its share of the core, and the scheduler then runs it late, after threads that
// slept. So when a spinning thread starts its part late (kLateStart: it was not running),
// the pool stops spinning for a while (kCalmPeriod, doubling while it keeps happening, up to
// kMaxCalmPeriod) and its threads and callers sleep while they wait, as with
// OMP_WAIT_POLICY=PASSIVE. OMP_WAIT_POLICY=ACTIVE keeps the threads spinning always.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define CNNBP_HAVE_ATFORK 1
#endif
#if defined(_MSC_VER)
#include <intrin.h>
#endif

namespace cnnbp::detail {

namespace {

inline void cpu_relax() {
#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
    _mm_pause();
#elif defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

using Clock = std::chrono::steady_clock;
using Nanoseconds = std::chrono::nanoseconds;
// The longest a thread spins for its next part, or a caller for the parts of its job, before
// it sleeps: between one loop and the next of a call there are microseconds.
constexpr Nanoseconds kSpinLimit = std::chrono::microseconds(200);
// A spinning thread that starts its part later than this after it was posted, or sees its
// clock jump by as much, was not running. An idle virtual machine showed such gaps about once
// a second (50-250 us, the host's or the system's own work), a machine with one other busy
// process only a few times a second more: a calm period long enough to cover the gaps
// between them keeps a shared machine's steps as fast as with sleeping threads (measured),
// and costs an idle one a tenth of its spinning at most.
constexpr Nanoseconds kLateStart = std::chrono::microseconds(50);
constexpr Nanoseconds kCalmPeriod = std::chrono::milliseconds(100);
constexpr Nanoseconds kMaxCalmPeriod = std::chrono::seconds(2);

int64_t now_ns() {
    return std::chrono::duration_cast<Nanoseconds>(Clock::now().time_since_epoch()).count();
}

// Spins until done() or `limit` has passed; whether done(). *preempted is set when the
// thread lost its core meanwhile (kLateStart between two looks at the clock).
template <typename Done>
bool spin_for(const Done& done, Nanoseconds limit, bool* preempted) {
    if (done()) return true;
    int64_t last = now_ns();
    const int64_t deadline = last + limit.count();
    for (int spins = 1;; ++spins) {
        cpu_relax();
        if (done()) return true;
        if (spins % 64 == 0) {
            const int64_t now = now_ns();
            if (now - last > kLateStart.count()) *preempted = true;
            if (now > deadline) return false;
            last = now;
        }
    }
}

bool always_spin() {
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    if (!policy) return false;
    std::string value(policy);
    for (auto& c : value) c = char(std::toupper(static_cast<unsigned char>(c)));
    return value == "ACTIVE";
}

// Where threads sleep until a condition holds, and the thread that makes it hold wakes them.
class Waker {
 public:
    // Sleeps until done() (checked under the lock, so a wake() after it cannot be missed).
    template <typename Done>
    void sleep_until(const Done& done) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleepers_.fetch_add(1);
        // wait_for, not wait: libstdc++ 12's condition_variable::wait is a symbol of
        // GLIBCXX_3.4.30, which would raise the wheel's manylinux tag; the timeout only makes
        // it check again
        while (!done()) wake_.wait_for(lock, std::chrono::seconds(10));
        sleepers_.fetch_sub(1);
    }
    // After making the condition hold (a sequentially consistent store): wakes the threads
    // that sleep or are about to; a system call only when there are any.
    void wake() {
        if (sleepers_.load() == 0) return;
        // taking the lock orders this after a sleeper's check, or before it; the notification
        // goes out after it, so that the woken thread does not block on the lock again
        {
            std::lock_guard<std::mutex> lock(mutex_);
        }
        wake_.notify_all();
    }

 private:
    std::atomic<int64_t> sleepers_{0};
    std::mutex mutex_;
    std::condition_variable wake_;
};

class Pool {
 public:
    Pool() : always_spin_(always_spin()) {}

    bool run(int64_t threads, PartFn fn, void* context) {
        std::unique_lock<std::mutex> running(run_mutex_, std::try_to_lock);
        if (!running.owns_lock()) return false;  // another caller's job: the part runs alone
        try {
            while (int64_t(workers_.size()) < threads - 1) add_worker();
        } catch (...) {  // no thread to be had (std::system_error): the caller runs it all
            return false;
        }
        job_ = {fn, context, threads, now_ns()};
        used_.store(true);
        pending_.store(threads - 1);
        barrier_arrived_.store(0);
        ++generation_;
        for (int64_t w = 0; w < threads - 1; ++w) workers_[size_t(w)]->post(generation_);
        in_part = true;
        fn(context, 0, threads);
        auto done = [&] { return pending_.load() == 0; };
        if (!spin(done)) caller_.sleep_until(done);
        in_part = false;
        return true;
    }

    // Every part of the running job waits here until all have arrived.
    void barrier(int64_t threads) {
        const uint64_t round = barrier_round_.load();
        if (barrier_arrived_.fetch_add(1) + 1 == threads) {
            barrier_arrived_.store(0);
            barrier_round_.fetch_add(1);
            barrier_waker_.wake();
            return;
        }
        auto done = [&] { return barrier_round_.load() != round; };
        if (!spin(done)) barrier_waker_.sleep_until(done);
    }

    // The first call under way wakes the threads ahead of its first loop, when the last
    // call ran loops on the pool (a call too small for threads leaves them asleep).
    void busy_begin() {
        if (busy_.fetch_add(1) == 0 && used_.exchange(false) && spinning()) {
            std::lock_guard<std::mutex> lock(workers_mutex_);
            for (auto& worker : workers_) worker->nudge();
        }
    }
    void busy_end() { busy_.fetch_sub(1); }
    bool busy() const { return busy_.load() > 0; }

    // Whether waiting threads spin: always with OMP_WAIT_POLICY=ACTIVE, else while a call
    // runs and no contention was seen lately.
    bool spinning() const {
        return always_spin_ || (busy_.load() > 0 && now_ns() >= calm_until_.load());
    }

 private:
    struct Job {
        PartFn fn = nullptr;
        void* context = nullptr;
        int64_t threads = 0;
        int64_t posted_ns = 0;  // when the caller posted it
    };

    // Spins until done() while waiting threads spin (up to kSpinLimit); whether done().
    template <typename Done>
    bool spin(const Done& done) {
        if (always_spin_) {
            while (!done()) cpu_relax();
            return true;
        }
        if (!spinning()) return done();
        bool preempted = false;
        const bool finished = spin_for(done, kSpinLimit, &preempted);
        if (preempted) contended();
        return finished;
    }

    // A spinning thread lost its core, or started its part late: stop spinning for a while.
    void contended() {
        const int64_t now = now_ns();
        // the period doubles when the last one ended less than a period ago
        int64_t period = calm_period_.load();
        period = now < calm_until_.load() + period ? std::min(2 * period, kMaxCalmPeriod.count())
                                                   : kCalmPeriod.count();
        calm_period_.store(period);
        calm_until_.store(now + period);
    }

    // One pool thread: waits for its slot's generation to change, runs part `index` of the
    // job, counts itself done.
    class Worker {
     public:
        Worker(Pool& pool, int64_t index) : pool_(pool), index_(index) {}

        void post(uint64_t generation) {
            posted_.store(generation);
            waker_.wake();
        }
        void nudge() {
            nudged_.store(true);
            waker_.wake();
        }

        void loop() {
            in_part = true;  // a loop inside a part runs on its thread alone
            uint64_t seen = 0;
            for (;;) {
                int64_t spin_start_ns = 0;
                const bool was_spinning = wait_past(seen, spin_start_ns);
                seen = posted_.load();
                const Job job = pool_.job_;
                if (was_spinning && !pool_.always_spin_ &&
                    now_ns() - std::max(job.posted_ns, spin_start_ns) > kLateStart.count())
                    pool_.contended();
                job.fn(job.context, index_, job.threads);
                if (pool_.pending_.fetch_sub(1) == 1) pool_.caller_.wake();
            }
        }

     private:
        bool has_work(uint64_t seen) const { return posted_.load() != seen; }
        // Returns when a part past `seen` is posted: whether it was found spinning, and
        // since when (spin_start_ns).
        bool wait_past(uint64_t seen, int64_t& spin_start_ns) {
            auto work = [&] { return has_work(seen); };
            for (;;) {
                spin_start_ns = now_ns();
                // spinning ends with the call (busy_ back to 0), not only at kSpinLimit
                if (pool_.spinning() &&
                    pool_.spin([&] { return work() || (!pool_.always_spin_ && !pool_.busy()); }) &&
                    work())
                    return true;
                if (work()) return true;
                waker_.sleep_until([&] { return work() || nudged_.load(); });
                if (work()) return false;
                nudged_.store(false);  // woken ahead of a call: spin while it runs
            }
        }

        Pool& pool_;
        const int64_t index_;
        alignas(64) std::atomic<uint64_t> posted_{0};
        std::atomic<bool> nudged_{false};
        Waker waker_;
    };

    void add_worker() {
        auto worker = std::make_shared<Worker>(*this, int64_t(workers_.size()) + 1);
        std::thread([worker] { worker->loop(); }).detach();
        std::lock_guard<std::mutex> lock(workers_mutex_);
        workers_.push_back(std::move(worker));
    }

    const bool always_spin_;
    std::mutex run_mutex_;      // one caller's job at a time
    std::mutex workers_mutex_;  // workers_ grows under run_mutex_; busy_begin reads it
    std::vector<std::shared_ptr<Worker>> workers_;
    Job job_;
    uint64_t generation_ = 0;
    Waker caller_;                                    // the caller waiting for the job's parts
    Waker barrier_waker_;                             // parts waiting at a barrier
    alignas(64) std::atomic<int64_t> pending_{0};     // parts not yet done, but the caller's
    alignas(64) std::atomic<int64_t> busy_{0};        // cnnbp calls running (Busy guards)
    std::atomic<bool> used_{false};                   // a job ran since the last call began
    alignas(64) std::atomic<int64_t> calm_until_{0};  // no spinning before (now_ns)
    std::atomic<int64_t> calm_period_{kCalmPeriod.count()};
    alignas(64) std::atomic<int64_t> barrier_arrived_{0};
    alignas(64) std::atomic<uint64_t> barrier_round_{0};

 public:
    static thread_local bool in_part;  // this thread runs a part of a job
};

thread_local bool Pool::in_part = false;

// The process's pool, made at first use and never destroyed (its threads outlive main's
// return); a child of fork() has none of its parent's threads, so it starts a pool of its own.
std::atomic<Pool*> the_pool{nullptr};
std::once_flag pool_once;

Pool& pool() {
    std::call_once(pool_once, [] {
        the_pool.store(new Pool);
#if defined(CNNBP_HAVE_ATFORK)
        pthread_atfork(nullptr, nullptr, [] { the_pool.store(new Pool); });
#endif
    });
    return *the_pool.load();
}

}  // namespace

bool run_parts(int64_t threads, PartFn fn, void* context) {
    if (threads < 2 || Pool::in_part) return false;
    return pool().run(threads, fn, context);
}

void parts_barrier(int64_t threads) {
    if (threads > 1) pool().barrier(threads);
}

// Busy guards alive on this thread: only the outermost one counts in the pool, so that a
// container's children, each holding one, cost no shared atomic.
thread_local int64_t busy_depth = 0;

Busy::Busy() noexcept {
    if (busy_depth++ > 0) return;
    try {
        pool().busy_begin();
        active_ = true;
    } catch (...) {  // a pool that cannot be made: nothing to keep awake
    }
}

Busy::~Busy() {
    --busy_depth;
    if (active_) pool().busy_end();
}

}  // namespace cnnbp::detail
