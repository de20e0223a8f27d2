// SPDX-License-Identifier: Apache-2.0
// keystore-bench: times KeyStore::generate, list and verify on a private SoftHSM token, next to
// the raw PKCS#11 floor for the same token operations, and prints a plain-text table.
//
//   keystore-bench [--clients N | N] [--keep-dir] [--cli PATH] [--module PATH]
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
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

#include "bench_common.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/keystore.hpp"
#include "keywarden/pkcs11.hpp"
#include "keywarden/storage.hpp"
#include "keywarden/token_protector.hpp"
#include "process.hpp"

#ifndef KEYWARDEN_BENCH_SOURCE_ROOT
#define KEYWARDEN_BENCH_SOURCE_ROOT "."
#endif


namespace {

namespace fs = std::filesystem;
namespace p11 = keywarden::pkcs11;
namespace ks = keywarden::keystore;
using keywarden::Exposure;
using keywarden::KeyKind;
using namespace kwbench;

constexpr const char* kTokenLabel = "keywarden-bench";
constexpr const char* kUserPin = "bench-user-1234";
constexpr const char* kSoPin = "bench-so-1234";


// DER OID of prime256v1, as CKA_EC_PARAMS (as in the library's generate_session_key).
constexpr std::array<std::uint8_t, 10> kP256Params = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                                      0xce, 0x3d, 0x03, 0x01, 0x07};

struct Options {
    std::size_t clients = 1000;
    bool keep_dir = false;
    std::string cli = "build/keywarden";
    std::string module;
};

[[noreturn]] void usage_exit(const std::string& problem) {
    std::cerr << "keystore-bench: " << problem << "\n"
              << "usage: keystore-bench [--clients N | N] [--keep-dir] [--cli PATH] "
                 "[--module PATH]\n";
    std::exit(2);
}

std::size_t parse_count(const std::string& s) {
    if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos)
        usage_exit("not a client count: '" + s + "'");
    std::size_t n = std::stoul(s);
    if (n == 0) usage_exit("the client count must be at least 1");
    return n;
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
        if (a == "--clients") o.clients = parse_count(value(a));
        else if (a.starts_with("--clients=")) o.clients = parse_count(a.substr(10));
        else if (a == "--keep-dir") o.keep_dir = true;
        else if (a == "--cli") o.cli = value(a);
        else if (a.starts_with("--cli=")) o.cli = a.substr(6);
        else if (a == "--module") o.module = value(a);
        else if (a.starts_with("--module=")) o.module = a.substr(9);
        else if (a == "-h" || a == "--help") {
            std::cout << "usage: keystore-bench [--clients N | N] [--keep-dir] [--cli PATH] "
                         "[--module PATH]\n"
                         "  --clients N    clients to generate (3 keys each; default 1000)\n"
                         "  --keep-dir     keep the temporary token and store directory\n"
                         "  --cli PATH     keywarden binary to time 'keywarden list' with "
                         "(default build/keywarden; skipped if absent)\n"
                         "  --module PATH  PKCS#11 module (default "
                         "/usr/lib/softhsm/libsofthsm2.so)\n";
            std::exit(0);
        } else if (!a.starts_with("-")) o.clients = parse_count(a);
        else usage_exit("unknown option " + a);
    }
    return o;
}

// Runs a program with stdin from /dev/null and stdout/stderr into files; returns the exit code.
// env entries with no value are removed from the child's environment.
int run_process(const std::vector<std::string>& args,
                const std::map<std::string, std::optional<std::string>>& env,
                const std::string& out_path, const std::string& err_path) {
    kwtest::ProcessOptions po;
    po.out_path = out_path;
    po.err_path = err_path;
    return kwtest::run_process(args, env, po).code;
}

// A private SoftHSM token directory, as tests/support.cpp makes one: render
// hsm-config/softhsm2.conf.in, point SOFTHSM2_CONF at it, and initialise one token.
void make_softhsm(const std::string& dir) {
    fs::create_directories(dir + "/tokens");
    std::string root = env_or("KEYWARDEN_SOURCE_ROOT", KEYWARDEN_BENCH_SOURCE_ROOT);
    std::string conf = read_text(root + "/hsm-config/softhsm2.conf.in");
    if (conf.empty()) conf = kFallbackConf;
    for (std::size_t p; (p = conf.find("@TOKENDIR@")) != std::string::npos;)
        conf.replace(p, 10, dir + "/tokens");
    std::string conf_path = dir + "/softhsm2.conf";
    std::ofstream(conf_path) << conf;
    // SoftHSM reads the config again at every C_Initialize; the CLI child inherits it.
    ::setenv("SOFTHSM2_CONF", conf_path.c_str(), 1);
    int rc = run_process({"softhsm2-util", "--init-token", "--free", "--label", kTokenLabel,
                          "--so-pin", kSoPin, "--pin", kUserPin},
                         {}, "/dev/null", dir + "/softhsm2-util.err");
    if (rc != 0)
        throw std::runtime_error("softhsm2-util --init-token failed (exit " + std::to_string(rc) +
                                 "): " + read_text(dir + "/softhsm2-util.err"));
}

