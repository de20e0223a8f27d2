// SPDX-License-Identifier: Apache-2.0
// Compares what docs/decrypt-bundle.sh recovered with the openssl command line against the keys
// `keywarden read` gives.
#pragma once

#include <catch2/catch.hpp>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "support.hpp"

namespace kwtest {

inline std::string hex_of(const std::string& bytes) {
    static const char* d = "0123456789abcdef";
    std::string out;
    for (unsigned char c : bytes) {
        out.push_back(d[c >> 4]);
        out.push_back(d[c & 15]);
    }
    return out;
}

// For every entry N.json in out: a destroyed key has no N.key; every other N.key equals the raw
// key (AES, HMAC) or holds the same EC private scalar. Returns how many keys were compared.
inline int compare_decrypted(const std::string& out,
                             const std::function<std::string(const std::string& id, const std::string& version)>& read_raw) {
    namespace fs = std::filesystem;
    int compared = 0;
    for (int n = 1;; ++n) {
        std::string js = out + "/" + std::to_string(n) + ".json";
        if (!fs::exists(js)) break;
        auto m = nlohmann::json::parse(read_text(js));
        std::string id = m["key_id"], version = std::to_string(m["version"].get<int>());
        INFO(id << " v" << version);
        std::string keyfile = out + "/" + std::to_string(n) + ".key";
        if (m["state"] == "destroyed") {
            CHECK_FALSE(fs::exists(keyfile));
            continue;
        }
        std::string raw = read_raw(id, version);
        if (m["key_type"] == "ec-p256-private") {
            // The private scalar, as openssl prints it from the PKCS#8 DER: the hex lines
            // between "priv:" and "pub:".
            REQUIRE(sh("openssl pkey -inform DER -in " + keyfile + " -text -noout 2>/dev/null | "
                       "sed -n '/^priv:/,/^pub:/p' | sed '1d;$d' | tr -d ' :\\n' > " + keyfile + ".hex") == 0);
            std::string printed = read_text(keyfile + ".hex");
            std::string want = hex_of(raw);
            // openssl drops a leading zero byte of the scalar
            while (want.size() > printed.size() && want.starts_with("00")) want = want.substr(2);
            CHECK(printed == want);
        } else {
            CHECK(read_text(keyfile) == raw);
        }
        ++compared;
    }
    return compared;
}

}  // namespace kwtest
