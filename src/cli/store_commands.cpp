// SPDX-License-Identifier: Apache-2.0
// keywarden init / generate / rotate / list / read / destroy / keystore verify
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "keywarden/encoding.hpp"
#include "keywarden/keystore.hpp"
#include "keywarden/log.hpp"
#include "keywarden/planned_keys.hpp"
#include "keywarden/token_protector.hpp"
#include "options.hpp"
#include "store_context.hpp"

namespace keywarden::cli {

using namespace keywarden::keystore;

const char* const kDefaultKeystore = "./.keywarden/keystore";

std::string keystore_path(const GlobalOptions& g) {
    return g.keystore.empty() ? std::string(kDefaultKeystore) : g.keystore;
}

namespace {


}  // namespace

OpenStore with_store(const GlobalOptions& g, bool writable, bool strict) {
    return open_store(g.tok, keystore_path(g), writable, strict);
}

OpenStore with_store_streaming(const GlobalOptions& g) {
    return keystore::open_store_streaming(g.tok, keystore_path(g));
}

keystore::OpenAnyStore with_any_store(const GlobalOptions& g, bool writable, bool strict) {
    return open_any_store(g.tok, keystore_path(g), writable, strict);
}

int run_init(const GlobalOptions& g, const InitOptions& o) {
    std::string path = keystore_path(g);
    keystore::refuse_existing_store(path);  // before touching the token
    if (o.store_version != 1 && o.store_version != 2)
        throw UsageError("--store-version must be 1 or 2");
    auto ctx = pkcs11::open_token(g.tok, true);
    // The master keys an init to this path made before it was killed, if its record says so
    // (docs/operations.md 5.5); then this init's own record, until store.json names its keys.
    keystore::forget_planned_keys(path, "init", ctx);
    keystore::PlannedKeysRecord record(path, "init");
    keystore::InitParams params;
    params.master_encryption_key = o.master_encryption_key;
    params.master_signature_key = o.master_signature_key;
    params.allow_extractable_master = o.allow_extractable_master;
    record.attach(params);
    auto written = o.store_version == 1 ? keystore::init_store_v1(ctx, path, params)
                                        : keystore::init_store(ctx, path, params);
    if (g.json) {
        nlohmann::json out = {{"keystore", path},
                              {"store_version", written.store_version},
                              {"store_id", written.store_id},
                              {"token", {{"label", written.token_label}, {"serial", written.token_serial}}},
                              {"protection", written.protection},
                              {"master_keys",
                               {{"encryption", written.encryption.label},
                                {"signature", written.signature.label}}}};
        std::cout << out.dump(2) << "\n";
    } else {
        std::cerr << "created key store " << path << " (version " << written.store_version << ", id "
                  << written.store_id << ")\n"
                  << "  token: '" << written.token_label << "' serial " << written.token_serial << "\n";
        if (written.store_version == 1)
            std::cerr << "  master key: '" << written.encryption.label << "' (" << written.protection
                      << " for keys, AES-CMAC for key files)\n";
        else
            std::cerr << "  master keys: '" << written.encryption.label << "' (encryption, "
                      << written.protection << "), '" << written.signature.label
                      << "' (signature, HMAC-SHA256)\n";
    }
    return 0;
}

namespace {

std::vector<std::string> read_client_ids(const std::string& path) {
    std::ifstream in(path);
    if (!in) throw UsageError("cannot read client id file " + path);
    std::vector<std::string> out;
    std::string line;
    std::size_t n = 0;
    while (std::getline(in, line)) {
        ++n;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty() || line.front() == '#') continue;
        try {
            validate_client_id(line);
        } catch (const UsageError& e) {
            throw UsageError(path + " line " + std::to_string(n) + ": " + e.what(), e.hint());
        }
        out.push_back(line);
    }
    return out;
}

}  // namespace

