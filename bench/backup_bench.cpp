// SPDX-License-Identifier: Apache-2.0
// backup-bench: times backup::export_bundle, verify_bundle and import_bundle on private SoftHSM
// tokens (a source and a destination), next to the raw PKCS#11 floor for the per-key token calls
// each operation needs, and the same three operations as `keywarden` CLI processes for their
// peak RSS. Prints plain-text tables.
//
//   backup-bench [--keys N] [--kinds LIST] [--cli PATH] [--module PATH] [--jobs J [--repeat R]] [--keep-dir]
//
// With --jobs J (J >= 2) it also measures what J processes gain: each floor run in 1 and in J
// forked processes (each with its own session, started together, splitting the keys), and the
// CLI commands with --jobs 1 and --jobs J. Single runs of these vary by a few per cent on a
// shared machine; --repeat R measures each speed-up R times and reports the medians.
//
// The store holds N rings, one version each, made by a single KeyStore::generate call (not timed
// in the tables). By default every ring is client/<id>/symmetric (AES-256): one key per client, N
// clients. --kinds gives each client several rings instead, e.g. --kinds acra (storage,symmetric,
// hmac: Acra's per-client keys), so that N keys are N/3 clients; the floors then make, per key,
// the token calls of that key's kind.
#include <fcntl.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "keywarden/backup.hpp"
#include "bench_common.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/keystore.hpp"
#include "keywarden/open_store.hpp"
#include "keywarden/pkcs11.hpp"
#include "keywarden/storage.hpp"
#include "keywarden/token_context.hpp"
#include "keywarden/token_protector.hpp"
#include "process.hpp"

#ifndef KEYWARDEN_BENCH_SOURCE_ROOT
#define KEYWARDEN_BENCH_SOURCE_ROOT "."
#endif


namespace {

namespace fs = std::filesystem;
namespace p11 = keywarden::pkcs11;
namespace ks = keywarden::keystore;
namespace bk = keywarden::backup;
using keywarden::Exposure;
using keywarden::KeyKind;
using namespace kwbench;

constexpr const char* kSrcLabel = "kw-bench-src";
constexpr const char* kDstLabel = "kw-bench-dst";
constexpr const char* kUserPin = "bench-user-1234";
constexpr const char* kSoPin = "bench-so-1234";
constexpr const char* kPinEnv = "BENCH_PIN";


struct Options {
    std::size_t keys = 10000;
    bool keep_dir = false;
    std::string cli = "build/keywarden";
    std::string module;
    std::size_t jobs = 1;  // >= 2: also the process speed-ups of the floors and the CLI
    std::size_t repeat = 1;  // rounds of the --jobs measurements; the medians are reported
    std::vector<ks::RingKind> kinds{ks::RingKind::symmetric};  // the rings of each client
};

constexpr const char* kUsage =
    "usage: backup-bench [--keys N] [--kinds LIST] [--cli PATH] [--module PATH] [--jobs J [--repeat R]] "
    "[--keep-dir]\n";

[[noreturn]] void usage_exit(const std::string& problem) {
    std::cerr << "backup-bench: " << problem << "\n" << kUsage;
    std::exit(2);
}

std::size_t parse_count(const std::string& s) {
    if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos)
        usage_exit("not a key count: '" + s + "'");
    std::size_t n = std::stoul(s);
    if (n == 0) usage_exit("the key count must be at least 1");
    return n;
}

// "storage,symmetric,hmac" (client ring kinds, each once) or "acra" for exactly those three.
std::vector<ks::RingKind> parse_kinds(const std::string& s) {
    std::string list = s == "acra" ? "storage,symmetric,hmac" : s;
    std::vector<ks::RingKind> out;
    std::size_t pos = 0;
    while (pos <= list.size()) {
        std::size_t end = std::min(list.find(',', pos), list.size());
        std::string name = list.substr(pos, end - pos);
        std::optional<ks::RingKind> k;
        if (name == "storage" || name == "storage-keypair") k = ks::RingKind::storage_keypair;
        else if (name == "symmetric") k = ks::RingKind::symmetric;
        else if (name == "hmac") k = ks::RingKind::hmac;
        if (!k) usage_exit("--kinds: '" + name + "' is not storage, symmetric or hmac");
        if (std::find(out.begin(), out.end(), *k) != out.end()) usage_exit("--kinds names '" + name + "' twice");
        out.push_back(*k);
        pos = end + 1;
    }
    return out;
}

Options parse_options(int argc, char** argv) {
    Options o;
    o.module = env_or("KEYWARDEN_TEST_MODULE", "/usr/lib/softhsm/libsofthsm2.so");
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto value = [&](const std::string& flag) -> std::string {
            if (i + 1 >= argc) usage_exit(flag + " needs a value");
            return argv[++i];
        };
        if (a == "--keys") o.keys = parse_count(value(a));
        else if (a.starts_with("--keys=")) o.keys = parse_count(a.substr(7));
        else if (a == "--keep-dir") o.keep_dir = true;
        else if (a == "--kinds") o.kinds = parse_kinds(value(a));
        else if (a.starts_with("--kinds=")) o.kinds = parse_kinds(a.substr(8));
        else if (a == "--jobs" || a.starts_with("--jobs=")) {
            o.jobs = parse_count(a == "--jobs" ? value(a) : a.substr(7));
            if (o.jobs > 16) usage_exit("--jobs is at most 16");
        }
        else if (a == "--repeat" || a.starts_with("--repeat=")) {
            o.repeat = parse_count(a == "--repeat" ? value(a) : a.substr(9));
            if (o.repeat > 15) usage_exit("--repeat is at most 15");
        }
        else if (a == "--cli") o.cli = value(a);
        else if (a.starts_with("--cli=")) o.cli = a.substr(6);
        else if (a == "--module") o.module = value(a);
        else if (a.starts_with("--module=")) o.module = a.substr(9);
        else if (a == "-h" || a == "--help") {
            std::cout << kUsage
                      << "  --keys N       store size in keys (default 10000), one version per ring\n"
                         "  --kinds LIST   the rings of each client, from storage (EC P-256 keypair),\n"
                         "                 symmetric (AES-256) and hmac; 'acra' = storage,symmetric,hmac.\n"
                         "                 Default symmetric: N clients with one AES key each\n"
                         "  --cli PATH     keywarden binary for the CLI runs (peak RSS); default\n"
                         "                 build/keywarden, skipped if absent\n"
                         "  --module PATH  PKCS#11 module (default /usr/lib/softhsm/libsofthsm2.so)\n"
                         "  --jobs J       also time the floors in 1 and J processes, and the CLI\n"
                         "                 commands with --jobs 1 and --jobs J (speed-ups)\n"
                         "  --repeat R     with --jobs: measure each speed-up R times, alternating the\n"
                         "                 1- and J-process runs, and report the medians (default 1)\n"
                         "  --keep-dir     keep the temporary tokens, stores and bundles\n";
            std::exit(0);
        } else usage_exit("unknown option " + a);
    }
    if (o.repeat > 1 && o.jobs < 2) usage_exit("--repeat needs --jobs J (J >= 2): it repeats the speed-up measurements");
    return o;
}

template <typename... A>
std::string fmt(const char* f, A... v) {
    char buf[256];
    std::snprintf(buf, sizeof buf, f, v...);
    return buf;
}

