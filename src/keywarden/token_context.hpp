// SPDX-License-Identifier: Apache-2.0
// Opening a token the way an operator names it: module, token selector, PIN source.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "keywarden/pkcs11.hpp"
#include "keywarden/token_options.hpp"

namespace keywarden::pkcs11 {

// The public struct (keywarden/token_options.hpp), under the name the library uses.
using TokenOptions = keywarden::TokenOptions;

struct TokenContext {
    std::shared_ptr<Module> module;
    TokenInfo token;
    std::shared_ptr<Session> session;
    // The PIN used to log in, kept (in the locked, wiping heap) only so that worker processes
    // (--jobs) can log in too.
    std::shared_ptr<const SecureBytes> pin;
};

// Starts the module afresh (Module::restart), finds the same token again by its serial, opens a
// new session and logs in again with the kept PIN. Every earlier session and session object of
// this process is gone afterwards; using one throws (Session::live).
void restart_token(TokenContext& c);

// SoftHSM 2.6.1 keeps every destroyed session object in memory until C_Finalize (about 240
// bytes each, measured by bench/backup-bench), so a loop that makes one temporary key per store
// key would grow with the store. Such a loop reports each temporary key here; every
// restart_every keys the recycler restarts the token (restart_token) and calls `rebind`, which
// finds or makes the loop's keys again on the new session. The loop must hold no other session
// object across that point.
class TokenRecycler {
public:
    TokenRecycler(TokenContext& ctx, std::function<void()> rebind);
    void made(std::size_t temporary_keys);
    std::size_t restarts() const noexcept { return m_restarts; }

private:
    TokenContext& m_ctx;
    std::function<void()> m_rebind;
    std::size_t m_every, m_count = 0, m_restarts = 0;
};
// KEYWARDEN_TOKEN_RESTART_EVERY (a number of keys; 0 never restarts), default 16384.
std::size_t token_restart_every();
// KEYWARDEN_TOKEN_BATCH: how many temporary keys a backup command holds in the token at once
// (1 to 1024), default 16. 1 for a token with few free object slots.
std::size_t token_batch();

// Loads the module named by the options, or by the token URI's module-path / module-name.
std::shared_ptr<Module> load_module(const TokenOptions& o);
// Selects the token, opens a R/W session and, if `login`, reads the PIN and logs in once.
TokenContext open_token(const TokenOptions& o, bool login);
// The same with a module this process has already loaded (a second token of one module: a
// module must not be initialised twice in one process).
TokenContext open_token_on(std::shared_ptr<Module> module, const TokenOptions& o, bool login);

}  // namespace keywarden::pkcs11