struct MasterHandles {
    CK_OBJECT_HANDLE enc = CK_INVALID_HANDLE, sig = CK_INVALID_HANDLE;
    CK_MECHANISM_TYPE mech = 0;
};

ks::MasterKeys master_keys(const std::shared_ptr<p11::Session>& s, const MasterHandles& m) {
    ks::MasterKeys k;
    k.protector = std::make_unique<p11::AesWrapProtector>(s, m.enc, m.mech);
    k.mac = std::make_unique<p11::TokenMacKey>(s, m.sig);
    k.backend = std::make_unique<p11::TokenKeyBackend>(s);
    return k;
}

// ---- the raw PKCS#11 floor -----------------------------------------------------------------

// Attribute templates built once, outside the timed loops: the same attributes the library
// uses (generate_session_key, fill_key_template).
struct FloorTemplates {
    p11::Template gen_aes, gen_hmac, gen_ec_pub, gen_ec_priv;
    p11::Template unwrap_aes, unwrap_hmac, unwrap_ec;
};

void fill_floor_templates(FloorTemplates& t) {
    p11::fill_key_template(t.gen_aes, KeyKind::aes, Exposure::sensitive);
    t.gen_aes.add_ulong(CKA_VALUE_LEN, 32);
    p11::fill_key_template(t.gen_hmac, KeyKind::generic_secret, Exposure::sensitive);
    t.gen_hmac.add_ulong(CKA_VALUE_LEN, 32);
    t.gen_ec_pub.add_ulong(CKA_CLASS, CKO_PUBLIC_KEY).add_ulong(CKA_KEY_TYPE, CKK_EC);
    t.gen_ec_pub.add_bytes(CKA_EC_PARAMS, kP256Params).add_bool(CKA_TOKEN, false);
    t.gen_ec_pub.add_bool(CKA_VERIFY, true);
    t.gen_ec_priv.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
    t.gen_ec_priv.add_bool(CKA_SENSITIVE, true).add_bool(CKA_EXTRACTABLE, true);
    t.gen_ec_priv.add_bool(CKA_SIGN, true).add_bool(CKA_DERIVE, true);
    p11::fill_key_template(t.unwrap_aes, KeyKind::aes, Exposure::sensitive);
    p11::fill_key_template(t.unwrap_hmac, KeyKind::generic_secret, Exposure::sensitive);
    p11::fill_key_template(t.unwrap_ec, KeyKind::ec_p256_private, Exposure::sensitive);
}

struct WrappedKey {
    KeyKind kind;
    std::vector<std::uint8_t> blob;
};

struct CheckInputs {
    std::array<std::uint8_t, 16> zeros16{};
    std::array<std::uint8_t, 32> zeros32{};
    std::array<std::uint8_t, 32> digest{};  // stands in for SHA-256("keywarden key check")
};

// The check-value op of each kind: AES-ECB encrypt / HMAC sign / ECDSA sign.
void check_op(p11::Session& s, KeyKind kind, CK_OBJECT_HANDLE h, const CheckInputs& in) {
    switch (kind) {
        case KeyKind::aes: {
            CK_MECHANISM m{CKM_AES_ECB, nullptr, 0};
            s.encrypt(&m, h, in.zeros16);
            break;
        }
        case KeyKind::generic_secret: {
            CK_MECHANISM m{CKM_SHA256_HMAC, nullptr, 0};
            s.sign(&m, h, in.zeros32);
            break;
        }
        case KeyKind::ec_p256_private: {
            CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
            s.sign(&m, h, in.digest);
            break;
        }
    }
}