// ---- child processes: a small spawner forked at start-up -----------------------------------
//
// wait4()'s ru_maxrss of a child is max(the RSS it inherited at fork, its own peak after exec):
// Linux sets the forked mm's high-water mark to its RSS at fork and exec keeps that mark. Forking
// the CLI straight from this process (hundreds of MiB of SoftHSM objects and bundles by then)
// would report this process's size, not the CLI's (posix_spawn's CLONE_VM child the same: exec
// records the old mm's mark). So every child is started by a spawner that was itself forked
// before this process grew, with the runner the tests use (tests/process.hpp), and the spawner
// sends back wait4()'s rusage.

struct ChildResult {
    int status = -1;      // exit code, or 128 + signal
    double wall = 0;      // fork to wait4, seconds
    long maxrss_kib = 0;  // ru_maxrss
    double user = 0, sys = 0;
};

bool write_full(int fd, const void* p, std::size_t n) {
    const char* b = static_cast<const char*>(p);
    while (n) {
        ssize_t w = ::write(fd, b, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        b += w;
        n -= static_cast<std::size_t>(w);
    }
    return true;
}

bool read_full(int fd, void* p, std::size_t n) {
    char* b = static_cast<char*>(p);
    while (n) {
        ssize_t r = ::read(fd, b, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        b += r;
        n -= static_cast<std::size_t>(r);
    }
    return true;
}

void put_strings(std::string& buf, const std::vector<std::string>& v) {
    auto put32 = [&](std::uint32_t x) { buf.append(reinterpret_cast<const char*>(&x), 4); };
    put32(static_cast<std::uint32_t>(v.size()));
    for (const auto& s : v) {
        put32(static_cast<std::uint32_t>(s.size()));
        buf += s;
    }
}

bool get_strings(int fd, std::vector<std::string>& v) {
    std::uint32_t n = 0;
    if (!read_full(fd, &n, 4)) return false;
    v.resize(n);
    for (auto& s : v) {
        std::uint32_t len = 0;
        if (!read_full(fd, &len, 4)) return false;
        s.resize(len);
        if (len && !read_full(fd, s.data(), len)) return false;
    }
    return true;
}

// The spawner's loop: request = argv, envp, {stdout path, stderr path}; reply = ChildResult.
[[noreturn]] void spawner_main(int req_fd, int rep_fd) {
    for (;;) {
        std::vector<std::string> args, env, io;
        if (!get_strings(req_fd, args) || !get_strings(req_fd, env) || !get_strings(req_fd, io) ||
            args.empty() || io.size() != 2)
            ::_exit(0);
        ChildResult r;
        try {
            kwtest::ProcessOptions po;
            po.out_path = io[0];
            po.err_path = io[1];
            po.environment = env;
            auto p = kwtest::run_process(args, {}, po);
            r = ChildResult{p.code, p.wall, p.maxrss_kib, p.user, p.sys};
        } catch (const std::exception& e) {
            std::fprintf(stderr, "%s\n", e.what());
            r.status = 127;
        }
        if (!write_full(rep_fd, &r, sizeof r)) ::_exit(0);
    }
}

class Spawner {
public:
    Spawner() {
        int req[2], rep[2];
        if (::pipe2(req, O_CLOEXEC) != 0 || ::pipe2(rep, O_CLOEXEC) != 0)
            throw std::runtime_error("pipe failed");
        std::fflush(nullptr);
        m_pid = ::fork();
        if (m_pid < 0) throw std::runtime_error("fork failed");
        if (m_pid == 0) {
            ::close(req[1]);
            ::close(rep[0]);
            spawner_main(req[0], rep[1]);
        }
        ::close(req[0]);
        ::close(rep[1]);
        m_req = req[1];
        m_rep = rep[0];
    }
    ~Spawner() {
        ::close(m_req);  // EOF: the spawner exits
        ::close(m_rep);
        int st;
        while (::waitpid(m_pid, &st, 0) < 0 && errno == EINTR) {
        }
    }
    Spawner(const Spawner&) = delete;
    Spawner& operator=(const Spawner&) = delete;

    // Runs a program (PATH lookup) with stdin from /dev/null and stdout/stderr into files.
    // env entries with no value are removed from the child's environment.
    ChildResult run(const std::vector<std::string>& args,
                    const std::map<std::string, std::optional<std::string>>& env,
                    const std::string& out_path, const std::string& err_path) {
        std::vector<std::string> env_s = kwtest::child_environment(env);
        std::string buf;
        put_strings(buf, args);
        put_strings(buf, env_s);
        put_strings(buf, {out_path, err_path});
        ChildResult r;
        if (!write_full(m_req, buf.data(), buf.size()) || !read_full(m_rep, &r, sizeof r))
            throw std::runtime_error("the spawner process is gone");
        return r;
    }

private:
    pid_t m_pid = -1;
    int m_req = -1, m_rep = -1;
};

// A private SoftHSM token directory with two tokens, as tests/support.cpp makes them: render
// hsm-config/softhsm2.conf.in, point SOFTHSM2_CONF at it, softhsm2-util --init-token per label.
void make_softhsm(Spawner& sp, const std::string& dir) {
    fs::create_directories(dir + "/tokens");
    std::string root = env_or("KEYWARDEN_SOURCE_ROOT", KEYWARDEN_BENCH_SOURCE_ROOT);
    std::string conf = read_text(root + "/hsm-config/softhsm2.conf.in");
    if (conf.empty()) conf = kFallbackConf;
    for (std::size_t p; (p = conf.find("@TOKENDIR@")) != std::string::npos;)
        conf.replace(p, 10, dir + "/tokens");
    std::string conf_path = dir + "/softhsm2.conf";
    std::ofstream(conf_path) << conf;
    // SoftHSM reads the config again at every C_Initialize; the CLI children inherit it.
    ::setenv("SOFTHSM2_CONF", conf_path.c_str(), 1);
    for (const char* label : {kSrcLabel, kDstLabel}) {
        auto r = sp.run({"softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin",
                         kSoPin, "--pin", kUserPin},
                        {}, "/dev/null", dir + "/softhsm2-util.err");
        if (r.status != 0)
            throw std::runtime_error("softhsm2-util --init-token failed for " + std::string(label) +
                                     " (exit " + std::to_string(r.status) +
                                     "): " + read_text(dir + "/softhsm2-util.err"));
    }
}

p11::TokenOptions token_options(const Options& o, const char* label) {
    p11::TokenOptions t;
    t.module = o.module;
    t.token = std::string("label:") + label;
    t.pin_source = std::string("env:") + kPinEnv;
    return t;
}

// ---- the raw PKCS#11 floor -----------------------------------------------------------------

// Templates built once, outside the timed loops, with the attributes the library uses.
// The unwrap template of each key kind: fill_key_template(kind, sensitive), as unprotect() builds it.
struct FloorTemplates {
    p11::Template aes, generic_secret, ec_p256_private;
    FloorTemplates() {
        p11::fill_key_template(aes, KeyKind::aes, Exposure::sensitive);
        p11::fill_key_template(generic_secret, KeyKind::generic_secret, Exposure::sensitive);
        p11::fill_key_template(ec_p256_private, KeyKind::ec_p256_private, Exposure::sensitive);
    }
    p11::Template& of(KeyKind k) {
        switch (k) {
            case KeyKind::aes: return aes;
            case KeyKind::generic_secret: return generic_secret;
            case KeyKind::ec_p256_private: return ec_p256_private;
        }
        throw std::logic_error("no floor template for this key kind");
    }
};

// The blobs a floor works on, with each blob's key kind.
struct Blobs {
    std::vector<std::vector<std::uint8_t>> wrapped;
    std::vector<KeyKind> kinds;
    struct Part {
        std::span<const std::vector<std::uint8_t>> wrapped;
        std::span<const KeyKind> kinds;
    };
    Part part(std::size_t first, std::size_t count) const {
        return {std::span(wrapped).subspan(first, count), std::span(kinds).subspan(first, count)};
    }
};

// An AES-256 backup key as a session object with a known value, so that the same key can be
// made on both tokens (the import floor unwraps on the destination what the export floor wrapped
// on the source). C_CreateObject, as verify and import load the backup key from the secret file.
p11::SessionObject make_floor_backup_key(p11::Session& s, const std::vector<std::uint8_t>& value) {
    p11::Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_AES);
    t.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true).add_bool(CKA_SENSITIVE, true);
    t.add_bool(CKA_EXTRACTABLE, false).add_bool(CKA_WRAP, true).add_bool(CKA_UNWRAP, true);
    t.add_bytes(CKA_VALUE, value);
    return s.create_object(t);
}

