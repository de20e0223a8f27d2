// SPDX-License-Identifier: Apache-2.0
// The key store end to end: the built binary against SoftHSM.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "keywarden/reader.hpp"
#include "keywarden/token_protector.hpp"
#include "support.hpp"

using kwtest::run_cli;
using Env = std::map<std::string, std::optional<std::string>>;
namespace fs = std::filesystem;

namespace {

struct StoreFixture {
    kwtest::SoftHsm hsm{"softhsm2.conf.in", {"kw-a", "kw-b"}};
    std::string ks = hsm.dir() + "/ks";
    Env env{{"KEYWARDEN_MODULE", kwtest::module_path()},
            {"KEYWARDEN_PIN", kwtest::SoftHsm::user_pin},
            {"KEYWARDEN_PIN_SOURCE", std::nullopt},
            {"KEYWARDEN_TOKEN", std::nullopt},
            {"KEYWARDEN_KEYSTORE", hsm.dir() + "/ks"}};

    StoreFixture() {
        hsm.unload();
        must({"--token", "kw-a", "init"});
        must({"generate", "--client-id", "alice01", "--poison-record-keys", "--audit-log-key"});
        must({"generate", "--client-id", "bob-the-client"});
        must({"generate", "--client-id", "alice01", "--symmetric"});  // rotate: version 2
    }
    kwtest::CliResult run(const std::vector<std::string>& args, const Env& more = {}) const {
        Env e = env;
        for (const auto& [k, v] : more) e[k] = v;
        return run_cli(args, e);
    }
    kwtest::CliResult must(const std::vector<std::string>& args) const {
        auto r = run(args);
        INFO(r.err);
        REQUIRE(r.code == 0);
        return r;
    }
    std::string file(const std::string& rel) const { return ks + "/" + rel; }
};

void flip_byte(const std::string& path, std::size_t offset) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    char c = 0;
    f.read(&c, 1);
    c = static_cast<char>(c ^ 0x20);
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(&c, 1);
}

}  // namespace

TEST_CASE("cli: key store round trip on SoftHSM", "[cli]") {
    StoreFixture f;
    auto list = f.must({"list", "--rotated", "--json"});
    auto doc = nlohmann::json::parse(list.out);
    std::set<std::string> ids;
    for (const auto& r : doc) ids.insert(r["key_id"].get<std::string>());
    CHECK(ids == std::set<std::string>{"audit/log", "client/alice01/hmac", "client/alice01/storage",
                                       "client/alice01/symmetric", "client/bob-the-client/hmac",
                                       "client/bob-the-client/storage",
                                       "client/bob-the-client/symmetric", "poison/keypair",
                                       "poison/symmetric"});
    CHECK(list.out.find("wrapped") == std::string::npos);  // never key material
    for (const auto& r : doc)
        if (r["key_id"] == "client/alice01/symmetric") {
            REQUIRE(r["versions"].size() == 2);
            CHECK(r["versions"][0]["state"] == "deactivated");
            CHECK(r["versions"][1]["current"] == true);
        }

    // Symmetric keys: 32 bytes raw, the same in base64, old versions readable.
    auto raw = f.must({"read", "client/alice01/symmetric", "--private", "--format", "raw"});
    CHECK(raw.out.size() == 32);
    auto b64 = f.must({"read", "client/alice01/symmetric", "--private"});
    auto v1 = f.must({"read", "client/alice01/symmetric", "--private", "--version", "1"});
    CHECK(b64.out != v1.out);
    CHECK(b64.out.size() == 45);

    // Keypairs: the private PEM's public half is the public PEM (checked by openssl).
    auto pub = f.must({"read", "client/alice01/storage", "--public", "--format", "pem"});
    auto priv = f.must({"read", "client/alice01/storage", "--private", "--format", "pem"});
    kwtest::write_file(f.hsm.dir() + "/priv.pem", priv.out);
    CHECK(kwtest::sh("openssl pkey -in " + f.hsm.dir() + "/priv.pem -pubout -out " +
                     f.hsm.dir() + "/derived.pem 2>/dev/null") == 0);
    CHECK(kwtest::read_text(f.hsm.dir() + "/derived.pem") == pub.out);

    // Reading needs --private for secrets, and never prints to the terminal by accident.
    auto nohalf = f.run({"read", "client/alice01/symmetric"});
    CHECK(nohalf.code == 2);
    CHECK(nohalf.out.empty());

    auto verify = f.must({"keystore", "verify", "--json"});
    auto vdoc = nlohmann::json::parse(verify.out);
    CHECK(vdoc["ok"] == true);
    CHECK(vdoc["rings"] == 9);
    CHECK(vdoc["keys_checked"] == 10);

    // Destroy needs an explicit version; afterwards the version is gone for good.
    CHECK(f.run({"destroy", "client/alice01/symmetric"}).code == 2);
    f.must({"destroy", "client/alice01/symmetric", "--version", "1"});
    auto gone = f.run({"read", "client/alice01/symmetric", "--private", "--version", "1"});
    CHECK(gone.code == 1);
    CHECK_THAT(gone.err, Catch::Contains("was destroyed"));
    CHECK(f.run({"read", "client/alice01/symmetric", "--private"}).out == b64.out);
    f.must({"keystore", "verify"});

    // Files 0600, directories 0700.
    for (const auto& e : fs::recursive_directory_iterator(f.ks)) {
        struct stat st {};
        ::stat(e.path().c_str(), &st);
        INFO(e.path());
        CHECK((st.st_mode & 0777) == (e.is_directory() ? 0700u : 0600u));
    }
}

