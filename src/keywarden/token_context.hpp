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

// Runs `work` in `jobs` child processes, each with its own module state, session and login on
// the same token. SoftHSM serialises every call inside one process, so parallel work on it needs
// processes (see shared/PKCS11-NOTES.md). Each child starts the module afresh
// (Module::restart), finds the token again by serial and logs in with the
// parent's PIN. Waits for all; throws the first child's error with its exit code and hint.
// `meanwhile(running)`, if given, runs in the parent once every child is started, so the
// parent can take in the children's results as they come (see SharedWork): running() is false
// once every child has exited. If it throws, every child is still waited for, and then its
// error is thrown (a child's failure takes precedence).
void run_in_processes(const TokenContext& parent, std::size_t jobs,
                      const std::function<void(std::size_t index, TokenContext& child)>& work,
                      const std::function<void(const std::function<bool()>& running)>& meanwhile = {});

// Work for run_in_processes' children, handed out in chunks as each child asks for the next, so
// that a child on a slower or busier core takes fewer (an even split waits for the slowest
// child). Chunks shrink as the work runs out (each is 1/(8 jobs) of what is left, rounded up),
// so the children end within a few items of each other. The parent makes it before the
// children are forked (the counter is in shared memory). claim() gives out chunks in increasing
// order, so a child that reads its input in order only ever skips forward. A child records where
// it put a chunk's output (offset and length in its own file); the parent reads them back in
// chunk order, while the children run (run_in_processes' meanwhile) or after. After stop()
// (a child or the parent failed; see StopOnError) claim() gives out nothing more.
class SharedWork {
public:
    SharedWork(std::size_t items, std::size_t jobs);
    ~SharedWork();
    SharedWork(const SharedWork&) = delete;
    SharedWork& operator=(const SharedWork&) = delete;

    struct Chunk {
        std::size_t index, first, last;  // items [first, last)
    };
    std::optional<Chunk> claim();
    std::size_t chunks() const noexcept { return m_chunks; }
    void stop() noexcept;
    // Calls stop() if its scope is left by an exception: the other children then end after
    // their current chunk instead of doing all the rest before the error is reported.
    class StopOnError {
    public:
        explicit StopOnError(SharedWork& w) : m_work(w), m_uncaught(std::uncaught_exceptions()) {}
        ~StopOnError();
        StopOnError(const StopOnError&) = delete;
        StopOnError& operator=(const StopOnError&) = delete;

    private:
        SharedWork& m_work;
        int m_uncaught;
    };

    struct Output {
        std::size_t child = 0;
        std::uint64_t offset = 0, length = 0;
    };
    // In the child, once the chunk's output is in its file (written, not just buffered).
    void record(std::size_t chunk, std::size_t child, std::uint64_t offset, std::uint64_t length);
    // In the parent: whether a child has recorded the chunk; and where its output is (throws
    // Error if no child recorded it).
    bool recorded(std::size_t chunk) const;
    Output output(std::size_t chunk) const;

private:
    std::vector<std::size_t> m_starts;  // chunk c is items [m_starts[c], m_starts[c + 1])
    std::size_t m_chunks, m_bytes;
    void* m_shared;
};

// Loads the module named by the options, or by the token URI's module-path / module-name.
std::shared_ptr<Module> load_module(const TokenOptions& o);
// Selects the token, opens a R/W session and, if `login`, reads the PIN and logs in once.
TokenContext open_token(const TokenOptions& o, bool login);
// The same with a module this process has already loaded (a second token of one module: a
// module must not be initialised twice in one process).
TokenContext open_token_on(std::shared_ptr<Module> module, const TokenOptions& o, bool login);

}  // namespace keywarden::pkcs11
