// The test runner.
//   cnnbp_tests               every registered case
//   cnnbp_tests PREFIX        the cases whose name starts with PREFIX
//   cnnbp_tests --exact NAME  the one case called NAME (what each ctest entry runs)
//   cnnbp_tests --list        every case's name, one a line (what ctest registers)
// Names must be unique, non-empty and printable (no newline or other control character,
// so that --list is one name a line): a registry that breaks this is refused in every mode,
// so no case can hide behind another.
#include <algorithm>
#include <set>

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

namespace {

bool names_are_usable() {
    std::set<std::string> seen;
    bool usable = true;
    for (const auto& c : cnnbp_test::registry()) {
        const bool control = std::any_of(c.name.begin(), c.name.end(), [](char ch) {
            return static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f;
        });
        if (c.name.empty() || control) {
            std::cerr << "test case name '" << c.name
                      << "' is empty or holds a control character\n";
            usable = false;
        }
        if (!seen.insert(c.name).second) {
            std::cerr << "two test cases are called '" << c.name << "'\n";
            usable = false;
        }
    }
    return usable;
}

int usage() {
    std::cerr << "usage: cnnbp_tests [PREFIX | --exact NAME | --list]\n";
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (!names_are_usable()) return 1;
    const std::vector<std::string> args(argv + 1, argv + argc);
    const bool list = args.size() == 1 && args[0] == "--list";
    const bool exact = args.size() == 2 && args[0] == "--exact";
    const bool prefix = args.empty() || (args.size() == 1 && args[0].rfind("--", 0) != 0);
    if (!list && !exact && !prefix) return usage();
    if (list) {
        for (const auto& c : cnnbp_test::registry()) std::cout << c.name << "\n";
        return 0;
    }
    const std::string wanted = args.empty() ? "" : args.back();

    int ran = 0;
    for (const auto& c : cnnbp_test::registry()) {
        if (exact ? c.name != wanted : c.name.rfind(wanted, 0) != 0) continue;
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
        std::cerr << "no test case " << (exact ? "is called '" : "matches '") << wanted << "'\n";
        return 1;
    }
    std::cout << ran << " cases, " << cnnbp_test::failures() << " failures\n";
    return cnnbp_test::failures() == 0 ? 0 : 1;
}
