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

void run_in_processes(const TokenContext& parent, std::size_t jobs,
                      const std::function<void(std::size_t, TokenContext&)>& work,
                      const std::function<void(const std::function<bool()>&)>& meanwhile) {
    struct Child {
        pid_t pid;
        int fd;
    };
    std::vector<Child> children;
    std::fflush(stdout);
    std::fflush(stderr);
    for (std::size_t k = 0; k < jobs; ++k) {
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0) throw Error("pipe failed");
        pid_t pid = ::fork();
        if (pid < 0) throw Error("fork failed: " + std::string(std::strerror(errno)));
        if (pid == 0) {
            ::close(p[0]);
            // A worker never outlives its parent: if the parent is killed, so is the worker.
            ::prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (::getppid() == 1) ::_exit(1);
            int code = 0;
            std::string report;
            try {
                TokenContext c = parent;
                restart_token(c);
                work(k, c);
            } catch (const Error& e) {
                code = static_cast<int>(e.exit_code());
                report = std::to_string(code) + "\n" + e.what() + "\n" + e.hint();
            } catch (const std::exception& e) {
                code = 1;
                report = "1\n" + std::string(e.what()) + "\n";
            }
            // Capped well below a pipe's buffer: the parent may read it only after meanwhile().
            if (code != 0) io::write_fully(p[1], std::string_view(report).substr(0, 4096));
            // _exit: no destructors, no atexit handlers, no C_Finalize of the parent's state.
            ::_exit(code == 0 ? 0 : 1);
        }
        ::close(p[1]);
        children.push_back({pid, p[0]});
    }
    std::exception_ptr in_meanwhile;  // what meanwhile() threw; every child is still waited for
    if (meanwhile) {
        // Whether any child is still running, without reaping it (its status is read below).
        auto running = [&] {
            for (const auto& c : children) {
                siginfo_t info{};
                if (::waitid(P_PID, static_cast<id_t>(c.pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0) continue;
                if (info.si_pid == 0) return true;
            }
            return false;
        };
        try {
            meanwhile(running);
        } catch (...) {
            in_meanwhile = std::current_exception();
        }
    }
    std::optional<Error> first;
    for (std::size_t k = 0; k < children.size(); ++k) {
        auto& c = children[k];
        std::string report = io::read_to_end(c.fd);
        ::close(c.fd);
        int status = 0;
        ::waitpid(c.pid, &status, 0);
        bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (ok || first) continue;
        if (report.empty()) {
            first.emplace("a worker process died (status " + std::to_string(status) + ")");
            continue;
        }
        auto nl1 = report.find('\n');
        auto nl2 = report.find('\n', nl1 + 1);
        int code = std::atoi(report.substr(0, nl1).c_str());
        first.emplace(report.substr(nl1 + 1, nl2 - nl1 - 1),
                      nl2 == std::string::npos ? std::string() : report.substr(nl2 + 1),
                      static_cast<ExitCode>(code));
    }
    if (first) throw *first;
    if (in_meanwhile) std::rethrow_exception(in_meanwhile);
}

namespace {

// The shared block: the next chunk to give out and the stop flag, then one Slot per chunk.
struct SharedBlock {
    std::atomic<std::size_t> next;
    std::atomic<std::uint32_t> stopped;
};
struct Slot {
    std::atomic<std::uint32_t> recorded;  // set last (release), read first (acquire)
    std::uint32_t child;
    std::uint64_t offset, length;
};
static_assert(std::atomic<std::size_t>::is_always_lock_free && std::atomic<std::uint32_t>::is_always_lock_free,
              "counters shared between processes");

Slot* slots_of(void* shared) { return reinterpret_cast<Slot*>(static_cast<char*>(shared) + 64); }

}  // namespace

SharedWork::SharedWork(std::size_t items, std::size_t jobs) {
    const std::size_t parts = std::max<std::size_t>(1, jobs) * 8;
    for (std::size_t at = 0; at < items;) {
        m_starts.push_back(at);
        at += (items - at + parts - 1) / parts;
    }
    m_starts.push_back(items);
    m_chunks = m_starts.size() - 1;
    m_bytes = 64 + m_chunks * sizeof(Slot);
    m_shared = ::mmap(nullptr, m_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m_shared == MAP_FAILED)
        throw Error("cannot map memory shared with worker processes: " + std::string(std::strerror(errno)));
    new (m_shared) SharedBlock{0, 0};
    for (std::size_t c = 0; c < m_chunks; ++c) new (slots_of(m_shared) + c) Slot{0, 0, 0, 0};
}

SharedWork::~SharedWork() { ::munmap(m_shared, m_bytes); }

void SharedWork::stop() noexcept { static_cast<SharedBlock*>(m_shared)->stopped.store(1, std::memory_order_relaxed); }

SharedWork::StopOnError::~StopOnError() {
    if (std::uncaught_exceptions() > m_uncaught) m_work.stop();
}

std::optional<SharedWork::Chunk> SharedWork::claim() {
    if (static_cast<SharedBlock*>(m_shared)->stopped.load(std::memory_order_relaxed)) return std::nullopt;
    std::size_t c = static_cast<SharedBlock*>(m_shared)->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= m_chunks) return std::nullopt;
    return Chunk{c, m_starts[c], m_starts[c + 1]};
}

void SharedWork::record(std::size_t chunk, std::size_t child, std::uint64_t offset, std::uint64_t length) {
    if (chunk >= m_chunks) throw Error("internal: no work chunk " + std::to_string(chunk));
    Slot& s = slots_of(m_shared)[chunk];
    s.child = static_cast<std::uint32_t>(child);
    s.offset = offset;
    s.length = length;
    s.recorded.store(1, std::memory_order_release);
}

bool SharedWork::recorded(std::size_t chunk) const {
    return chunk < m_chunks && slots_of(m_shared)[chunk].recorded.load(std::memory_order_acquire) != 0;
}

SharedWork::Output SharedWork::output(std::size_t chunk) const {
    if (!recorded(chunk)) throw Error("internal: no worker recorded its work on chunk " + std::to_string(chunk));
    const Slot& s = slots_of(m_shared)[chunk];
    return Output{s.child, s.offset, s.length};
}

}  // namespace keywarden::pkcs11
