// A minimal test harness: TEST_CASE registers a function, CHECK_* record failures.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace cnnbp_test {

struct Case {
    std::string name;
    std::function<void()> body;
};
std::vector<Case>& registry();
int& failures();

struct Register {
    Register(const char* name, std::function<void()> body) { registry().push_back({name, body}); }
};

inline void fail(const char* file, int line, const std::string& what) {
    ++failures();
    std::cerr << file << ":" << line << ": " << what << "\n";
}

// |got - expected| <= atol + rtol * |expected| elementwise
template <typename T>
void check_close(const char* file, int line, const T* got, const std::vector<double>& expected,
                 double atol, double rtol) {
    for (size_t i = 0; i < expected.size(); ++i) {
        const double g = double(got[i]), e = expected[i];
        if (!(std::abs(g - e) <= atol + rtol * std::abs(e))) {
            fail(file, line,
                 "element " + std::to_string(i) + ": got " + std::to_string(g) + ", expected " +
                     std::to_string(e));
            return;
        }
    }
}

// An output buffer of `count` elements between two guard regions of `guard` elements,
// every byte of which holds a pattern. A kernel that writes outside [data(), data() + count)
// changes a guard (guards_intact() turns false); the interior starts as the same pattern,
// so an element a kernel forgot to write keeps it (all_written() turns false).
template <typename T>
class Guarded {
 public:
    static constexpr unsigned char kPattern = 0xA5;

    explicit Guarded(size_t count, size_t guard = 64)
        : storage_(count + 2 * guard), count_(count), guard_(guard) {
        std::memset(static_cast<void*>(storage_.data()), kPattern, storage_.size() * sizeof(T));
    }
    T* data() { return storage_.data() + guard_; }
    const T* data() const { return storage_.data() + guard_; }
    size_t size() const { return count_; }
    T operator[](size_t i) const { return data()[i]; }

    bool guards_intact() const {
        return untouched(storage_.data(), guard_) && untouched(data() + count_, guard_);
    }
    bool all_written() const {
        for (size_t i = 0; i < count_; ++i)
            if (untouched(data() + i, 1)) return false;
        return true;
    }

 private:
    static bool untouched(const T* p, size_t n) {
        const auto* bytes = reinterpret_cast<const unsigned char*>(p);
        for (size_t i = 0; i < n * sizeof(T); ++i)
            if (bytes[i] != kPattern) return false;
        return true;
    }
    std::vector<T> storage_;
    size_t count_, guard_;
};

// `count` values drawn uniformly from [-scale, scale], reproducible from `seed`.
template <typename T = double>
std::vector<T> random_values(size_t count, unsigned seed, double scale = 1.0) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> dist(-1.0, 1.0);
    std::vector<T> v(count);
    for (auto& x : v) x = T(scale * dist(gen));
    return v;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
}

}  // namespace cnnbp_test

#define CNNBP_CAT2(a, b) a##b
#define CNNBP_CAT(a, b) CNNBP_CAT2(a, b)
#define TEST_CASE(name)                                                                           \
    static void CNNBP_CAT(test_, __LINE__)();                                                     \
    static cnnbp_test::Register CNNBP_CAT(register_, __LINE__)(name, CNNBP_CAT(test_, __LINE__)); \
    static void CNNBP_CAT(test_, __LINE__)()

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) cnnbp_test::fail(__FILE__, __LINE__, "CHECK(" #cond ") failed"); \
    } while (0)
#define CHECK_CLOSE(got, expected, atol, rtol) \
    cnnbp_test::check_close(__FILE__, __LINE__, got, expected, atol, rtol)
// The kernel wrote nothing outside the guarded output buffer and every element inside it.
#define CHECK_GUARDED(buffer)                                                              \
    do {                                                                                   \
        if (!(buffer).guards_intact())                                                     \
            cnnbp_test::fail(__FILE__, __LINE__, "write outside the output " #buffer);     \
        if (!(buffer).all_written())                                                       \
            cnnbp_test::fail(__FILE__, __LINE__, "an element of " #buffer " not written"); \
    } while (0)
// The statement must throw std::invalid_argument whose message contains `fragment`.
#define CHECK_THROWS(statement, fragment)                                                    \
    do {                                                                                     \
        bool thrown = false;                                                                 \
        try {                                                                                \
            statement;                                                                       \
        } catch (const std::invalid_argument& e) {                                           \
            thrown = true;                                                                   \
            if (std::string(e.what()).find(fragment) == std::string::npos)                   \
                cnnbp_test::fail(                                                            \
                    __FILE__, __LINE__,                                                      \
                    std::string("message '") + e.what() + "' lacks '" + fragment + "'");     \
        }                                                                                    \
        if (!thrown) cnnbp_test::fail(__FILE__, __LINE__, "expected std::invalid_argument"); \
    } while (0)
