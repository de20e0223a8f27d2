// SPDX-License-Identifier: Apache-2.0
#include <ctime>

#include "keywarden/log.hpp"
#include "keywarden/pin.hpp"
#include "keywarden/token_context.hpp"

namespace keywarden::pkcs11 {

std::shared_ptr<Module> load_module(const TokenOptions& g) {
    std::string spec = g.module;
    if (spec.empty() && g.token.starts_with("pkcs11:")) {
        // RFC 7512 lets the URI name the module: module-path=... or module-name=...
        auto uri = Uri::parse(g.token);
        if (auto p = uri.module_path()) spec = *p;
        else if (auto n = uri.module_name()) spec = *n;
    }
    auto m = Module::load(spec, g.module_init_args);
    log::info("loaded PKCS#11 module " + m->path());
    return m;
}

TokenContext open_token(const TokenOptions& g, bool login) {
    TokenContext c;
    c.module = load_module(g);
    // SoftHSM 2.6.1 workaround: it reads its token files at C_Initialize, and a token another
    // process is writing at that moment is left out of the slot list. When the named token is
    // missing, start the module again (up to three times) before reporting it missing.
    for (int attempt = 0;; ++attempt) {
        try {
            c.token = select_token(list_tokens(*c.module), g.token);
            break;
        } catch (const TokenError&) {
            if (attempt == 3 || g.token.empty()) throw;
            c.module.reset();
            struct timespec ts {0, 50'000'000L * (attempt + 1)};
            nanosleep(&ts, nullptr);
            c.module = load_module(g);
        }
    }
    log::info("using token '" + c.token.label + "' (serial " + c.token.serial + ")");
    c.session = Session::open(c.module, c.token.slot, true);
    if (!login) return c;

    std::optional<PinSource> src;
    if (!g.pin_source.empty()) {
        src = parse_pin_source(g.pin_source);
    } else if (g.token.starts_with("pkcs11:")) {
        if (auto ps = Uri::parse(g.token).pin_source()) src = parse_pin_source(*ps);
    }
    if (!src) src = default_pin_source();
    if (!src)
        throw TokenError("token '" + c.token.label + "' needs a PIN and none was given",
                         "set KEYWARDEN_PIN, or pass --pin-source env:VAR or file:PATH "
                         "(no terminal to prompt on)");
    log::info("reading the PIN from " + src->describe());
    SecureBytes pin = read_pin(*src, "PIN for token '" + c.token.label + "': ");
    c.session->login(pin);
    return c;
}

}  // namespace keywarden::pkcs11
