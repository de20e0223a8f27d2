// SPDX-License-Identifier: Apache-2.0
// Opening a token the way an operator names it: module, token selector, PIN source.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "keywarden/pkcs11.hpp"

namespace keywarden::pkcs11 {

struct TokenOptions {
    std::string module;                           // path or p11-kit name; may come from the URI
    std::optional<std::string> module_init_args;  // CK_C_INITIALIZE_ARGS.pReserved
    std::string token;       // pkcs11: URI, label:X, serial:X, bare label or serial, or empty
    std::string pin_source;  // env:VAR, file:PATH, prompt; empty: the URI's, then the default
};

struct TokenContext {
    std::shared_ptr<Module> module;
    TokenInfo token;
    std::shared_ptr<Session> session;
};

// Loads the module named by the options, or by the token URI's module-path / module-name.
std::shared_ptr<Module> load_module(const TokenOptions& o);
// Selects the token, opens a R/W session and, if `login`, reads the PIN and logs in once.
TokenContext open_token(const TokenOptions& o, bool login);

}  // namespace keywarden::pkcs11