int run_generate(const GlobalOptions& g, const GenerateOptions& o) {
    std::vector<std::string> clients = o.client_ids;
    if (!o.client_ids_from.empty()) {
        auto more = read_client_ids(o.client_ids_from);
        clients.insert(clients.end(), more.begin(), more.end());
    }
    for (const auto& c : clients) validate_client_id(c);
    bool any_client_kind = o.storage_keypair || o.symmetric || o.hmac;
    if (clients.empty() && any_client_kind)
        throw UsageError("--storage-keypair, --symmetric and --hmac need --client-id or "
                         "--client-ids-from");
    if (clients.empty() && !o.poison_record_keys && !o.audit_log_key)
        throw UsageError("nothing to generate",
                         "give --client-id ID (all three client keys by default), "
                         "--client-ids-from FILE, --poison-record-keys or --audit-log-key");
    bool all = !any_client_kind;
    std::vector<KeyId> ids;
    for (const auto& c : clients) {
        if (all || o.storage_keypair) ids.push_back(KeyId::client(RingKind::storage_keypair, c));
        if (all || o.symmetric) ids.push_back(KeyId::client(RingKind::symmetric, c));
        if (all || o.hmac) ids.push_back(KeyId::client(RingKind::hmac, c));
    }
    if (o.poison_record_keys) {
        ids.push_back(KeyId::global(RingKind::poison_keypair));
        ids.push_back(KeyId::global(RingKind::poison_symmetric));
    }
    if (o.audit_log_key) ids.push_back(KeyId::global(RingKind::audit_log));

    auto s = with_any_store(g, true);
    auto bar = progress_bar("generating");
    s.store->generate(ids, [&](std::size_t done) { if (bar) bar(done, ids.size()); });
    if (g.json) {
        nlohmann::json out = nlohmann::json::array();
        for (const auto& id : ids) out.push_back(id.str());
        std::cout << nlohmann::json{{"generated", out}}.dump(2) << "\n";
    } else {
        std::cerr << "generated " << ids.size() << " key" << (ids.size() == 1 ? "" : "s") << "\n";
        for (const auto& id : ids) log::info("  " + id.str());
    }
    return 0;
}

int run_rotate(const GlobalOptions& g, const RotateOptions& o) {
    std::vector<KeyId> ids;
    for (const auto& k : o.key_ids) ids.push_back(KeyId::parse(k));
    auto s = with_any_store(g, true);
    for (const auto& id : ids)
        if (!s.store->contains(id))
            throw NotFoundError("no key ring " + id.str() + " to rotate",
                                "create it with 'keywarden generate'");
    s.store->generate(ids);
    std::cerr << "rotated " << ids.size() << " key" << (ids.size() == 1 ? "" : "s") << "\n";
    return 0;
}

namespace {
// After the listing: exit 4 when a ring could not be read, naming the first.
void refuse_unreadable(const std::vector<RingSummary>& rings) {
    std::size_t bad = 0;
    const RingSummary* first = nullptr;
    for (const auto& r : rings)
        if (!r.problem.empty() && bad++ == 0) first = &r;
    if (!first) return;
    throw IntegrityError(std::to_string(bad) + " key ring" + (bad == 1 ? "" : "s") +
                             " listed as UNREADABLE: " + first->key_id + ": " + first->problem,
                         "run 'keywarden keystore verify' for the full report, and restore the damaged files "
                         "from a backup");
}
}  // namespace

int run_list(const GlobalOptions& g, const ListOptions& o) {
    auto s = with_any_store(g, false);
    auto rings = s.store->list();
    auto shown = [&](const VersionSummary& v, const RingSummary& r) {
        if (o.rotated) return true;
        if (v.current) return true;
        // A ring without a current version still shows its newest version.
        bool has_current = false;
        for (const auto& x : r.versions) has_current |= x.current;
        return !has_current && &v == &r.versions.back();
    };
    auto opt_time = [](const std::optional<std::int64_t>& t) {
        return t ? format_time(*t) : std::string("-");
    };
    if (g.json) {
        nlohmann::json out = nlohmann::json::array();
        for (const auto& r : rings) {
            nlohmann::json versions = nlohmann::json::array();
            for (const auto& v : r.versions) {
                if (!shown(v, r)) continue;
                versions.push_back({{"version", v.version},
                                    {"state", key_state_name(v.state)},
                                    {"current", v.current},
                                    {"created", format_time(v.created)},
                                    {"valid_from", format_time(v.valid_from)},
                                    {"valid_until", v.valid_until ? nlohmann::json(format_time(*v.valid_until))
                                                                  : nlohmann::json(nullptr)}});
            }
            nlohmann::json ring = {{"key_id", r.key_id},
                                   {"kind", ring_kind_name(r.kind)},
                                   {"client_id", r.client_id.empty() ? nlohmann::json(nullptr)
                                                                     : nlohmann::json(r.client_id)},
                                   {"versions", std::move(versions)}};
            if (!r.problem.empty()) ring["problem"] = r.problem;
            out.push_back(std::move(ring));
        }
        std::cout << out.dump(2) << "\n";
        refuse_unreadable(rings);
        return 0;
    }
    std::ostringstream os;
    char line[512];
    std::snprintf(line, sizeof line, "%-40s %-17s %7s %-12s %-20s %-20s\n", "KEY ID", "KIND",
                  "VERSION", "STATE", "VALID FROM", "VALID UNTIL");
    os << line;
    for (const auto& r : rings) {
        if (!r.problem.empty()) {
            std::snprintf(line, sizeof line, "%-40s %-17s %7s %-12s\n", r.key_id.c_str(), ring_kind_name(r.kind),
                          "-", "UNREADABLE");
            os << line;
        }
        for (const auto& v : r.versions) {
            if (!shown(v, r)) continue;
            std::string ver = std::to_string(v.version) + (v.current ? "*" : "");
            std::snprintf(line, sizeof line, "%-40s %-17s %7s %-12s %-20s %-20s\n",
                          r.key_id.c_str(), ring_kind_name(r.kind), ver.c_str(),
                          key_state_name(v.state), format_time(v.valid_from).c_str(),
                          opt_time(v.valid_until).c_str());
            os << line;
        }
    }
    std::cout << os.str();
    std::cerr << rings.size() << " key ring" << (rings.size() == 1 ? "" : "s")
              << " (* marks the current version" << (o.rotated ? "" : "; --rotated shows all")
              << ")\n";
    refuse_unreadable(rings);
    return 0;
}

