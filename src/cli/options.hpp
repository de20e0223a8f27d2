// SPDX-License-Identifier: Apache-2.0
// Plain option structs bound to CLI11. Parsing has no side effects.
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "keywarden/pkcs11.hpp"

namespace keywarden::cli {

struct GlobalOptions {
    std::string module;                          // --module / KEYWARDEN_MODULE
    std::optional<std::string> module_init_args; // --module-init-args
    std::string token;                           // --token / KEYWARDEN_TOKEN
    std::string pin_source;                      // --pin-source / KEYWARDEN_PIN_SOURCE
    bool json = false;
    int verbose = 0;
};

struct Commands {
    CLI::App* token = nullptr;
    CLI::App* token_list = nullptr;
    CLI::App* token_check = nullptr;
};

// Builds the whole command tree on `app`, binding into `g`. No side effects.
Commands build_cli(CLI::App& app, GlobalOptions& g);

// What a command needs from the token, opened as the options say.
struct TokenContext {
    std::shared_ptr<pkcs11::Module> module;
    pkcs11::TokenInfo token;
    std::shared_ptr<pkcs11::Session> session;
};

std::shared_ptr<pkcs11::Module> load_module(const GlobalOptions& g);
// Selects the token, opens a R/W session and, if `login`, reads the PIN and logs in once.
TokenContext with_token(const GlobalOptions& g, bool login);

int run_token_list(const GlobalOptions& g);
int run_token_check(const GlobalOptions& g);

}  // namespace keywarden::cli
