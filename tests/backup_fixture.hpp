// SPDX-License-Identifier: Apache-2.0
// The fixture and helpers of the end-to-end backup tests (test_backup_cli.cpp,
// test_backup_crash.cpp, test_backup_jobs.cpp): store A on kw-src, all six key kinds.
#pragma once

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "keywarden/encoding.hpp"
#include "keywarden/key_protector.hpp"
#include "support.hpp"
#include "two_tokens.hpp"

namespace kwtest::backup_tests {

struct BackupFixture : kwtest::TwoTokens {
    explicit BackupFixture(bool populate = true) {
        if (!populate) return;
        must({"--keystore", a, "--token", "kw-src", "init"});
        // All six kinds, a rotated ring, and a destroyed version.
        must({"--keystore", a, "generate", "--client-id", "alice01", "--poison-record-keys", "--audit-log-key"});
        must({"--keystore", a, "generate", "--client-id", "bob the client"});
        must({"--keystore", a, "rotate", "client/alice01/symmetric", "client/alice01/storage"});
        must({"--keystore", a, "destroy", "client/bob the client/hmac", "--version", "1"});
    }
    std::vector<std::string> exp(const std::string& bundle, const std::string& secret) const {
        return {"--keystore", a, "export", "--key-bundle-file", bundle, "--key-bundle-secret", secret};
    }
    std::vector<std::string> imp(const std::string& store, const std::string& bundle,
                                 const std::string& secret) const {
        return {"--keystore", store, "--token", "kw-dst", "import", "--key-bundle-file", bundle,
                "--key-bundle-secret", secret};
    }
};

inline bool keypair(const std::string& id) {
    return id.ends_with("/storage") || id == "poison/keypair";
}

// Store A on kw-src with 150 clients of three keys each (450 keys): enough that an export or an
// import takes a while.
inline void bulk_store(BackupFixture& f) {
    f.must({"--keystore", f.a, "--token", "kw-src", "init"});
    std::string ids;
    for (int i = 0; i < 150; ++i) ids += "bulk-client-" + std::to_string(i) + "\n";
    kwtest::write_file(f.dir + "/ids.txt", ids);
    f.must({"--keystore", f.a, "generate", "--client-ids-from", f.dir + "/ids.txt"});
}

// A fresh store of three symmetric rings (aaa-client, mmm-client, zzz-client, one version each),
// exported with its private keys: the bundle has magic, header, three entry lines and the mac.
inline std::vector<std::string> three_ring_bundle(BackupFixture& f, const std::string& bundle, const std::string& secret) {
    f.must({"--keystore", f.a, "--token", "kw-src", "init"});
    for (const char* c : {"aaa-client", "mmm-client", "zzz-client"})
        f.must({"--keystore", f.a, "generate", "--client-id", c, "--symmetric"});
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    std::vector<std::string> lines;
    std::istringstream in(kwtest::read_text(bundle));
    for (std::string l; std::getline(in, l);) lines.push_back(l);
    return lines;
}

// Writes `lines` (every line but the mac) as a bundle at `path`, with its MAC made again with the
// signature key of the secret file at `secret`.
inline void write_with_new_mac(const std::string& path, const std::vector<std::string>& lines, const std::string& secret) {
    std::string body;
    for (const auto& l : lines) body += l + "\n";
    auto key = keywarden::from_base64(nlohmann::json::parse(kwtest::read_text(secret)).at("signature").get<std::string>());
    REQUIRE(key);
    auto tag = keywarden::hmac_sha256(*key, std::span(reinterpret_cast<const std::uint8_t*>(body.data()), body.size()));
    kwtest::write_file(path, body + "mac " + keywarden::to_hex(tag) + "\n");
}

}  // namespace kwtest::backup_tests