int run_read(const GlobalOptions& g, const ReadOptions& o) {
    KeyId id = KeyId::parse(o.key_id);
    if (o.public_half == o.private_half)
        throw UsageError("say which half to read: --public or --private",
                         "private and symmetric material is only written with --private");
    bool keypair = has_public(id.kind);
    if (o.public_half && !keypair)
        throw UsageError(id.str() + " is a symmetric key: it has no public half",
                         "use --private to read it");
    if (o.format == "pem" && !keypair)
        throw UsageError("--format pem is only for keypairs", "use raw or base64");
    auto s = with_any_store(g, false);
    if (o.public_half) {
        Bytes pub = s.store->read_public(id, o.version);
        if (o.format == "raw") std::cout.write(reinterpret_cast<const char*>(pub.data()),
                                               static_cast<std::streamsize>(pub.size()));
        else if (o.format == "base64") std::cout << to_base64(pub) << "\n";
        else std::cout << p256_public_pem(pub);
        return 0;
    }
    SecureBytes secret = s.store->read_secret(id, o.version);
    if (o.format == "raw") {
        std::cout.write(reinterpret_cast<const char*>(secret.data()),
                        static_cast<std::streamsize>(secret.size()));
    } else if (o.format == "base64") {
        SecureBytes b = base64_secret(secret);
        std::cout.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
        std::cout << "\n";
    } else {
        // The PEM text passes through a std::string: wiped before it is freed.
        std::string pem = p256_private_pem(secret);
        std::cout << pem;
        wipe(pem.data(), pem.size());
    }
    std::cout.flush();
    return 0;
}

int run_destroy(const GlobalOptions& g, const DestroyOptions& o) {
    KeyId id = KeyId::parse(o.key_id);
    if (!o.version && !o.all_versions)
        throw UsageError("say which version of " + id.str() + " to destroy",
                         "pass --version N (see 'keywarden list --rotated'), or --all-versions");
    if (o.version && o.all_versions) throw UsageError("--version and --all-versions exclude each other");
    auto s = with_any_store(g, true);
    s.store->destroy(id, o.version);
    std::cerr << "destroyed " << id.str()
              << (o.version ? " version " + std::to_string(*o.version) : std::string(" (every version)"))
              << "\n";
    return 0;
}

int run_keystore_verify(const GlobalOptions& g) {
    auto s = with_any_store(g, false, false);
    auto bar = progress_bar("verifying");
    std::size_t rings = s.store->key_ids().size();
    auto rep = s.store->verify([&](std::size_t done) { if (bar) bar(done, rings); });
    if (g.json) {
        nlohmann::json problems = nlohmann::json::array();
        for (const auto& p : rep.problems) problems.push_back({{"key_id", p.key_id}, {"problem", p.problem}});
        std::cout << nlohmann::json{{"ok", rep.ok()},
                                    {"rings", rep.rings},
                                    {"keys_checked", rep.keys_checked},
                                    {"generation", s.store->generation()},
                                    {"problems", problems}}
                         .dump(2)
                  << "\n";
    } else {
        for (const auto& p : rep.problems) std::cout << "PROBLEM " << p.key_id << ": " << p.problem << "\n";
        std::cout << (rep.ok() ? "OK" : "FAILED") << ": " << rep.rings << " key rings, "
                  << rep.keys_checked << " keys unwrapped and checked in the token, "
                  << rep.problems.size() << " problem" << (rep.problems.size() == 1 ? "" : "s") << "\n";
    }
    return rep.ok() ? 0 : static_cast<int>(ExitCode::integrity);
}

}  // namespace keywarden::cli