TEST_CASE("cli: key store bad input is refused and leaves the store unchanged", "[cli]") {
    StoreFixture f;
    const std::string alice = f.file("keys/client/alice01/symmetric.keyring");
    const std::string bob = f.file("keys/client/bob-the-client/symmetric.keyring");
    const std::string old_alice = kwtest::read_text(alice);
    f.must({"generate", "--client-id", "alice01", "--symmetric"});  // alice's ring moves on

    struct Row {
        const char* name;
        std::function<void()> setup;
        std::vector<std::string> args;
        Env env;
        int code;
        const char* message;
    };
    const std::vector<Row> rows = {
        {"wrong PIN", [] {}, {"list"}, {{"KEYWARDEN_PIN", "wrong"}}, 3, "CKR_PIN_INCORRECT"},
        {"another token with other master keys", [] {}, {"--token", "kw-b", "list"}, {}, 3,
         "not the one holding this store's master keys"},
        {"ring byte flipped (header)", [&] { flip_byte(alice, 3); },
         {"read", "client/alice01/symmetric", "--private"}, {}, 4, "does not match the signed manifest"},
        {"ring byte flipped (body)", [&] { flip_byte(alice, 40); },
         {"keystore", "verify"}, {}, 4, "FAILED"},
        {"ring byte flipped (MAC)", [&] { flip_byte(alice, fs::file_size(alice) - 1); },
         {"read", "client/alice01/symmetric", "--private"}, {}, 4, "does not match"},
        {"manifest byte flipped", [&] { flip_byte(f.file("manifest"), 30); }, {"list"}, {}, 4,
         "manifest does not verify"},
        {"ring copied under another client id", [&] { fs::copy_file(alice, bob, fs::copy_options::overwrite_existing); },
         {"read", "client/bob-the-client/symmetric", "--private"}, {}, 4, "does not match"},
        {"ring deleted", [&] { fs::remove(bob); }, {"list"}, {}, 4, "is missing"},
        {"older signed ring put back", [&] { kwtest::write_file(alice, old_alice); },
         {"read", "client/alice01/symmetric", "--private"}, {}, 4, "does not match the signed manifest"},
        {"extra key ring file",
         [&] {
             fs::create_directories(f.file("keys/client/mallory"));
             kwtest::write_file(f.file("keys/client/mallory/hmac.keyring"), old_alice);
         },
         {"list"}, {}, 4, "not in the signed manifest"},
        {"bad client id ../x", [] {}, {"generate", "--client-id", "../x"}, {}, 2, "5 to 256 characters"},
        {"empty client id", [] {}, {"generate", "--client-id", ""}, {}, 2, "5 to 256 characters"},
        {"300-character client id", [] {}, {"generate", "--client-id", std::string(300, 'a')}, {}, 2,
         "too long"},
        {"bad key id", [] {}, {"read", "client/../../etc/passwd/storage", "--private"}, {}, 2,
         "5 to 256 characters"},
        {"store missing", [] {}, {"--keystore", "/nonexistent/ks", "list"}, {}, 1, "no key store"},
        {"wrong directory permissions", [&] { fs::permissions(f.ks, fs::perms::group_write, fs::perm_options::add); },
         {"list"}, {}, 1, "chmod 700"},
        {"read of a destroyed version", [&] { f.must({"destroy", "client/bob-the-client/hmac", "--version", "1"}); },
         {"read", "client/bob-the-client/hmac", "--private", "--version", "1"}, {}, 1, "was destroyed"},
        {"init over an existing store", [] {}, {"init"}, {}, 1, "never touches an existing store"},
    };
    for (const auto& row : rows) {
        INFO(row.name);
        // Each row starts from a pristine copy of the store.
        std::string pristine = f.hsm.dir() + "/pristine";
        fs::remove_all(pristine);
        fs::copy(f.ks, pristine, fs::copy_options::recursive);
        row.setup();
        auto before = kwtest::tree_digest(f.ks);
        auto r = f.run(row.args, row.env);
        INFO(r.err);
        CHECK(r.code == row.code);
        CHECK_THAT(r.err + r.out, Catch::Contains(row.message));
        CHECK(kwtest::tree_digest(f.ks) == before);
        fs::remove_all(f.ks);
        fs::rename(pristine, f.ks);
        fs::permissions(f.ks, fs::perms::owner_all, fs::perm_options::replace);
    }
    f.must({"keystore", "verify"});
}