// Per client, as KeyStore::generate does per key: generate, check-value op, C_WrapKey under
// the master key, C_DestroyObject (the guards). Returns the blobs for the verify floor.
std::vector<WrappedKey> floor_generate(const std::shared_ptr<p11::Session>& sp,
                                       const MasterHandles& mk, FloorTemplates& t,
                                       std::size_t clients) {
    p11::Session& s = *sp;
    CheckInputs in;
    CK_MECHANISM wrap{mk.mech, nullptr, 0};
    std::vector<WrappedKey> out;
    out.reserve(clients * 3);
    for (std::size_t i = 0; i < clients; ++i) {
        {
            auto [pub, priv] = s.generate_key_pair(CKM_EC_KEY_PAIR_GEN, t.gen_ec_pub, t.gen_ec_priv);
            check_op(s, KeyKind::ec_p256_private, priv.handle(), in);
            out.push_back({KeyKind::ec_p256_private, s.wrap_key(&wrap, mk.enc, priv.handle())});
        }
        {
            auto k = s.generate_key(CKM_AES_KEY_GEN, t.gen_aes);
            check_op(s, KeyKind::aes, k.handle(), in);
            out.push_back({KeyKind::aes, s.wrap_key(&wrap, mk.enc, k.handle())});
        }
        {
            auto k = s.generate_key(CKM_GENERIC_SECRET_KEY_GEN, t.gen_hmac);
            check_op(s, KeyKind::generic_secret, k.handle(), in);
            out.push_back({KeyKind::generic_secret, s.wrap_key(&wrap, mk.enc, k.handle())});
        }
    }
    return out;
}

// Per live key, as KeyStore::verify does: C_UnwrapKey, check-value op, C_DestroyObject.
std::size_t floor_verify(const std::shared_ptr<p11::Session>& sp, const MasterHandles& mk,
                         FloorTemplates& t, const std::vector<WrappedKey>& keys) {
    p11::Session& s = *sp;
    CheckInputs in;
    CK_MECHANISM wrap{mk.mech, nullptr, 0};
    std::size_t n = 0;
    for (const auto& w : keys) {
        p11::Template& tmpl = w.kind == KeyKind::aes              ? t.unwrap_aes
                              : w.kind == KeyKind::generic_secret ? t.unwrap_hmac
                                                                  : t.unwrap_ec;
        auto k = s.unwrap_key(&wrap, mk.enc, w.blob, tmpl);
        check_op(s, w.kind, k.handle(), in);
        ++n;
    }
    return n;
}

// ---- the report ----------------------------------------------------------------------------

struct Row {
    std::string operation;
    std::size_t keys = 0;
    std::optional<double> wall;  // nullopt: skipped
    std::optional<double> floor;
    bool rate = true;  // show keys/s
};

std::string fmt(const char* f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return buf;
}

void print_table(const std::vector<Row>& rows) {
    std::printf("%-34s %7s %10s %11s %10s %9s\n", "operation", "keys", "wall s", "keys/s",
                "floor s", "op/floor");
    std::printf("%s\n", std::string(34 + 1 + 7 + 1 + 10 + 1 + 11 + 1 + 10 + 1 + 9, '-').c_str());
    for (const auto& r : rows) {
        std::string wall = r.wall ? fmt("%.4f", *r.wall) : "skipped";
        std::string rate = r.wall && r.rate && *r.wall > 0 ? fmt("%.0f", r.keys / *r.wall) : "-";
        std::string floor = r.floor ? fmt("%.4f", *r.floor) : "-";
        std::string ratio = r.wall && r.floor && *r.floor > 0 ? fmt("%.2f", *r.wall / *r.floor) : "-";
        std::printf("%-34s %7zu %10s %11s %10s %9s\n", r.operation.c_str(), r.keys, wall.c_str(),
                    rate.c_str(), floor.c_str(), ratio.c_str());
    }
}

std::size_t count_lines(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::size_t n = 0;
    char buf[65536];
    while (in.read(buf, sizeof buf) || in.gcount() > 0) {
        for (std::streamsize i = 0; i < in.gcount(); ++i) n += buf[i] == '\n';
        if (!in) break;
    }
    return n;
}

