// SPDX-License-Identifier: Apache-2.0
// Test support: a SoftHSM fixture per test case, and a runner for the built binary.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "keywarden/pkcs11.hpp"

namespace kwtest {

std::string source_root();    // KEYWARDEN_SOURCE_ROOT
std::string module_path();    // KEYWARDEN_TEST_MODULE or Debian's SoftHSM path
std::string binary_path();    // KEYWARDEN_BIN

// A private SoftHSM: a temporary directory, a softhsm2.conf rendered from hsm-config/,
// SOFTHSM2_CONF pointing at it, and tokens initialised by label with their PINs set.
// Everything is removed at teardown; the PKCS#11 call trace is printed when a test fails.
class SoftHsm {
public:
    static constexpr const char* so_pin = "so-pin-5678";
    static constexpr const char* user_pin = "user-pin-1234";

    explicit SoftHsm(const std::string& profile = "softhsm2.conf.in",
                     const std::vector<std::string>& labels = {"kw-test"});
    ~SoftHsm();
    SoftHsm(const SoftHsm&) = delete;
    SoftHsm& operator=(const SoftHsm&) = delete;

    const std::string& dir() const { return m_dir; }
    const std::string& conf() const { return m_conf; }
    // softhsm2-util --init-token --free; tokens move slots, so they are found by label.
    void init_token(const std::string& label);
    // Loaded on first use, finalised at teardown.
    std::shared_ptr<keywarden::pkcs11::Module> module();
    keywarden::pkcs11::TokenInfo token(const std::string& label = "kw-test");
    // A logged-in R/W session on the token.
    std::shared_ptr<keywarden::pkcs11::Session> session(const std::string& label = "kw-test");
    void unload() { m_module.reset(); }

    static SoftHsm* current();

private:
    std::string m_dir, m_conf;
    std::shared_ptr<keywarden::pkcs11::Module> m_module;
};

struct CliResult {
    int code = -1;
    std::string out, err;
};

// Runs the built keywarden with args in a new session (no controlling terminal), stdin from
// /dev/null. env entries override the inherited environment; nullopt unsets a variable.
CliResult run_cli(const std::vector<std::string>& args,
                  const std::map<std::string, std::optional<std::string>>& env = {});
// The same for any program (argv[0] is looked up in PATH when it has no '/').
CliResult run_program(const std::vector<std::string>& argv,
                      const std::map<std::string, std::optional<std::string>>& env = {});

// Runs `fn` in this process, through the library, and reports it as the CLI would: code 0 when it
// returns, the error's exit code and "error: WHAT" in err when it throws a keywarden::Error, 1 for
// any other exception. For sweeps that would otherwise start a process per row.
CliResult call(const std::function<void()>& fn);

// Runs a shell command; returns its exit status.
int sh(const std::string& cmd);

std::string make_temp_dir(const std::string& prefix = "kwtest");
void write_file(const std::string& path, const std::string& content, int mode = 0600);

}  // namespace kwtest

namespace kwtest {
// A digest of every file under dir: relative path, mode and bytes. Equal digests mean the
// tree is unchanged.
std::string tree_digest(const std::string& dir);
std::string read_text(const std::string& path);
}  // namespace kwtest