TEST_CASE("cli: a master key deleted from the token", "[cli]") {
    StoreFixture f;
    auto meta = nlohmann::json::parse(kwtest::read_text(f.file("store.json")));
    std::string label = meta["master_keys"]["signature"]["label"];
    {
        auto s = f.hsm.session("kw-a");
        keywarden::pkcs11::Template t;
        t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_string(CKA_LABEL, label);
        auto found = s->find(t);
        REQUIRE(found.size() == 1);
        keywarden::pkcs11::destroy_object(*s, found[0]);
        f.hsm.unload();
    }
    auto before = kwtest::tree_digest(f.ks);
    auto r = f.run({"list"});
    CHECK(r.code == 3);
    CHECK_THAT(r.err, Catch::Contains("master signature key '" + label + "'"));
    CHECK_THAT(r.err, Catch::Contains("is not on token 'kw-a'"));
    CHECK(kwtest::tree_digest(f.ks) == before);
}

TEST_CASE("cli: two processes generating at once lose nothing", "[cli]") {
    StoreFixture f;
    std::string errors[2];
    auto worker = [&](const std::string& prefix, int* failures, std::string* err) {
        for (int i = 0; i < 100; ++i) {
            auto r = f.run({"generate", "--client-id", prefix + std::to_string(i), "--symmetric"});
            if (r.code != 0) {
                ++*failures;
                *err += r.err;
            }
        }
    };
    int fa = 0, fb = 0;
    std::thread a(worker, "proc-a-", &fa, &errors[0]), b(worker, "proc-b-", &fb, &errors[1]);
    a.join();
    b.join();
    INFO(errors[0] << errors[1]);
    CHECK(fa == 0);
    CHECK(fb == 0);
    auto doc = nlohmann::json::parse(f.must({"list", "--json"}).out);
    int generated = 0;
    for (const auto& r : doc)
        if (r["key_id"].get<std::string>().starts_with("client/proc-")) ++generated;
    CHECK(generated == 200);
    f.must({"keystore", "verify"});
}