int run_bench(const Options& o, const std::string& dir) {
    const std::size_t n_keys = o.clients * 3;
    std::vector<Row> rows;
    std::vector<std::string> notes;

    // ---- setup: token, login, master keys, an empty store ----
    auto t0 = Clock::now();
    make_softhsm(dir);
    auto module = p11::Module::load(o.module);
    auto token = p11::select_token(p11::list_tokens(*module), std::string("label:") + kTokenLabel);
    auto session = p11::Session::open(module, token.slot, true);
    std::string pin_text = kUserPin;
    session->login(keywarden::SecureBytes(pin_text.begin(), pin_text.end()));
    auto mech = p11::AesWrapProtector::choose_mechanism(*session);
    if (!mech) throw std::runtime_error("the token offers no AES key wrap mechanism");
    MasterHandles mk;
    mk.mech = *mech;

    ks::StoreMeta meta;
    std::uint8_t id[16];
    session->random(id);
    meta.store_id = keywarden::to_hex(id);
    meta.token_serial = token.serial;
    meta.token_label = token.label;
    meta.token_model = token.model;
    std::string prefix = "keywarden-" + meta.store_id.substr(0, 8);
    auto enc = p11::generate_master_key(*session, p11::MasterRole::encryption, prefix + "-enc");
    auto sig = p11::generate_master_key(*session, p11::MasterRole::signature, prefix + "-sig");
    mk.enc = enc.handle;
    mk.sig = sig.handle;
    meta.encryption = {enc.label, enc.id, {}};
    meta.signature = {sig.label, sig.id, {}};

    const std::string store_dir = dir + "/store";
    {
        auto storage = ks::open_file_storage(store_dir);
        auto keys = master_keys(session, mk);
        ks::KeyStore::init(*storage, keys, meta);
    }
    auto t_setup = Clock::now();

    std::vector<ks::KeyId> ids;
    ids.reserve(n_keys);
    int width = std::max<int>(6, static_cast<int>(std::to_string(o.clients).size()));
    for (std::size_t i = 0; i < o.clients; ++i) {
        std::string num = std::to_string(i);
        std::string client = "client-" + std::string(static_cast<std::size_t>(width) - num.size(), '0') + num;
        ids.push_back(ks::KeyId::client(ks::RingKind::storage_keypair, client));
        ids.push_back(ks::KeyId::client(ks::RingKind::symmetric, client));
        ids.push_back(ks::KeyId::client(ks::RingKind::hmac, client));
    }

    std::printf("keystore-bench: %zu clients, %zu keys (storage keypair + symmetric + hmac each)\n",
                o.clients, n_keys);
    std::printf("module %s, token '%s' serial %s, protection %s\n", module->path().c_str(),
                token.label.c_str(), token.serial.c_str(),
                p11::AesWrapProtector::method_name(mk.mech).c_str());
    std::printf("work dir %s (setup: token init, login, master keys, store init %.3f s)\n\n",
                dir.c_str(), seconds_between(t0, t_setup));
    std::fflush(stdout);

    // ---- (1) generate: one KeyStore::generate call, one manifest update ----
    double gen_open, gen_wall, gen_keys_phase;
    {
        auto a = Clock::now();
        auto store = ks::KeyStore::open(ks::open_file_storage(store_dir), master_keys(session, mk),
                                        true);
        auto b = Clock::now();
        Clock::time_point keys_done = b;
        std::size_t total = ids.size();
        store->generate(ids, [&](std::size_t done) {
            if (done == total) keys_done = Clock::now();
        });
        auto c = Clock::now();
        gen_open = seconds_between(a, b);
        gen_wall = seconds_between(b, c);
        gen_keys_phase = seconds_between(b, keys_done);
    }  // the writable store (and its exclusive lock) is gone before the readers below

    auto a = Clock::now();
    FloorTemplates ft;
    fill_floor_templates(ft);
    auto wrapped = floor_generate(session, mk, ft, o.clients);
    double gen_floor = seconds_between(a, Clock::now());
    rows.push_back({"open (writable)", n_keys, gen_open, std::nullopt, false});
    rows.push_back({"generate (KeyStore::generate)", n_keys, gen_wall, gen_floor});
    notes.push_back(fmt("generate split: %.3f s making keys (token work + host checks), ", gen_keys_phase) +
                    fmt(" %.3f s commit (ring files, sync, manifest)", gen_wall - gen_keys_phase));

    // ---- (2) list on a freshly opened read-only store ----
    {
        auto a1 = Clock::now();
        auto store = ks::KeyStore::open(ks::open_file_storage(store_dir), master_keys(session, mk),
                                        false);
        auto b1 = Clock::now();
        auto rings = store->list();
        auto c1 = Clock::now();
        if (rings.size() != n_keys)
            throw std::runtime_error("list() returned " + std::to_string(rings.size()) +
                                     " rings, expected " + std::to_string(n_keys));
        rows.push_back({"open (read-only, for list)", n_keys, seconds_between(a1, b1), std::nullopt, false});
        rows.push_back({"list()", n_keys, seconds_between(b1, c1), std::nullopt});
        rows.push_back({"open + list()", n_keys, seconds_between(a1, c1), std::nullopt});
    }

    // The CLI as a subprocess: module load, C_Initialize, login, open, list, print.
    if (::access(o.cli.c_str(), X_OK) == 0) {
        std::string out = dir + "/cli-list.out", err = dir + "/cli-list.err";
        auto a2 = Clock::now();
        int rc = run_process({o.cli, "list"},
                             {{"KEYWARDEN_MODULE", o.module},
                              {"KEYWARDEN_KEYSTORE", store_dir},
                              {"KEYWARDEN_PIN", std::string(kUserPin)},
                              {"KEYWARDEN_TOKEN", std::nullopt},
                              {"KEYWARDEN_PIN_SOURCE", std::nullopt}},
                             out, err);
        double wall = seconds_between(a2, Clock::now());
        if (rc != 0)
            throw std::runtime_error("'" + o.cli + " list' failed (exit " + std::to_string(rc) +
                                     "): " + read_text(err));
        std::size_t lines = count_lines(out);
        if (lines != n_keys + 1)
            throw std::runtime_error("'" + o.cli + " list' printed " + std::to_string(lines) +
                                     " lines, expected " + std::to_string(n_keys + 1));
        rows.push_back({"keywarden list (CLI process)", n_keys, wall, std::nullopt});
        notes.push_back("keywarden list: " + o.cli + " (whole process, output to a file, " +
                        std::to_string(lines) + " lines)");
    } else {
        rows.push_back({"keywarden list (CLI process)", n_keys, std::nullopt, std::nullopt});
        notes.push_back("keywarden list: skipped, no executable at " + o.cli + " (pass --cli PATH)");
    }

    // ---- (3) verify on a freshly opened store (non-strict, as 'keystore verify' opens it) ----
    {
        auto a3 = Clock::now();
        auto store = ks::KeyStore::open(ks::open_file_storage(store_dir), master_keys(session, mk),
                                        false, false);
        auto b3 = Clock::now();
        auto rep = store->verify();
        auto c3 = Clock::now();
        if (!rep.ok() || rep.keys_checked != n_keys) {
            std::string first = rep.problems.empty() ? std::string()
                                                     : rep.problems.front().key_id + ": " +
                                                           rep.problems.front().problem;
            throw std::runtime_error("verify() checked " + std::to_string(rep.keys_checked) +
                                     " keys with " + std::to_string(rep.problems.size()) +
                                     " problems " + first);
        }
        auto a4 = Clock::now();
        std::size_t checked = floor_verify(session, mk, ft, wrapped);
        double floor = seconds_between(a4, Clock::now());
        if (checked != n_keys) throw std::runtime_error("floor verify checked too few keys");
        rows.push_back({"open (read-only, for verify)", n_keys, seconds_between(a3, b3), std::nullopt, false});
        rows.push_back({"verify()", rep.keys_checked, seconds_between(b3, c3), floor});
    }

    print_table(rows);
    std::printf("\n");
    for (const auto& n : notes) std::printf("%s\n", n.c_str());
    std::printf("floor generate: C_GenerateKey[Pair] + check op (C_Encrypt AES_ECB / C_Sign HMAC / "
                "C_Sign ECDSA) + C_WrapKey + C_DestroyObject per key\n");
    std::printf("floor verify:   C_UnwrapKey + check op + C_DestroyObject per key\n");
    std::printf("floor list:     one C_Verify (HMAC) of the manifest plus open; absolute time only\n");

    // Only this process: a posix_spawn child (CLONE_VM) would report this process's high-water
    // mark through RUSAGE_CHILDREN, since exec records the old, shared mm's peak.
    struct rusage self {};
    getrusage(RUSAGE_SELF, &self);
    std::printf("\npeak RSS: %.1f MiB (ru_maxrss of this process; SoftHSM runs in-process)\n",
                static_cast<double>(self.ru_maxrss) / 1024.0);
    std::fflush(stdout);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Options o = parse_options(argc, argv);
    std::string dir;
    int rc = 1;
    try {
        dir = make_temp_dir("kw-bench");
        rc = run_bench(o, dir);
    } catch (const keywarden::Error& e) {
        std::cerr << "keystore-bench: " << e.what() << "\n";
        if (!e.hint().empty()) std::cerr << "  hint: " << e.hint() << "\n";
    } catch (const std::exception& e) {
        std::cerr << "keystore-bench: " << e.what() << "\n";
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
