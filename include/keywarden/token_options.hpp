// SPDX-License-Identifier: Apache-2.0
// How an application or an operator names a token: the same four settings as the CLI's
// --module, --module-init-args, --token and --pin-source (docs/cli.md).
#pragma once

#include <optional>
#include <string>

namespace keywarden {

struct TokenOptions {
    // The PKCS#11 module: a path or a p11-kit module name; may come from a pkcs11: URI in `token`.
    std::string module;
    // CK_C_INITIALIZE_ARGS.pReserved, for modules that need it (NSS softoken).
    std::optional<std::string> module_init_args;
    // A pkcs11: URI, label:X, serial:X, a bare label or serial, or empty (for a store: the token
    // its metadata names).
    std::string token;
    // env:VAR, file:PATH or prompt; empty: the URI's pin-source, then KEYWARDEN_PIN_SOURCE, then
    // KEYWARDEN_PIN. A PIN itself is never accepted here.
    std::string pin_source;
};

}  // namespace keywarden
