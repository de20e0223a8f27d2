// SPDX-License-Identifier: Apache-2.0
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include <climits>
#include <csignal>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <algorithm>
#include <atomic>
#include <exception>
#include <new>

#include "keywarden/log.hpp"
#include "keywarden/pin.hpp"
#include "keywarden/token_context.hpp"
#include "util/file_io.hpp"

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

TokenContext open_token_on(std::shared_ptr<Module> module, const TokenOptions& g, bool login, TokenInfo token);

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
    return open_token_on(c.module, g, login, std::move(c.token));
}

TokenContext open_token_on(std::shared_ptr<Module> module, const TokenOptions& g, bool login) {
    return open_token_on(module, g, login, select_token(list_tokens(*module), g.token));
}

TokenContext open_token_on(std::shared_ptr<Module> module, const TokenOptions& g, bool login, TokenInfo token) {
    TokenContext c;
    c.module = std::move(module);
    c.token = std::move(token);
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
    auto pin = std::make_shared<SecureBytes>(read_pin(*src, "PIN for token '" + c.token.label + "': "));
    c.session->login(*pin);
    c.pin = std::move(pin);
    return c;
}


void restart_token(TokenContext& c) {
    for (int attempt = 0;; ++attempt) {
        try {
            c.module->restart();
            c.token = select_token(list_tokens(*c.module), "serial:" + c.token.serial);
            c.session = Session::open(c.module, c.token.slot, true);
            if (c.pin) c.session->login(*c.pin);
            return;
        } catch (const Pkcs11Error& e) {
            // A wrong PIN is never tried again (it would burn the token's counter).
            if (e.rv() == CKR_PIN_INCORRECT || e.rv() == CKR_PIN_LOCKED || e.rv() == CKR_PIN_EXPIRED ||
                attempt == 5)
                throw;
        } catch (const Error&) {
            if (attempt == 5) throw;
        }
        // SoftHSM 2.6.1 reads its token files at C_Initialize, and rewrites the token file at
        // every login: a token another process (a --jobs worker) is writing at that moment is
        // missing, or seems to have no user PIN (CKR_USER_PIN_NOT_INITIALIZED). Start again.
        struct timespec ts {0, 40'000'000L * (attempt + 1)};
        nanosleep(&ts, nullptr);
    }
}

namespace {

// A number of keys from the environment variable `name`: `fallback` when unset or empty; anything
// but digits, or outside [low, high], is a usage error with `hint`.
std::size_t keys_from_env(const char* name, std::size_t fallback, unsigned long long low, unsigned long long high,
                          const char* hint) {
    const char* v = std::getenv(name);
    if (!v || !*v) return fallback;
    char* end = nullptr;
    errno = 0;
    unsigned long long n = std::strtoull(v, &end, 10);
    if (errno != 0 || *end != '\0' || *v < '0' || *v > '9' || n < low || n > high) {
        std::string range = low == 0 && high == ULLONG_MAX
                                ? std::string()
                                : " from " + std::to_string(low) + " to " + std::to_string(high);
        throw UsageError(std::string(name) + " must be a number of keys" + range + ", not '" + v + "'", hint);
    }
    return static_cast<std::size_t>(n);
}

}  // namespace

std::size_t token_restart_every() {
    return keys_from_env("KEYWARDEN_TOKEN_RESTART_EVERY", 16384, 0, ULLONG_MAX,
                         "unset it for the default (16384), or set 0 to never restart the module");
}

std::size_t token_batch() {
    return keys_from_env("KEYWARDEN_TOKEN_BATCH", 16, 1, 1024,
                         "unset it for the default (16), or set 1 for a token with few free object slots");
}

TokenRecycler::TokenRecycler(TokenContext& ctx, std::function<void()> rebind)
    : m_ctx(ctx), m_rebind(std::move(rebind)), m_every(token_restart_every()) {}

void TokenRecycler::made(std::size_t temporary_keys) {
    m_count += temporary_keys;
    if (m_every == 0 || m_count < m_every) return;
    m_count = 0;
    restart_token(m_ctx);
    ++m_restarts;
    log::info("restarted the PKCS#11 module (" + std::to_string(m_restarts) + ")");
    m_rebind();
}

}  // namespace keywarden::pkcs11
