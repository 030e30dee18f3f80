// A minimal test harness: TEST_CASE registers a function, CHECK_* record failures.
#pragma once

#include <cmath>
#include <functional>
#include <iostream>
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
            fail(file, line, "element " + std::to_string(i) + ": got " + std::to_string(g) +
                                 ", expected " + std::to_string(e));
            return;
        }
    }
}

}  // namespace cnnbp_test

#define CNNBP_CAT2(a, b) a##b
#define CNNBP_CAT(a, b) CNNBP_CAT2(a, b)
#define TEST_CASE(name)                                                                   \
    static void CNNBP_CAT(test_, __LINE__)();                                            \
    static cnnbp_test::Register CNNBP_CAT(register_, __LINE__)(name, CNNBP_CAT(test_, __LINE__)); \
    static void CNNBP_CAT(test_, __LINE__)()

#define CHECK(cond) \
    do { if (!(cond)) cnnbp_test::fail(__FILE__, __LINE__, "CHECK(" #cond ") failed"); } while (0)
#define CHECK_CLOSE(got, expected, atol, rtol) \
    cnnbp_test::check_close(__FILE__, __LINE__, got, expected, atol, rtol)
// The statement must throw std::invalid_argument whose message contains `fragment`.
#define CHECK_THROWS(statement, fragment)                                                   \
    do {                                                                                    \
        bool thrown = false;                                                                \
        try { statement; } catch (const std::invalid_argument& e) {                         \
            thrown = true;                                                                  \
            if (std::string(e.what()).find(fragment) == std::string::npos)                  \
                cnnbp_test::fail(__FILE__, __LINE__, std::string("message '") + e.what() +  \
                                 "' lacks '" + fragment + "'");                             \
        }                                                                                   \
        if (!thrown) cnnbp_test::fail(__FILE__, __LINE__, "expected std::invalid_argument"); \
    } while (0)
