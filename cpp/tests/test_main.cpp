// Runs every registered case whose name starts with argv[1] (all cases without argument).
#include "check.hpp"

namespace cnnbp_test {
std::vector<Case>& registry() {
    static std::vector<Case> cases;
    return cases;
}
int& failures() {
    static int count = 0;
    return count;
}
}  // namespace cnnbp_test

int main(int argc, char** argv) {
    const std::string prefix = argc > 1 ? argv[1] : "";
    int ran = 0;
    for (const auto& c : cnnbp_test::registry()) {
        if (c.name.rfind(prefix, 0) != 0) continue;
        const int before = cnnbp_test::failures();
        try {
            c.body();
        } catch (const std::exception& e) {
            cnnbp_test::fail(__FILE__, __LINE__, c.name + " threw: " + e.what());
        }
        std::cout << (cnnbp_test::failures() == before ? "ok   " : "FAIL ") << c.name << "\n";
        ++ran;
    }
    if (ran == 0) {
        std::cerr << "no test case matches '" << prefix << "'\n";
        return 1;
    }
    std::cout << ran << " cases, " << cnnbp_test::failures() << " failures\n";
    return cnnbp_test::failures() == 0 ? 0 : 1;
}