const std::array<std::uint8_t, 32> kZeros32{};

// The token call of the key check value (TokenKeyBackend::check_value) on an unwrapped key: AES
// C_Encrypt(CKM_AES_ECB) of 16 zero bytes, HMAC C_Sign(CKM_SHA256_HMAC) of 32 zero bytes, EC
// C_Sign(CKM_ECDSA) of a 32-byte digest. The library also checks an EC signature against the
// public point on the host; that is not a token call and not in the floor.
bool floor_check(p11::Session& s, KeyKind kind, CK_OBJECT_HANDLE h) {
    switch (kind) {
        case KeyKind::aes: {
            CK_MECHANISM m{CKM_AES_ECB, nullptr, 0};
            return s.encrypt(&m, h, std::span(kZeros32).first(16)).size() == 16;
        }
        case KeyKind::generic_secret: {
            CK_MECHANISM m{CKM_SHA256_HMAC, nullptr, 0};
            return s.sign(&m, h, kZeros32).size() == 32;
        }
        case KeyKind::ec_p256_private: {
            CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
            return s.sign(&m, h, kZeros32).size() == 64;
        }
    }
    throw std::logic_error("no floor check value for this key kind");
}

// Export, per key: C_UnwrapKey under the master key (a real store blob), C_WrapKey under the
// backup key (CKM_AES_KEY_WRAP_PAD), C_DestroyObject. Returns the new blobs for the next floors.
std::vector<std::vector<std::uint8_t>> floor_export(p11::Session& s, CK_OBJECT_HANDLE master,
                                                    CK_MECHANISM_TYPE master_mech,
                                                    CK_OBJECT_HANDLE backup, FloorTemplates& t,
                                                    Blobs::Part blobs) {
    CK_MECHANISM um{master_mech, nullptr, 0};
    CK_MECHANISM wm{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
    std::vector<std::vector<std::uint8_t>> out;
    out.reserve(blobs.wrapped.size());
    for (std::size_t i = 0; i < blobs.wrapped.size(); ++i) {
        auto k = s.unwrap_key(&um, master, blobs.wrapped[i], t.of(blobs.kinds[i]));
        out.push_back(s.wrap_key(&wm, backup, k.handle()));
    }  // k: C_DestroyObject
    return out;
}

// Verify, per key: C_UnwrapKey under the backup key, the check value's token call (floor_check),
// C_DestroyObject.
std::size_t floor_verify(p11::Session& s, CK_OBJECT_HANDLE backup, FloorTemplates& t, Blobs::Part blobs) {
    CK_MECHANISM um{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
    std::size_t n = 0;
    for (std::size_t i = 0; i < blobs.wrapped.size(); ++i) {
        auto k = s.unwrap_key(&um, backup, blobs.wrapped[i], t.of(blobs.kinds[i]));
        n += floor_check(s, blobs.kinds[i], k.handle());
    }
    return n;
}

// Import, per key: C_UnwrapKey under the backup key, the check-value op, C_WrapKey under the
// destination master key, C_DestroyObject. In batches of `batch` keys, as the library does
// (KEYWARDEN_TOKEN_BATCH): the batch's unwraps, then its check values, wraps and destroys; 1 is
// the plain per-key loop.
std::size_t floor_import(p11::Session& s, CK_OBJECT_HANDLE backup, CK_OBJECT_HANDLE master,
                         CK_MECHANISM_TYPE master_mech, FloorTemplates& t, Blobs::Part blobs,
                         std::size_t batch) {
    CK_MECHANISM um{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
    CK_MECHANISM wm{master_mech, nullptr, 0};
    std::size_t n = 0, count = blobs.wrapped.size();
    std::vector<p11::SessionObject> keys;
    keys.reserve(batch);
    for (std::size_t first = 0; first < count; first += batch) {
        std::size_t last = std::min(count, first + batch);
        for (std::size_t i = first; i < last; ++i)
            keys.push_back(s.unwrap_key(&um, backup, blobs.wrapped[i], t.of(blobs.kinds[i])));
        for (std::size_t i = first; i < last; ++i) floor_check(s, blobs.kinds[i], keys[i - first].handle());
        for (auto& k : keys) n += !s.wrap_key(&wm, master, k.handle()).empty();
        keys.clear();  // C_DestroyObject each
    }
    return n;
}

// Token calls the library makes per key beyond the floors above, timed the same way: the HMAC
// over a ring file with the master signature key (C_Verify in load() for export, C_Sign in
// stage() for import).
double time_ring_macs(p11::Session& s, CK_OBJECT_HANDLE sig_key, std::size_t n, std::size_t bytes,
                      bool verify) {
    std::vector<std::uint8_t> data(bytes, 0x5a);
    CK_MECHANISM m{CKM_SHA256_HMAC, nullptr, 0};
    auto tag = s.sign(&m, sig_key, data);
    auto a = Clock::now();
    for (std::size_t i = 0; i < n; ++i) {
        if (verify) s.verify(&m, sig_key, data, tag);
        else s.sign(&m, sig_key, data);
    }
    return seconds_between(a, Clock::now());
}

// The floors run in chunks as the library does: the module restarts (untimed) every
// token_restart_every() keys, since SoftHSM slows down as the destroyed session objects it keeps
// until C_Finalize pile up. run(first, last) does keys [first, last) and returns its seconds;
// restart() restarts the token and makes the floor's keys again.
double chunked_floor(std::size_t n, const std::function<double(std::size_t, std::size_t)>& run,
                     const std::function<void()>& restart) {
    std::size_t every = p11::token_restart_every();
    if (every == 0) every = n;
    double total = 0;
    for (std::size_t first = 0; first < n; first += every) {
        if (first > 0) restart();
        total += run(first, std::min(n, first + every));
    }
    return total;
}

// A floor run in `procs` forked processes at once, each on its own share of the keys and its
// own session. prepare(k, first, last) runs in process k before the start (the token restarted
// in that process, the floor's keys made; not timed) and returns the timed run, which returns
// its own seconds (restarts inside it not timed, as in chunked_floor). All processes start
// together once every one is prepared; the result is the slowest process's seconds.
using TimedRun = std::function<double()>;
double floor_in_processes(std::size_t procs, std::size_t n,
                          const std::function<TimedRun(std::size_t, std::size_t, std::size_t)>& prepare) {
    struct Child {
        pid_t pid;
        int ready, go;  // ready: 'r', then the result text ("<seconds>" or "fail <why>")
    };
    std::vector<Child> kids;
    auto read_rest = [](int fd) {
        std::string s;
        char buf[512];
        ssize_t r;
        while ((r = ::read(fd, buf, sizeof buf)) > 0) s.append(buf, static_cast<std::size_t>(r));
        return s;
    };
    // Every child started is waited for, whatever happens after.
    auto reap = [&](bool release) {
        for (auto& c : kids) {
            if (c.go >= 0) {
                char g = 'g';
                if (release && ::write(c.go, &g, 1) != 1) {
                }
                ::close(c.go);
                c.go = -1;
            }
        }
    };
    std::fflush(stdout);
    std::fflush(stderr);
    std::string problem;
    for (std::size_t k = 0; k < procs && problem.empty(); ++k) {
        int ready[2], go[2];
        if (::pipe2(ready, O_CLOEXEC) != 0) {
            problem = "pipe failed";
            break;
        }
        if (::pipe2(go, O_CLOEXEC) != 0) {
            ::close(ready[0]);
            ::close(ready[1]);
            problem = "pipe failed";
            break;
        }
        pid_t pid = ::fork();
        if (pid < 0) {
            for (int fd : {ready[0], ready[1], go[0], go[1]}) ::close(fd);
            problem = "fork failed";
            break;
        }
        if (pid == 0) {
            ::close(ready[0]);
            ::close(go[1]);
            for (auto& c : kids) {  // the earlier children's ends: theirs alone
                ::close(c.ready);
                ::close(c.go);
            }
            std::string out;
            try {
                auto run = prepare(k, n * k / procs, n * (k + 1) / procs);
                char c = 'r';
                char g = 0;
                if (::write(ready[1], &c, 1) != 1 || ::read(go[0], &g, 1) != 1) ::_exit(1);
                out = fmt("%.9f", run());
            } catch (const std::exception& e) {
                out = std::string("fail ") + e.what();
            }
            ssize_t w = ::write(ready[1], out.data(), out.size());
            ::_exit(w == static_cast<ssize_t>(out.size()) && !out.starts_with("fail") ? 0 : 1);
        }
        ::close(ready[1]);
        ::close(go[0]);
        kids.push_back({pid, ready[0], go[1]});
    }
    // All start together once every one is prepared; otherwise none starts.
    std::vector<std::string> early(kids.size());
    bool all_ready = problem.empty();
    for (std::size_t k = 0; k < kids.size(); ++k) {
        char r = 0;
        if (::read(kids[k].ready, &r, 1) != 1) all_ready = false;
        else if (r != 'r') {
            early[k] = std::string(1, r);  // the first byte of "fail ..."
            all_ready = false;
        }
    }
    reap(all_ready);
    double slowest = 0;
    for (std::size_t k = 0; k < kids.size(); ++k) {
        std::string res = early[k] + read_rest(kids[k].ready);
        ::close(kids[k].ready);
        int status = 0;
        ::waitpid(kids[k].pid, &status, 0);
        bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0 && !res.empty() && !res.starts_with("fail");
        if (ok) slowest = std::max(slowest, std::stod(res));
        else if (problem.empty() && !res.empty())  // the first real failure, not its echoes
            problem = "process " + std::to_string(k) + ": " + res;
    }
    if (problem.empty() && !all_ready) problem = "a floor process ended before it was ready";
    if (!problem.empty()) throw std::runtime_error("floor in " + std::to_string(procs) + " processes: " + problem);
    return slowest;
}

// ---- the report ----------------------------------------------------------------------------

struct Row {
    std::string operation;
    std::size_t keys = 0;
    std::optional<double> wall;  // nullopt: skipped
    std::optional<double> floor;
    std::string target;  // e.g. "<= 1.25"
};

void print_table(const std::vector<Row>& rows) {
    std::printf("%-40s %7s %9s %9s %9s %7s %8s\n", "operation", "keys", "wall s", "keys/s", "floor s",
                "ratio", "target");
    std::printf("%s\n", std::string(40 + 7 + 9 * 3 + 7 + 8 + 6, '-').c_str());
    for (const auto& r : rows) {
        std::string wall = r.wall ? fmt("%.3f", *r.wall) : "skipped";
        std::string rate = r.wall && *r.wall > 0 ? fmt("%.0f", r.keys / *r.wall) : "-";
        std::string floor = r.floor ? fmt("%.3f", *r.floor) : "-";
        std::string ratio = r.wall && r.floor && *r.floor > 0 ? fmt("%.2f", *r.wall / *r.floor) : "-";
        std::printf("%-40s %7zu %9s %9s %9s %7s %8s\n", r.operation.c_str(), r.keys, wall.c_str(),
                    rate.c_str(), floor.c_str(), ratio.c_str(), r.target.empty() ? "-" : r.target.c_str());
    }
}

// Progress callbacks give a cheap split of a library call: before the first key, the key loop,
// after the last key.
struct Split {
    Clock::time_point start, first, last, end;
    bool seen = false;
    bk::Progress progress() {
        return [this](std::size_t done, std::size_t total) {
            auto now = Clock::now();
            if (!seen) {
                first = now;
                seen = true;
            }
            if (done == total) last = now;
        };
    }
    std::string describe() const {
        if (!seen) return "(no progress reported)";
        return fmt("before first key %.3f s, key loop %.3f s, after last key %.3f s",
                   seconds_between(start, first), seconds_between(first, last),
                   seconds_between(last, end));
    }
};

// Bytes the process has allocated with malloc and not freed (glibc's mallinfo2; SoftHSM runs
// in-process, so this includes its objects).
long heap_in_use() { return static_cast<long>(mallinfo2().uordblks); }

std::string mib(long kib) { return fmt("%.1f", static_cast<double>(kib) / 1024.0); }

int run_bench(const Options& o, Spawner& sp, const std::string& dir) {
    const std::size_t n = o.keys;
    const auto run_start = Clock::now();
    std::vector<std::pair<std::string, Clock::time_point>> phases;
    auto stamp = [&](const char* name) { phases.emplace_back(name, Clock::now()); };
    std::vector<Row> rows;
    std::vector<std::string> notes;
    ::setenv(kPinEnv, kUserPin, 1);

    // ---- setup: two tokens, a store of n keys on the source ----
    auto t0 = Clock::now();
    make_softhsm(sp, dir);
    const auto src = token_options(o, kSrcLabel), dst = token_options(o, kDstLabel);
    const std::string store_dir = dir + "/store";
    {
        auto ctx = p11::open_token(src, true);
        ks::init_store(ctx, store_dir, {});
    }
    auto t_init = Clock::now();
    std::vector<ks::KeyId> ids;
    ids.reserve(n);
    int width = std::max<int>(6, static_cast<int>(std::to_string(n).size()));
    const std::size_t clients = (n + o.kinds.size() - 1) / o.kinds.size();
    for (std::size_t i = 0; ids.size() < n; ++i) {
        std::string num = std::to_string(i);
        std::string client = "client-" + std::string(static_cast<std::size_t>(width) - num.size(), '0') + num;
        for (auto kind : o.kinds)
            if (ids.size() < n) ids.push_back(ks::KeyId::client(kind, client));
    }
    {
        auto os = ks::open_store(src, store_dir, true);
        os.store->generate(ids);
    }
    auto t_store = Clock::now();
    stamp("setup");
    ids.clear();
    ids.shrink_to_fit();
    std::uintmax_t ring_bytes = 0;  // the mean size of a ring file
    {
        std::error_code ec;
        std::uintmax_t files = 0, total = 0;
        for (const auto& e : fs::recursive_directory_iterator(store_dir + "/keys", ec))
            if (e.is_regular_file()) {
                total += e.file_size();
                ++files;
            }
        ring_bytes = files ? (total + files / 2) / files : 0;
    }

    std::string kind_names;
    for (auto k : o.kinds)
    {
        std::string id = ks::KeyId::client(k, "client-0").str();  // the id's last part names the kind
        kind_names += std::string(kind_names.empty() ? "" : ", ") + "client/<id>" + id.substr(id.rfind('/'));
    }
    std::printf("backup-bench: %zu keys (%zu clients x %s%s; one version each)\n", n, clients, kind_names.c_str(),
                n % o.kinds.size() ? "; the last client has fewer" : "");
    std::printf("module %s; tokens '%s' (source) and '%s' (destination); PIN from env:%s\n",
                o.module.c_str(), kSrcLabel, kDstLabel, kPinEnv);
    std::printf("work dir %s\nsetup (not in the tables): tokens + store init %.3f s, "
                "KeyStore::generate of %zu keys %.3f s; a ring file is %ju bytes (mean)\n\n",
                dir.c_str(), seconds_between(t0, t_init), n, seconds_between(t_init, t_store),
                ring_bytes);
    std::fflush(stdout);

    const std::string bundle = dir + "/lib.kwbundle", secret = dir + "/lib.kwsecret";
    FloorTemplates ft;
    std::vector<std::uint8_t> bkey(32);
    double export_wall = 0, export_open = 0, verify_wall = 0, export_floor = 0, verify_floor = 0;
    Blobs backup_blobs, store_blobs;
    double mac_verify_s = 0, mac_sign_s = 0;
    long softhsm_growth = 0;
    std::size_t softhsm_keys = 0;  // keys of the verify floor's first chunk (before a restart)
    Split ex_split, ve_split, im_split;

    // Every timed block below starts from a fresh SoftHSM state: the previous block's contexts are
    // gone, so its last module instance was finalized (C_Finalize). SoftHSM keeps every session
    // object it ever created (destroyed ones too) until C_Finalize, and its calls slow down as
    // that set grows: a floor run in a session that already did the export would be inflated.
    {
        // ---- (1) export through the library, on the store opened as `keywarden export --all`
        // opens it: read-only, for one streamed pass ----
        auto a = Clock::now();
        auto os = ks::open_store_streaming(src, store_dir);
        auto b = Clock::now();
        bk::ExportOptions eo;
        eo.bundle_path = bundle;
        eo.secret_path = secret;
        eo.all = true;
        eo.private_keys = true;
        ex_split.start = b;
        eo.progress = ex_split.progress();
        auto sum = bk::export_bundle(os, eo);
        auto c = Clock::now();
        ex_split.end = c;
        if (sum.wrapped_keys != n || sum.entries != n)
            throw std::runtime_error("export wrote " + std::to_string(sum.wrapped_keys) + " keys, expected " +
                                     std::to_string(n));
        export_wall = seconds_between(b, c);
        export_open = seconds_between(a, b);
        rows.push_back({"open_store_streaming (source)", n, export_open, std::nullopt, ""});
        notes.push_back("export split (progress callback): " + ex_split.describe() +
                        fmt("; bundle %.1f MB", static_cast<double>(sum.bytes) / 1e6));
    }
    stamp("export");
    {
        // ---- (2) verify through the library, on a freshly opened source token ----
        auto ctx = p11::open_token(src, true);
        auto d = Clock::now();
        ve_split.start = d;
        auto rep = bk::verify_bundle(bundle, secret, ctx, nullptr, ve_split.progress());
        auto e = Clock::now();
        ve_split.end = e;
        if (!rep.ok() || rep.unwrapped != n)
            throw std::runtime_error("verify_bundle unwrapped " + std::to_string(rep.unwrapped) + " keys with " +
                                     std::to_string(rep.problems.size()) + " problems");
        verify_wall = seconds_between(d, e);
        notes.push_back("verify split (progress callback): " + ve_split.describe());
    }
    stamp("verify");
    {
        // ---- the export floor, on the source token, one session, under the store's master key ----
        auto os = ks::open_store(src, store_dir, false);
        store_blobs.wrapped.reserve(n);
        for (const auto& id : os.store->key_ids())
            for (const auto& v : os.store->load(id).versions) {
                store_blobs.wrapped.push_back(v.wrapped);
                store_blobs.kinds.push_back(v.key_type);
            }
        if (store_blobs.wrapped.size() != n)
            throw std::runtime_error("the store holds " + std::to_string(store_blobs.wrapped.size()) +
                                     " key versions, expected " + std::to_string(n));
        backup_blobs.kinds = store_blobs.kinds;
        os.token.session->random(bkey);
        auto backup = make_floor_backup_key(*os.token.session, bkey);
        export_floor = chunked_floor(
            n,
            [&](std::size_t first, std::size_t last) {
                auto f0 = Clock::now();
                auto part = floor_export(*os.token.session, os.encryption, os.mechanism, backup.handle(), ft,
                                         store_blobs.part(first, last - first));
                double t = seconds_between(f0, Clock::now());
                for (auto& b : part) backup_blobs.wrapped.push_back(std::move(b));
                return t;
            },
            [&] {
                p11::restart_token(os.token);
                ks::rebind_master_keys(os);
                backup = make_floor_backup_key(*os.token.session, bkey);
            });
        mac_verify_s = time_ring_macs(*os.token.session, os.signature, n, ring_bytes, true);
    }
    stamp("export floor, ring MACs (verify)");
    {
        // ---- the verify floor, on a freshly opened source token, one session ----
        auto ctx = p11::open_token(src, true);
        auto backup = make_floor_backup_key(*ctx.session, bkey);
        long heap0 = heap_in_use();
        std::size_t checked = 0;
        verify_floor = chunked_floor(
            n,
            [&](std::size_t first, std::size_t last) {
                auto f1 = Clock::now();
                checked += floor_verify(*ctx.session, backup.handle(), ft, backup_blobs.part(first, last - first));
                double t = seconds_between(f1, Clock::now());
                if (first == 0) {
                    softhsm_keys = last;
                    softhsm_growth = heap_in_use() - heap0;  // before any restart
                }
                return t;
            },
            [&] {
                p11::restart_token(ctx);
                backup = make_floor_backup_key(*ctx.session, bkey);
            });
        if (checked != n) throw std::runtime_error("the verify floor checked too few keys");
    }
    stamp("verify floor");
    rows.push_back({"export_bundle (as measured)", n, export_wall, export_floor, ""});
    // Export ends with a complete verify of what it wrote (the issue asks for that self-check), so
    // its token floor is the export floor plus the verify floor.
    rows.push_back({"export_bundle vs export+verify floors", n, export_wall, export_floor + verify_floor,
                    "<= 1.25"});
    rows.push_back({"open + export_bundle vs the same floors", n, export_open + export_wall, export_floor + verify_floor,
                    "<= 1.25"});
    rows.push_back({"export minus self-check (export-verify)", n, export_wall - verify_wall, export_floor, ""});
    rows.push_back({"verify_bundle", n, verify_wall, verify_floor, "<= 1.25"});

    // ---- (3) import through the library: init a new store on the destination token ----
    {
        // A dry run (plus token open): pass 1, then every key unwrapped and checked in the
        // destination token, as verify does; it writes nothing.
        bk::ImportOptions io;
        io.bundle_path = bundle;
        io.secret_path = secret;
        io.keystore_path = dir + "/restored-dry";
        io.init = true;
        io.dry_run = true;
        auto a = Clock::now();
        auto sum = bk::import_bundle(dst, io);
        rows.push_back({"import_bundle --dry-run (trial unwraps)", sum.entries, seconds_between(a, Clock::now()),
                        std::nullopt, ""});
    }
    stamp("import dry run");
    double import_wall = 0;
    {
        bk::ImportOptions io;
        io.bundle_path = bundle;
        io.secret_path = secret;
        io.keystore_path = dir + "/restored";
        io.init = true;
        auto a = Clock::now();
        im_split.start = a;
        io.progress = im_split.progress();
        auto sum = bk::import_bundle(dst, io);
        auto b = Clock::now();
        im_split.end = b;
        if (sum.wrapped_keys != n || sum.entries != n)
            throw std::runtime_error("import restored " + std::to_string(sum.wrapped_keys) + " keys, expected " +
                                     std::to_string(n));
        import_wall = seconds_between(a, b);
        notes.push_back("import split (progress callback): " + im_split.describe());
    }
    stamp("import");
    double import_floor = 0;
    {
        // The floor under the new store's real master key (a token object) on the destination.
        auto os = ks::open_store(dst, dir + "/restored", false);
        if (os.store->key_ids().size() != n) throw std::runtime_error("the restored store has the wrong size");
        auto backup = make_floor_backup_key(*os.token.session, bkey);
        // Both orders, each from a fresh module state: one key at a time, and in the library's
        // batches. The faster is the floor.
        std::map<std::size_t, double> by_batch;
        for (std::size_t batch : {std::size_t{1}, p11::token_batch()}) {
            if (by_batch.count(batch)) continue;
            p11::restart_token(os.token);
            ks::rebind_master_keys(os);
            backup = make_floor_backup_key(*os.token.session, bkey);
            std::size_t done = 0;
            by_batch[batch] = chunked_floor(
                n,
                [&](std::size_t first, std::size_t last) {
                    auto a = Clock::now();
                    done += floor_import(*os.token.session, backup.handle(), os.encryption, os.mechanism, ft,
                                         backup_blobs.part(first, last - first), batch);
                    return seconds_between(a, Clock::now());
                },
                [&] {
                    p11::restart_token(os.token);
                    ks::rebind_master_keys(os);
                    backup = make_floor_backup_key(*os.token.session, bkey);
                });
            if (done != n) throw std::runtime_error("the import floor rewrapped too few keys");
        }
        import_floor = by_batch.begin()->second;
        std::string orders;
        for (const auto& [batch, secs] : by_batch) {
            import_floor = std::min(import_floor, secs);
            orders += fmt(" %zu key(s) at a time %.3f s;", batch, secs);
        }
        notes.push_back("import floor, the faster of:" + orders);
        mac_sign_s = time_ring_macs(*os.token.session, os.signature, n, ring_bytes, false);
    }
    stamp("import floor, ring MACs (sign), closing the store");
    rows.push_back({"import_bundle (--init, destination)", n, import_wall, import_floor, "<= 1.5"});
    // The store's format needs one more token call per ring: the ring file's MAC (C_Sign).
    rows.push_back({"import vs floor + ring MACs (C_Sign)", n, import_wall, import_floor + mac_sign_s, ""});

    // ---- (3a) --jobs J: the floors in 1 and in J processes ----
    struct Speedup {
        std::string what;
        std::vector<double> one, many;  // one time per round
    };
    std::vector<Speedup> floor_speedups;
    if (o.jobs >= 2) {
        // One floor in 1 and in J processes. In each process: the token restarted (the master
        // keys found again if `rebind`), the floor's backup key made; then floor(backup, first,
        // count) over the process's keys, chunked and restarted as chunked_floor does.
        using Floor = std::function<void(CK_OBJECT_HANDLE, std::size_t, std::size_t)>;
        auto both = [&](const std::string& what, ks::OpenStore& os, bool rebind, const Floor& floor) {
            auto prepare = [&](std::size_t, std::size_t first, std::size_t last) -> TimedRun {
                auto restart = [&os, &bkey, rebind] {
                    p11::restart_token(os.token);
                    if (rebind) ks::rebind_master_keys(os);
                    return make_floor_backup_key(*os.token.session, bkey);
                };
                auto backup = std::make_shared<p11::SessionObject>(restart());
                return [&floor, first, last, backup, restart] {
                    return chunked_floor(
                        last - first,
                        [&](std::size_t a, std::size_t b) {
                            auto f0 = Clock::now();
                            floor(backup->handle(), first + a, b - a);
                            return seconds_between(f0, Clock::now());
                        },
                        [&] { *backup = restart(); });
                };
            };
            Speedup sp{what, {}, {}};
            for (std::size_t r = 0; r < o.repeat; ++r) {
                sp.one.push_back(floor_in_processes(1, n, prepare));
                sp.many.push_back(floor_in_processes(o.jobs, n, prepare));
            }
            floor_speedups.push_back(std::move(sp));
        };
        {
            auto os = ks::open_store(src, store_dir, false);
            both("floor export", os, true, [&](CK_OBJECT_HANDLE backup, std::size_t first, std::size_t count) {
                floor_export(*os.token.session, os.encryption, os.mechanism, backup, ft,
                             store_blobs.part(first, count));
            });
            both("floor verify", os, false, [&](CK_OBJECT_HANDLE backup, std::size_t first, std::size_t count) {
                floor_verify(*os.token.session, backup, ft, backup_blobs.part(first, count));
            });
        }
        {
            auto os = ks::open_store(dst, dir + "/restored", false);
            both("floor import", os, true, [&](CK_OBJECT_HANDLE backup, std::size_t first, std::size_t count) {
                floor_import(*os.token.session, backup, os.encryption, os.mechanism, ft,
                             backup_blobs.part(first, count), p11::token_batch());
            });
        }
        stamp("floors in 1 and J processes");
    }

    // ---- (4) the same as CLI processes, for peak RSS ----
    struct CliRun {
        std::string name;
        std::optional<ChildResult> r;
    };
    std::vector<CliRun> cli;
    std::map<std::string, std::vector<ChildResult>> jobs_runs;  // --jobs: each CLI pair's runs, per round
    bool have_cli = ::access(o.cli.c_str(), X_OK) == 0;
    if (have_cli) {
        const std::string cb = dir + "/cli.kwbundle", cs = dir + "/cli.kwsecret";
        auto env = [&](const std::string& keystore) -> std::map<std::string, std::optional<std::string>> {
            return {{"KEYWARDEN_MODULE", o.module},
                    {"KEYWARDEN_KEYSTORE", keystore},
                    {"KEYWARDEN_PIN", std::string(kUserPin)},
                    {"KEYWARDEN_TOKEN", std::nullopt},
                    {"KEYWARDEN_PIN_SOURCE", std::nullopt}};
        };
        // One keywarden process; its output in files named after `tag`. A failure stops the bench.
        auto spawn = [&](const std::string& name, const std::vector<std::string>& args, const std::string& keystore,
                         const std::string& tag) {
            std::string out = dir + "/cli-" + tag + ".out", err = dir + "/cli-" + tag + ".err";
            auto r = sp.run(args, env(keystore), out, err);
            if (r.status != 0)
                throw std::runtime_error("'" + o.cli + " " + name + "' failed (exit " + std::to_string(r.status) +
                                         "): " + read_text(err));
            return r;
        };
        auto run = [&](const std::string& name, std::vector<std::string> args, const std::string& keystore) {
            cli.push_back({name, spawn(name, args, keystore, name)});
        };
        // The measurement floor of the method: a tiny program through the same spawner.
        {
            auto r = sp.run({"/bin/true"}, {}, "/dev/null", "/dev/null");
            cli.push_back({"/bin/true (method floor)", r});
        }
        run("export", {o.cli, "--token", std::string("label:") + kSrcLabel, "export", "--all", "--private-keys",
                       "--key-bundle-file", cb, "--key-bundle-secret", cs},
            store_dir);
        run("verify", {o.cli, "--token", std::string("label:") + kSrcLabel, "verify", "--key-bundle-file", cb,
                       "--key-bundle-secret", cs},
            store_dir);
        run("import", {o.cli, "--token", std::string("label:") + kDstLabel, "import", "--init",
                       "--key-bundle-file", cb, "--key-bundle-secret", cs},
            dir + "/restored-cli");
        if (o.jobs >= 2) {
            const std::string j = std::to_string(o.jobs), cbj = dir + "/cli-j.kwbundle", csj = dir + "/cli-j.kwsecret";
            run("export --jobs " + j, {o.cli, "--token", std::string("label:") + kSrcLabel, "export", "--all",
                                       "--private-keys", "--jobs", j, "--key-bundle-file", cbj,
                                       "--key-bundle-secret", csj},
                store_dir);
            run("verify --jobs " + j, {o.cli, "--token", std::string("label:") + kSrcLabel, "verify", "--jobs", j,
                                       "--key-bundle-file", cb, "--key-bundle-secret", cs},
                store_dir);
            run("import --jobs " + j, {o.cli, "--token", std::string("label:") + kDstLabel, "import", "--init",
                                       "--jobs", j, "--key-bundle-file", cb, "--key-bundle-secret", cs},
                dir + "/restored-cli-j");
            // Further rounds of the same pairs (--repeat), alternating 1 and J jobs; their times go
            // only into the speed-up table.
            for (const auto& c : cli) jobs_runs[c.name].push_back(*c.r);
            for (std::size_t round = 1; round < o.repeat; ++round) {
                std::string tag = std::to_string(round);
                auto again = [&](const std::string& name, std::vector<std::string> args, const std::string& keystore) {
                    jobs_runs[name].push_back(spawn(name, args, keystore, "r"));
                };
                for (const std::string& jj : {std::string("1"), j}) {
                    std::string name = jj == "1" ? "" : " --jobs " + j;
                    std::string b = dir + "/cli-r" + tag + "-" + jj + ".kwbundle", sc = dir + "/cli-r" + tag + "-" + jj + ".kwsecret";
                    again("export" + name, {o.cli, "--token", std::string("label:") + kSrcLabel, "export", "--all",
                                            "--private-keys", "--jobs", jj, "--key-bundle-file", b, "--key-bundle-secret", sc},
                          store_dir);
                    fs::remove(b);
                    fs::remove(sc);
                }
                for (const std::string& jj : {std::string("1"), j})
                    again("verify" + (jj == "1" ? std::string() : " --jobs " + j),
                          {o.cli, "--token", std::string("label:") + kSrcLabel, "verify", "--jobs", jj,
                           "--key-bundle-file", cb, "--key-bundle-secret", cs},
                          store_dir);
                for (const std::string& jj : {std::string("1"), j}) {
                    std::string store = dir + "/restored-cli-r" + tag + "-" + jj;
                    again("import" + (jj == "1" ? std::string() : " --jobs " + j),
                          {o.cli, "--token", std::string("label:") + kDstLabel, "import", "--init", "--jobs", jj,
                           "--key-bundle-file", cb, "--key-bundle-secret", cs},
                          store);
                    fs::remove_all(store);
                }
            }
        }
    }
    stamp("CLI runs");

    print_table(rows);
    std::printf("\n");
    for (const auto& s : notes) std::printf("%s\n", s.c_str());
    std::printf("export self-check: export_bundle ends with a full verify_bundle of what it wrote; the\n"
                "  'export minus self-check' row subtracts the separately measured verify_bundle time (fresh\n"
                "  token context; the self-check runs after the export's own session objects, so it is likely\n"
                "  slower than that, and the row is an upper bound for export without its self-check).\n");
    std::printf("floor export: C_UnwrapKey (master key, store blob) + C_WrapKey (backup key, "
                "CKM_AES_KEY_WRAP_PAD) + C_DestroyObject per key\n");
    std::printf("floor verify: C_UnwrapKey (backup key) + check value + C_DestroyObject per key\n");
    std::printf("floor import: C_UnwrapKey (backup key) + check value + C_WrapKey (new master key) + "
                "C_DestroyObject per key\n");
    std::printf("check value, the token call of the key's kind: AES C_Encrypt CKM_AES_ECB (16 bytes), HMAC C_Sign\n"
                "  CKM_SHA256_HMAC (32 bytes), EC C_Sign CKM_ECDSA (32-byte digest; the library's check of that\n"
                "  signature against the public key runs on the host and is not in the floor)\n");
    std::printf("floors run in one session on the operation's token (source for export/verify, destination "
                "for import),\neach from a fresh module state, as is every library call timed above; like the "
                "library, they restart\nthe module every %zu keys (KEYWARDEN_TOKEN_RESTART_EVERY; the restarts "
                "are not timed in the floors)\n",
                p11::token_restart_every());
    std::printf("SoftHSM keeps each destroyed session object until C_Finalize: the heap in use grew %.1f MiB\n"
                "  during the verify floor's first %zu keys (C_UnwrapKey + check value + C_DestroyObject) = %.0f bytes "
                "per key\n",
                static_cast<double>(softhsm_growth) / (1024.0 * 1024.0), softhsm_keys,
                static_cast<double>(softhsm_growth) / static_cast<double>(std::max<std::size_t>(softhsm_keys, 1)));
    std::printf("ring-file MACs in the token, not in the floors (the store MACs every ring file with its master\n"
                "signature key: C_Sign when import stages a ring, C_Verify when a ring is loaded with its MAC checked):\n");
    std::printf("  C_Verify HMAC-SHA256 of %ju bytes: %.3f s for %zu = %.1f us/key\n", ring_bytes, mac_verify_s, n,
                mac_verify_s / static_cast<double>(n) * 1e6);
    std::printf("  C_Sign   HMAC-SHA256 of %ju bytes: %.3f s for %zu = %.1f us/key\n", ring_bytes, mac_sign_s, n,
                mac_sign_s / static_cast<double>(n) * 1e6);

    std::printf("\nCLI processes (%s; posix_spawn from a spawner forked at start-up, rusage from wait4):\n",
                have_cli ? o.cli.c_str() : "skipped: no executable, pass --cli PATH");
    if (have_cli) {
        std::printf("%-26s %7s %9s %8s %8s %14s %10s\n", "command", "keys", "wall s", "user s", "sys s",
                    "peak RSS MiB", "target");
        std::printf("%s\n", std::string(26 + 7 + 9 + 8 + 8 + 14 + 10 + 6, '-').c_str());
        for (const auto& c : cli) {
            bool floor_row = c.name.starts_with("/bin/true");
            std::printf("%-26s %7s %9.3f %8.3f %8.3f %14s %10s\n",
                        floor_row ? c.name.c_str() : ("keywarden " + c.name).c_str(),
                        floor_row ? "-" : std::to_string(n).c_str(), c.r->wall, c.r->user, c.r->sys,
                        mib(c.r->maxrss_kib).c_str(), floor_row ? "-" : "<= 64");
        }
        std::printf("RSS target: <= 64 MiB at 100,000 keys, and at most +8 MiB from 10,000 to 100,000 keys\n"
                    "(compare the peak RSS column of a --keys 10000 and a --keys 100000 run)\n");
        for (const auto& c : cli)
            if (c.name == "import")
                std::printf("import, CLI vs library: CLI %.3f s, library import_bundle %.3f s; difference %.3f s "
                            "(process start, module load, C_Initialize, login, output)\n",
                            c.r->wall, import_wall, c.r->wall - import_wall);
        for (const auto& c : cli)
            if (c.name == "export")
                std::printf("export, CLI vs library: CLI %.3f s, library open_store + export_bundle %.3f s\n",
                            c.r->wall, rows[0].wall.value_or(0) + export_wall);
    }

    if (o.jobs >= 2) {
        std::printf("\nspeed-up with %zu processes (--jobs %zu), measured in this run:\n", o.jobs, o.jobs);
        std::printf("%-28s %7s %10s %10s %9s\n", "operation", "keys", "1 proc s", fmt("%zu procs s", o.jobs).c_str(),
                    "speed-up");
        std::printf("%s\n", std::string(28 + 7 + 10 + 10 + 9 + 4, '-').c_str());
        auto median = [](std::vector<double> v) {
            std::sort(v.begin(), v.end());
            return v.empty() ? 0.0 : v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
        };
        auto line = [&](const std::string& what, const std::vector<double>& one, const std::vector<double>& many) {
            double a = median(one), b = median(many);
            std::string rounds;
            if (one.size() > 1)
                for (std::size_t i = 0; i < one.size() && i < many.size(); ++i)
                    rounds += fmt(" %.2f", many[i] > 0 ? one[i] / many[i] : 0.0);
            std::printf("%-28s %7zu %10.3f %10.3f %8.2fx%s\n", what.c_str(), n, a, b, b > 0 ? a / b : 0.0,
                        rounds.empty() ? "" : ("   rounds:" + rounds).c_str());
        };
        for (const auto& f : floor_speedups) line(f.what, f.one, f.many);
        // The CPU time of the CLI runs (user + sys, the process and its workers): with C cores, J
        // processes cannot take less wall time than their CPU time / min(J, C). So a 1-process run
        // that already keeps more than one core busy (keywarden's reading and writing threads)
        // leaves less to gain; 'bound' is the speed-up the J-process runs' CPU time allows.
        const long cores = std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN));
        const double usable = static_cast<double>(std::min<long>(static_cast<long>(o.jobs), cores));
        std::vector<std::string> cpu_lines;
        for (const char* cmd : {"export", "verify", "import"}) {
            auto one = jobs_runs.find(cmd), many = jobs_runs.find(std::string(cmd) + " --jobs " + std::to_string(o.jobs));
            if (one == jobs_runs.end() || many == jobs_runs.end()) continue;
            auto walls = [](const std::vector<ChildResult>& v) {
                std::vector<double> w;
                for (const auto& r : v) w.push_back(r.wall);
                return w;
            };
            auto cpus = [](const std::vector<ChildResult>& v) {
                std::vector<double> c;
                for (const auto& r : v) c.push_back(r.user + r.sys);
                return c;
            };
            line(std::string("keywarden ") + cmd, walls(one->second), walls(many->second));
            double w1 = median(walls(one->second)), c1 = median(cpus(one->second)), cj = median(cpus(many->second));
            cpu_lines.push_back(fmt("%-28s %10.3f %10.3f %10.2f %10.2fx", (std::string("keywarden ") + cmd).c_str(),
                                    c1, cj, w1 > 0 ? c1 / w1 : 0.0, cj > 0 ? w1 * usable / cj : 0.0));
        }
        std::printf("floors in processes: each forked process restarts the module, makes its keys, then all start\n"
                    "  together on their share of the keys; the time is the slowest process's (restarts not timed).\n"
                    "  The 1-process row runs the same way. keywarden rows: wall time of the CLI processes above.\n"
                    "  With --repeat R: the median of R rounds (1 and J processes alternating); 'rounds' lists\n"
                    "  each round's speed-up.\n"
                    "target: at least 1.7x with 2 jobs on a 2-core machine\n");
        if (!cpu_lines.empty()) {
            std::printf("\nCPU time of those runs (user + sys, medians), %ld cores online:\n", cores);
            std::printf("%-28s %10s %10s %10s %11s\n", "operation", "1 proc s", fmt("%zu procs s", o.jobs).c_str(),
                        "1p cores", "bound");
            std::printf("%s\n", std::string(28 + 10 + 10 + 10 + 11 + 4, '-').c_str());
            for (const auto& l : cpu_lines) std::printf("%s\n", l.c_str());
            std::printf("1p cores: CPU time / wall time of the 1-process run (above 1: its second thread reads or\n"
                        "  writes files while the first waits on the token). bound: the speed-up at which the %zu-process\n"
                        "  runs would keep min(%zu, cores) cores busy all the time = 1-proc wall x min(%zu, cores) /\n"
                        "  %zu-proc CPU time. No run can beat it on this machine.\n",
                        o.jobs, o.jobs, o.jobs, o.jobs);
        }
    }

    std::printf("\nrun timeline (s):");
    Clock::time_point prev = run_start;
    for (const auto& [name, t] : phases) {
        std::printf(" %s %.2f;", name.c_str(), seconds_between(prev, t));
        prev = t;
    }
    std::printf(" total %.2f\n", seconds_between(run_start, prev));

    struct rusage self {};
    getrusage(RUSAGE_SELF, &self);
    std::printf("\nthis process: peak RSS %s MiB (library runs, floors and SoftHSM in-process)\n",
                mib(self.ru_maxrss).c_str());
    std::fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Options o = parse_options(argc, argv);
    std::string dir;
    int rc = 1;
    try {
        Spawner sp;  // first, while this process is still small
        dir = make_temp_dir("kw-backup-bench");
        try {
            rc = run_bench(o, sp, dir);
        } catch (const keywarden::Error& e) {
            std::cerr << "backup-bench: " << e.what() << "\n";
            if (!e.hint().empty()) std::cerr << "  hint: " << e.hint() << "\n";
        }
    } catch (const std::exception& e) {
        std::cerr << "backup-bench: " << e.what() << "\n";
    }
    if (!dir.empty()) {
        if (o.keep_dir) {
            std::printf("kept %s (SOFTHSM2_CONF=%s/softhsm2.conf)\n", dir.c_str(), dir.c_str());
        } else {
            std::error_code ec;
            fs::remove_all(dir, ec);
        }
    }
    return rc;
}
