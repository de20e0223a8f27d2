// SPDX-License-Identifier: Apache-2.0
// The fixture of the end-to-end backup tests: two SoftHSM tokens ("kw-src", "kw-dst"), store
// paths A and B, and a runner for the built keywarden with the environment those tests need.
#pragma once

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>
#include <tuple>

#include "support.hpp"

namespace kwtest {

using Env = std::map<std::string, std::optional<std::string>>;

struct TwoTokens {
    SoftHsm hsm{"softhsm2.conf.in", {"kw-src", "kw-dst"}};
    std::string dir = hsm.dir();
    std::string a = dir + "/A", b = dir + "/B";
    Env env{{"KEYWARDEN_MODULE", module_path()},
            {"KEYWARDEN_PIN", SoftHsm::user_pin},
            {"KEYWARDEN_PIN_SOURCE", std::nullopt},
            {"KEYWARDEN_TOKEN", std::nullopt},
            {"KEYWARDEN_KEYSTORE", std::nullopt},
            {"BACKUP_MASTER_KEY", std::nullopt}};

    TwoTokens() { hsm.unload(); }
    CliResult run(const std::vector<std::string>& args, const Env& more = {}) const {
        Env e = env;
        for (const auto& [k, v] : more) e[k] = v;
        return run_cli(args, e);
    }
    CliResult must(const std::vector<std::string>& args, const Env& more = {}) const {
        auto r = run(args, more);
        INFO(args.back() << ": " << r.err);
        REQUIRE(r.code == 0);
        return r;
    }
    // Every key id and version of a store with its state.
    std::vector<std::tuple<std::string, std::string, std::string>> versions(const std::string& store) const {
        auto doc = nlohmann::json::parse(must({"--keystore", store, "list", "--rotated", "--json"}).out);
        std::vector<std::tuple<std::string, std::string, std::string>> out;
        for (const auto& r : doc)
            for (const auto& v : r["versions"])
                out.emplace_back(r["key_id"], std::to_string(v["version"].get<int>()), v["state"]);
        return out;
    }
    // Every ring's versions with all their metadata (state, created, valid_from, valid_until,
    // current), one line per version: the key id, a tab, and the version as `list --rotated --json` prints it.
    std::vector<std::string> metadata(const std::string& store) const {
        auto doc = nlohmann::json::parse(must({"--keystore", store, "list", "--rotated", "--json"}).out);
        std::vector<std::string> out;
        for (const auto& r : doc)
            for (const auto& v : r["versions"]) out.push_back(r["key_id"].get<std::string>() + "\t" + v.dump());
        return out;
    }
};

}  // namespace kwtest