TEST_CASE("cli: bulk generation from a file in one update", "[cli]") {
    StoreFixture f;
    std::string ids = "# comment\nbulk-0001\nbulk-0002\n\nbulk-0003\r\n";
    kwtest::write_file(f.hsm.dir() + "/ids.txt", ids);
    f.must({"generate", "--client-ids-from", f.hsm.dir() + "/ids.txt"});
    auto doc = nlohmann::json::parse(f.must({"list", "--json"}).out);
    int bulk = 0;
    for (const auto& r : doc) bulk += r["key_id"].get<std::string>().starts_with("client/bulk-");
    CHECK(bulk == 9);
    kwtest::write_file(f.hsm.dir() + "/bad.txt", "good-0001\n../evil\n");
    auto before = kwtest::tree_digest(f.ks);
    auto r = f.run({"generate", "--client-ids-from", f.hsm.dir() + "/bad.txt"});
    CHECK(r.code == 2);
    CHECK_THAT(r.err, Catch::Contains("line 2"));
    CHECK(kwtest::tree_digest(f.ks) == before);
}

TEST_CASE("cli: init with master keys named by URI, and the refusals", "[cli]") {
    kwtest::SoftHsm hsm{"softhsm2.conf.in", {"kw-uri"}};
    {
        auto s = hsm.session("kw-uri");
        auto make = [&](const std::string& label, CK_KEY_TYPE type, bool extractable, bool decrypt) {
            keywarden::pkcs11::Template t;
            t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, type).add_ulong(CKA_VALUE_LEN, 32);
            t.add_bool(CKA_TOKEN, true).add_bool(CKA_PRIVATE, true).add_bool(CKA_SENSITIVE, true);
            t.add_bool(CKA_EXTRACTABLE, extractable).add_string(CKA_LABEL, label);
            const std::uint8_t id[] = {1, 2, static_cast<std::uint8_t>(label.size())};
            t.add_bytes(CKA_ID, id);
            // SoftHSM defaults CKA_ENCRYPT/CKA_DECRYPT to true: set both explicitly.
            if (type == CKK_AES)
                t.add_bool(CKA_WRAP, true).add_bool(CKA_UNWRAP, true).add_bool(CKA_DECRYPT, decrypt).add_bool(CKA_ENCRYPT, false);
            else t.add_bool(CKA_SIGN, true).add_bool(CKA_VERIFY, true);
            s->generate_key(type == CKK_AES ? CKM_AES_KEY_GEN : CKM_GENERIC_SECRET_KEY_GEN, t).release();
        };
        make("good-enc", CKK_AES, false, false);
        make("good-sig", CKK_GENERIC_SECRET, false, false);
        make("extractable-enc", CKK_AES, true, false);
        make("decrypting-enc", CKK_AES, false, true);
        hsm.unload();
    }
    Env env{{"KEYWARDEN_MODULE", kwtest::module_path()}, {"KEYWARDEN_PIN", kwtest::SoftHsm::user_pin},
            {"KEYWARDEN_PIN_SOURCE", std::nullopt}, {"KEYWARDEN_TOKEN", std::nullopt},
            {"KEYWARDEN_KEYSTORE", hsm.dir() + "/ks"}};
    auto init = [&](const std::string& enc, std::vector<std::string> extra = {}) {
        std::vector<std::string> args = {"init", "--master-encryption-key", "pkcs11:object=" + enc,
                                         "--master-signature-key", "pkcs11:object=good-sig"};
        args.insert(args.end(), extra.begin(), extra.end());
        return run_cli(args, env);
    };
    auto decrypting = init("decrypting-enc");
    CHECK(decrypting.code == 3);
    CHECK_THAT(decrypting.err, Catch::Contains("also allows encrypt or decrypt"));
    auto extractable = init("extractable-enc");
    CHECK(extractable.code == 3);
    CHECK_THAT(extractable.err, Catch::Contains("--allow-extractable-master"));
    CHECK_FALSE(fs::exists(hsm.dir() + "/ks"));
    auto allowed = init("extractable-enc", {"--allow-extractable-master"});
    CHECK(allowed.code == 0);
    CHECK_THAT(allowed.err, Catch::Contains("warning: master key 'extractable-enc' is extractable"));
    fs::remove_all(hsm.dir() + "/ks");
    auto good = init("good-enc");
    INFO(good.err);
    REQUIRE(good.code == 0);
    CHECK(run_cli({"generate", "--client-id", "uri-client"}, env).code == 0);
    CHECK(run_cli({"keystore", "verify"}, env).code == 0);
    auto meta = nlohmann::json::parse(kwtest::read_text(hsm.dir() + "/ks/store.json"));
    CHECK(meta["master_keys"]["encryption"]["label"] == "good-enc");
}

