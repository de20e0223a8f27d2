// SPDX-License-Identifier: Apache-2.0
// Catch2 v2 with its own main: sets up the secure heap as the binary does, and prints the
// PKCS#11 call trace and the token directory at a failing assertion.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <filesystem>
#include <iostream>

#include "keywarden/secure_buffer.hpp"
#include "support.hpp"

namespace {

struct TokenLogListener : Catch::TestEventListenerBase {
    using TestEventListenerBase::TestEventListenerBase;
    // At the failing assertion the test's SoftHSM fixture is still alive, so its directory
    // can be shown; SoftHSM itself logs to syslog only, so the call trace is the token log.
    bool assertionEnded(const Catch::AssertionStats& stats) override {
        if (stats.assertionResult.isOk()) return true;
        std::cerr << "---- PKCS#11 calls before the failure (most recent last) ----\n";
        for (const auto& l : keywarden::pkcs11::call_trace()) std::cerr << "  " << l << "\n";
        if (auto* hsm = kwtest::SoftHsm::current()) {
            std::cerr << "---- SoftHSM token directory " << hsm->dir() << " ----\n";
            std::error_code ec;
            for (const auto& e : std::filesystem::recursive_directory_iterator(hsm->dir(), ec))
                std::cerr << "  " << e.path().string() << "\n";
        }
        return true;
    }
};

}  // namespace

CATCH_REGISTER_LISTENER(TokenLogListener)

int main(int argc, char** argv) {
    keywarden::init_secure_heap();
    return Catch::Session().run(argc, argv);
}
