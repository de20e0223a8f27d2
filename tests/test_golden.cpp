// SPDX-License-Identifier: Apache-2.0
// Golden files: stores and bundles written by earlier versions must stay readable.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "support.hpp"

namespace fs = std::filesystem;
using Env = std::map<std::string, std::optional<std::string>>;

namespace {

// Copies tests/data/<name> to a temporary directory with the permissions git does not keep,
// and renders the SoftHSM config for the copied token directory.
struct GoldenCopy {
    std::string dir = kwtest::make_temp_dir("kw-golden");
    Env env;
    explicit GoldenCopy(const std::string& name) {
        fs::copy(kwtest::source_root() + "/tests/data/" + name, dir,
                 fs::copy_options::recursive | fs::copy_options::overwrite_existing);
        for (const auto& e : fs::recursive_directory_iterator(dir))
            ::chmod(e.path().c_str(), e.is_directory() ? 0700 : 0600);
        ::chmod(dir.c_str(), 0700);
        std::string conf = kwtest::read_text(kwtest::source_root() + "/hsm-config/softhsm2.conf.in");
        for (std::size_t p; (p = conf.find("@TOKENDIR@")) != std::string::npos;)
            conf.replace(p, 10, dir + "/tokens");
        kwtest::write_file(dir + "/softhsm2.conf", conf);
        env = {{"SOFTHSM2_CONF", dir + "/softhsm2.conf"},
               {"KEYWARDEN_MODULE", kwtest::module_path()},
               {"KEYWARDEN_PIN", std::nullopt},
               {"KEYWARDEN_TOKEN", std::nullopt},
               {"KEYWARDEN_PIN_SOURCE", "file:" + dir + "/user.pin"},
               {"KEYWARDEN_KEYSTORE", dir + "/store"}};
    }
    ~GoldenCopy() {
        std::error_code ec;
        fs::remove_all(dir, ec);
    }
};

std::string trim(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
    return s;
}

}  // namespace

// Every key version of expected.json reads back with the same material from the store that
// env's KEYWARDEN_KEYSTORE names.
void check_expected(const Env& env, const nlohmann::json& expected) {
    REQUIRE(expected.size() == 11);
    for (const auto& [key, want] : expected.items()) {
        auto at = key.rfind('@');
        std::string id = key.substr(0, at), version = key.substr(at + 1);
        INFO(key);
        auto priv = kwtest::run_cli({"read", id, "--private", "--version", version}, env);
        if (want["private"].is_null()) {
            CHECK(priv.code == 1);
            CHECK_THAT(priv.err, Catch::Contains("destroyed"));
        } else {
            CHECK(priv.code == 0);
            CHECK(trim(priv.out) == want["private"].get<std::string>());
        }
        if (!want["public"].is_null()) {
            auto pub = kwtest::run_cli({"read", id, "--public", "--version", version}, env);
            CHECK(trim(pub.out) == want["public"].get<std::string>());
        }
    }
}

TEST_CASE("golden: the key store v2 written by keywarden 0.1.0 still reads", "[cli]") {
    GoldenCopy g("keystore-v2");
    auto verify = kwtest::run_cli({"keystore", "verify"}, g.env);
    INFO(verify.err);
    REQUIRE(verify.code == 0);
    check_expected(g.env, nlohmann::json::parse(kwtest::read_text(g.dir + "/expected.json")));
}

TEST_CASE("golden: the key store v1 and its v1 backup written by keywarden 0.2.0 still read", "[cli]") {
    GoldenCopy g("keystore-v1");
    auto verify = kwtest::run_cli({"keystore", "verify"}, g.env);
    INFO(verify.err);
    REQUIRE(verify.code == 0);
    auto expected = nlohmann::json::parse(kwtest::read_text(g.dir + "/expected.json"));
    check_expected(g.env, expected);
    // The golden backup restores into a fresh v1 store with every key as expected.json says.
    std::string data = kwtest::source_root() + "/tests/data/backup-v1/";
    std::string key = trim(kwtest::read_text(data + "backup-key.txt"));
    REQUIRE(key.starts_with("Backup master key: "));
    Env env = g.env;
    env["KEYWARDEN_KEYSTORE"] = g.dir + "/restored";
    env["BACKUP_MASTER_KEY"] = key.substr(19);
    auto imp = kwtest::run_cli({"backup", "--action=import", "--file", data + "backup.dat", "--init"}, env);
    INFO(imp.err);
    REQUIRE(imp.code == 0);
    check_expected(env, expected);
    // And the golden v1 store migrates into a v2 store with the same keys.
    Env v2 = g.env;
    v2["KEYWARDEN_KEYSTORE"] = g.dir + "/v2";
    REQUIRE(kwtest::run_cli({"init"}, v2).code == 0);
    auto mig = kwtest::run_cli({"migrate", "--src-keystore", g.dir + "/store", "--dst-keystore", g.dir + "/v2"}, g.env);
    INFO(mig.err);
    REQUIRE(mig.code == 0);
    check_expected(v2, expected);
}