// The application's API (include/keywarden/reader.hpp) reads what the CLI wrote, the same bytes
// as `keywarden read`, and refuses what the CLI refuses with the same exit codes.
TEST_CASE("reader: the public API reads the keys the CLI shows", "[cli]") {
    StoreFixture f;
    const std::string pin = f.hsm.dir() + "/pin";
    kwtest::write_file(pin, kwtest::SoftHsm::user_pin);
    keywarden::TokenOptions tok;
    tok.module = kwtest::module_path();
    tok.pin_source = "file:" + pin;
    {
        auto store = keywarden::StoreReader::open(f.ks, tok);
        CHECK(store.store_version() == 2);
        auto ids = store.key_ids();
        auto listed = nlohmann::json::parse(f.must({"list", "--json"}).out);
        REQUIRE(ids.size() == listed.size());
        for (std::size_t i = 0; i < ids.size(); ++i) CHECK(ids[i] == listed[i]["key_id"].get<std::string>());
        auto raw = [&](const std::vector<std::string>& args) {
            auto out = f.must(args).out;
            return std::vector<std::uint8_t>(out.begin(), out.end());
        };
        int compared = 0;
        for (const auto& id : ids) {
            INFO(id);
            auto secret = store.read_secret(id);
            CHECK(std::vector<std::uint8_t>(secret.begin(), secret.end()) ==
                  raw({"read", id, "--private", "--format", "raw"}));
            if (id.ends_with("/storage") || id == "poison/keypair") {
                CHECK(store.read_public(id) == raw({"read", id, "--public", "--format", "raw"}));
            } else {
                auto r = kwtest::call([&] { store.read_public(id); });
                CHECK(r.code == 2);
            }
            ++compared;
        }
        CHECK(compared == 9);
        // An older version by number, and one that does not exist.
        auto v1 = store.read_secret("client/alice01/symmetric", 1);
        CHECK(std::vector<std::uint8_t>(v1.begin(), v1.end()) ==
              raw({"read", "client/alice01/symmetric", "--private", "--format", "raw", "--version", "1"}));
        CHECK(v1 != store.read_secret("client/alice01/symmetric"));
        CHECK(kwtest::call([&] { store.read_secret("client/alice01/symmetric", 9); }).code == 1);
        CHECK(kwtest::call([&] { store.read_secret("not a key id"); }).code == 2);
        CHECK(kwtest::call([&] { store.read_secret("client/nobody/symmetric"); }).code == 1);
        // A second reader in the same process, gone again: the first still reads (C_Finalize is
        // per process; both share one module).
        { auto second = keywarden::StoreReader::open(f.ks, tok); CHECK(second.key_ids() == ids); }
        CHECK(store.read_secret("audit/log").size() == 32);
    }

    // A wrong PIN is the token's error (exit 3). Only with no store open in this process: PKCS#11
    // login is per application, so while one is open another session needs no PIN.
    const std::string bad_pin = f.hsm.dir() + "/bad-pin";
    kwtest::write_file(bad_pin, "not-the-pin");
    auto wrong = tok;
    wrong.pin_source = "file:" + bad_pin;
    CHECK(kwtest::call([&] { keywarden::StoreReader::open(f.ks, wrong); }).code == 3);
    CHECK(kwtest::call([&] { keywarden::StoreReader::open(f.hsm.dir() + "/nothing-here", tok); }).code != 0);
}
