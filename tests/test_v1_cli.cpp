// SPDX-License-Identifier: Apache-2.0
// Key store v1, its one-file backup, and migration to v2, end to end through the CLI.
#include <fcntl.h>
#include <sys/stat.h>

#include <ctime>

#include <catch2/catch.hpp>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <map>
#include <set>
#include <sstream>

#include "decrypt_check.hpp"
#include "keywarden/backup_v1.hpp"
#include "keywarden/bundle.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/key_protector.hpp"
#include "keywarden/token_context.hpp"
#include "support.hpp"
#include "two_tokens.hpp"

using kwtest::run_cli;
using Env = std::map<std::string, std::optional<std::string>>;
namespace fs = std::filesystem;

namespace {

// Two tokens; store A is a v1 store on the first with every kind of key, a rotated key, and a
// destroyed version.
struct V1Fixture : kwtest::TwoTokens {
    explicit V1Fixture(bool populate = true) {
        if (!populate) return;
        must({"--keystore", a, "--token", "kw-src", "init", "--store-version", "1"});
        must({"--keystore", a, "generate", "--client-id", "alice01", "--poison-record-keys", "--audit-log-key"});
        must({"--keystore", a, "generate", "--client-id", "bob the client"});
        must({"--keystore", a, "rotate", "client/alice01/symmetric", "client/alice01/storage"});
        must({"--keystore", a, "rotate", "client/alice01/storage"});
        must({"--keystore", a, "destroy", "client/bob the client/hmac", "--version", "1"});
    }
    // Exports store A; returns the backup key as shown.
    std::string export_a(const std::string& file, const std::string& key_file) const {
        must({"--keystore", a, "backup", "--action=export", "--file", file, "--backup-key-out", key_file});
        std::string shown = kwtest::read_text(key_file);
        REQUIRE(shown.starts_with("Backup master key: "));
        REQUIRE(shown.ends_with("\n"));
        return shown.substr(19, shown.size() - 20);
    }
    // Every version of every key of x reads the same (private and public halves) in y; y may
    // hold other keys too.
    void same_material(const std::string& x, const std::string& y, std::size_t expect_versions) const {
        auto vx = versions(x), vy = versions(y);
        REQUIRE(vx.size() == expect_versions);
        std::set<std::string> ids;
        for (const auto& v : vx) ids.insert(std::get<0>(v));
        std::erase_if(vy, [&](const auto& v) { return !ids.count(std::get<0>(v)); });
        CHECK(vx == vy);
        for (const auto& [id, version, state] : vx) {
            INFO(id << " v" << version);
            auto px = run({"--keystore", x, "read", id, "--version", version, "--private"});
            auto py = run({"--keystore", y, "read", id, "--version", version, "--private"});
            CHECK(px.code == py.code);
            CHECK(px.out == py.out);
            if (state == "destroyed") CHECK(px.code == 1);
            else CHECK(px.out.size() == 45);
            if (id.ends_with("/storage") || id == "poison/keypair") {
                auto qx = run({"--keystore", x, "read", id, "--version", version, "--public"});
                auto qy = run({"--keystore", y, "read", id, "--version", version, "--public"});
                CHECK(qx.code == 0);
                CHECK(qx.out == qy.out);
            }
        }
    }
};

std::string other_key(const std::string& key) {
    // Another valid 32-byte key: the first base64 character changed.
    std::string k = key;
    k[0] = k[0] == 'A' ? 'B' : 'A';
    return k;
}

}  // namespace

TEST_CASE("v1 store: Acra's layout, the same commands and output as v2", "[cli]") {
    V1Fixture f;
    for (const char* file : {"alice01_storage", "alice01_storage.pub", "alice01_storage_sym", "alice01_hmac",
                             "bob the client_storage", "secure_log_key", ".poison_key/poison_key",
                             ".poison_key/poison_key.pub", ".poison_key/poison_key_sym", "version", "store.json"}) {
        INFO(file);
        struct stat st {};
        REQUIRE(::stat((f.a + "/" + file).c_str(), &st) == 0);
        CHECK((st.st_mode & 0777) == 0600);
    }
    CHECK(kwtest::read_text(f.a + "/version") == "keywarden-keystore 1\n");
    // Two rotations of the storage keypair: two versions under .old/, named by UTC time.
    std::vector<std::string> olds;
    for (const auto& e : fs::directory_iterator(f.a + "/alice01_storage.old")) olds.push_back(e.path().filename());
    REQUIRE(olds.size() == 2);
    for (const auto& n : olds) CHECK(n.size() == 27);
    struct stat st {};
    ::stat((f.a + "/alice01_storage.old").c_str(), &st);
    CHECK((st.st_mode & 0777) == 0700);

    // The same operations on a v2 store give the same list, apart from dates.
    std::string v2 = f.dir + "/V2";
    f.must({"--keystore", v2, "--token", "kw-src", "init"});
    f.must({"--keystore", v2, "generate", "--client-id", "alice01", "--poison-record-keys", "--audit-log-key"});
    f.must({"--keystore", v2, "generate", "--client-id", "bob the client"});
    f.must({"--keystore", v2, "rotate", "client/alice01/symmetric", "client/alice01/storage"});
    f.must({"--keystore", v2, "rotate", "client/alice01/storage"});
    f.must({"--keystore", v2, "destroy", "client/bob the client/hmac", "--version", "1"});
    CHECK(f.versions(f.a) == f.versions(v2));
    CHECK(f.versions(f.a).size() == 12);
    auto la = f.must({"--keystore", f.a, "list"}), l2 = f.must({"--keystore", v2, "list"});
    CHECK(la.err == l2.err);

    // read, destroy, verify
    auto priv = f.must({"--keystore", f.a, "read", "client/alice01/storage", "--version", "1", "--private"});
    CHECK(priv.out.size() == 45);
    auto pem = f.must({"--keystore", f.a, "read", "poison/keypair", "--public", "--format", "pem"});
    CHECK_THAT(pem.out, Catch::StartsWith("-----BEGIN PUBLIC KEY-----"));
    auto gone = f.run({"--keystore", f.a, "read", "client/bob the client/hmac", "--private"});
    CHECK(gone.code == 1);
    CHECK_THAT(gone.err, Catch::Contains("destroyed"));
    f.must({"--keystore", f.a, "destroy", "client/alice01/storage", "--version", "1"});
    auto v1 = f.run({"--keystore", f.a, "read", "client/alice01/storage", "--version", "1", "--private"});
    CHECK(v1.code == 1);
    auto ver = f.must({"--keystore", f.a, "keystore", "verify", "--json"});
    auto doc = nlohmann::json::parse(ver.out);
    CHECK(doc["ok"] == true);
    CHECK(doc["rings"] == 9);
    CHECK(doc["keys_checked"] == 10);

    // A v2-only command says what to use instead.
    auto exp = f.run({"--keystore", f.a, "export", "--all", "--private-keys", "--key-bundle-file", f.dir + "/x.dat",
                      "--key-bundle-secret", f.dir + "/x.json"});
    CHECK(exp.code == 2);
    CHECK_THAT(exp.err, Catch::Contains("keywarden backup"));
    CHECK(!fs::exists(f.dir + "/x.dat"));
}

std::string trimmed(std::string s) {
    s.erase(0, s.find_first_not_of(' '));
    s.erase(s.find_last_not_of(' ') + 1);
    return s;
}

TEST_CASE("v1 store: renamed, tampered or foreign key files are refused", "[cli]") {
    V1Fixture f;
    std::string other = f.dir + "/OTHER";
    f.must({"--keystore", other, "--token", "kw-src", "init", "--store-version", "1"});
    f.must({"--keystore", other, "generate", "--client-id", "carol01"});
    const std::string pristine = f.dir + "/pristine";
    fs::copy(f.a, pristine, fs::copy_options::recursive);

    struct Row {
        const char* name;
        std::function<void()> damage;
        std::string read_id;  // read that must fail with exit 4
    };
    std::string s = f.a + "/";
    std::vector<Row> rows = {
        {"a key file renamed to another client's name",
         [&] { fs::rename(s + "alice01_hmac", s + "bob the client_hmac"); }, "client/bob the client/hmac"},
        {"a symmetric key file renamed to another kind",
         [&] { fs::remove(s + "alice01_hmac"); fs::copy_file(s + "alice01_storage_sym", s + "alice01_hmac"); },
         "client/alice01/hmac"},
        {"a rotated version copied over the current one",
         [&] {
             auto old = fs::directory_iterator(s + "alice01_storage_sym.old")->path();
             fs::remove(s + "alice01_storage_sym");
             fs::copy_file(old, s + "alice01_storage_sym");
         },
         "client/alice01/symmetric"},
        {"a key file from another store", [&] {
             fs::remove(s + "alice01_hmac");
             fs::copy_file(other + "/carol01_hmac", s + "alice01_hmac");
         }, "client/alice01/hmac"},
        {"a flipped byte in a key file", [&] {
             std::string t = kwtest::read_text(s + "secure_log_key");
             t[t.size() / 2] ^= 0x01;
             kwtest::write_file(s + "secure_log_key", t);
         }, "audit/log"},
        {"a truncated key file", [&] {
             std::string t = kwtest::read_text(s + "secure_log_key");
             kwtest::write_file(s + "secure_log_key", t.substr(0, t.size() - 5));
         }, "audit/log"},
    };
    for (const auto& row : rows) {
        INFO(row.name);
        fs::remove_all(f.a);
        fs::copy(pristine, f.a, fs::copy_options::recursive);
        ::chmod(f.a.c_str(), 0700);
        row.damage();
        auto before = kwtest::tree_digest(f.a);
        auto r = f.run({"--keystore", f.a, "read", row.read_id, "--private"});
        INFO(r.err);
        CHECK(r.code == 4);
        CHECK_THAT(r.err, Catch::StartsWith("error: "));
        auto v = f.run({"--keystore", f.a, "keystore", "verify"});
        CHECK(v.code == 4);
        // The full report, as on a v2 store: the other keys are still checked.
        CHECK_THAT(v.out, Catch::Contains("PROBLEM "));
        CHECK_THAT(v.out, Catch::Contains("FAILED: "));
        // list shows every ring, the damaged one as UNREADABLE, and then exits 4 naming it.
        auto l = f.run({"--keystore", f.a, "list"});
        INFO(l.out << l.err);
        CHECK(l.code == 4);
        std::istringstream lines(l.out);
        std::map<std::string, std::string> state;  // key id -> the STATE column
        for (std::string ln; std::getline(lines, ln);)
            if (ln.size() > 66 && !ln.starts_with("KEY ID"))
                state[trimmed(ln.substr(0, 40))] = trimmed(ln.substr(66, 12));
        CHECK(state[row.read_id] == "UNREADABLE");
        CHECK(state["client/bob the client/symmetric"] == "active");
        CHECK(state["poison/keypair"] == "active");
        CHECK_THAT(l.err, Catch::Contains("listed as UNREADABLE: " + row.read_id));
        auto lj = f.run({"--keystore", f.a, "list", "--json"});
        CHECK(lj.code == 4);
        bool flagged = false;
        for (const auto& ring : nlohmann::json::parse(lj.out))
            if (ring["key_id"] == row.read_id) flagged = ring.contains("problem") && ring["versions"].empty();
        CHECK(flagged);
        CHECK(kwtest::tree_digest(f.a) == before);
    }
    // A wrong master key: the store's key check values do not match the other token's key.
    fs::remove_all(f.a);
    fs::copy(pristine, f.a, fs::copy_options::recursive);
    ::chmod(f.a.c_str(), 0700);
    auto before = kwtest::tree_digest(f.a);
    auto wrong = f.run({"--keystore", f.a, "--token", "kw-dst", "list"});
    CHECK(wrong.code == 3);
    CHECK_THAT(wrong.err, Catch::Contains("not the one holding"));
    auto bad_id = f.run({"--keystore", f.a, "generate", "--client-id", std::string(250, 'x')});
    CHECK(bad_id.code == 2);
    CHECK_THAT(bad_id.err, Catch::Contains("too long for a v1 store"));
    CHECK(kwtest::tree_digest(f.a) == before);
}

TEST_CASE("v1 backup: export, then import on another token under another master key", "[cli]") {
    V1Fixture f;
    std::string file = f.dir + "/encrypted-keys.dat", keyf = f.dir + "/backup-key.txt";
    std::string key = f.export_a(file, keyf);
    CHECK(key.size() == 44);
    for (const auto& p : {file, keyf}) {
        struct stat st {};
        ::stat(p.c_str(), &st);
        CHECK((st.st_mode & 0777) == 0600);
    }
    std::string text = kwtest::read_text(file);
    CHECK_THAT(text, Catch::StartsWith("keywarden-v1-backup 1\n"));
    CHECK(text.find("alice01") == std::string::npos);  // metadata is encrypted
    CHECK(text.find(key) == std::string::npos);

    // A dry run first: every key unwrapped and checked in the destination token; nothing made.
    auto dry = f.must({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", file, "--init",
                       "--dry-run", "--json"},
                      {{"BACKUP_MASTER_KEY", key}});
    auto ddoc = nlohmann::json::parse(dry.out);
    CHECK(ddoc["dry_run"] == true);
    CHECK(ddoc["key_versions"] == 12);
    CHECK(ddoc["unwrapped_in_token"] == 11);  // the versions that hold a key (one is destroyed)
    CHECK(!fs::exists(f.b));
    {
        // The same file with the wrapped halves of client/alice01/symmetric's two versions swapped
        // (entries 6 and 7, in key id and version order) and its MAC made again: each unwraps, to
        // the other version's key. The MAC passes; the dry run's unwrap check does not.
        std::vector<std::string> lines;
        std::istringstream in(text);
        for (std::string l; std::getline(in, l);) lines.push_back(l);
        REQUIRE(lines.size() == 15);  // magic, header, 12 entries, mac
        auto sp7 = lines[7].find(' '), sp8 = lines[8].find(' ');
        std::string k7 = lines[7].substr(sp7), k8 = lines[8].substr(sp8);
        lines[7] = lines[7].substr(0, sp7) + k8;
        lines[8] = lines[8].substr(0, sp8) + k7;
        lines.pop_back();
        std::string body;
        for (const auto& l : lines) body += l + "\n";
        auto bk = keywarden::from_base64(key);
        REQUIRE(bk);
        auto secret = keywarden::backup::v1_backup_secret(keywarden::SecureBytes(bk->begin(), bk->end()));
        auto tag = keywarden::hmac_sha256(secret.signature,
                                          std::span(reinterpret_cast<const std::uint8_t*>(body.data()), body.size()));
        std::string swapped = f.dir + "/swapped-v1.dat";
        kwtest::write_file(swapped, body + "mac " + keywarden::to_hex(tag) + "\n");
        auto bad = f.run({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", swapped,
                          "--init", "--dry-run"},
                         {{"BACKUP_MASTER_KEY", key}});
        CHECK(bad.code == 4);
        CHECK_THAT(bad.err, Catch::Contains("the backup does not restore: client/alice01/symmetric@1: the key's check "
                                            "value differs from its record (and 1 more problem)"));
        CHECK(!fs::exists(f.b));
    }

    auto r = f.must({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", file, "--init"},
                    {{"BACKUP_MASTER_KEY", key}});
    CHECK_THAT(r.err, Catch::Contains("restored 9 keys (12 key versions)"));
    CHECK(!fs::exists(f.dir + "/.B.import.lock"));
    CHECK(kwtest::read_text(f.b + "/version") == "keywarden-keystore 1\n");
    f.same_material(f.a, f.b, 12);
    f.must({"--keystore", f.b, "keystore", "verify"});
    auto ma = nlohmann::json::parse(kwtest::read_text(f.a + "/store.json"));
    auto mb = nlohmann::json::parse(kwtest::read_text(f.b + "/store.json"));
    CHECK(mb["token"]["label"] == "kw-dst");
    CHECK(ma["master_keys"]["encryption"]["kcv"] != mb["master_keys"]["encryption"]["kcv"]);

    // Acra's directory flags name the store; the key never goes to stdout or stderr.
    std::string c = f.dir + "/C";
    auto acra = f.must({"--token", "kw-dst", "backup", "--action=import", "--file", file, "--init",
                        "--keys_private_dir", c, "--keys_public_dir", c},
                       {{"BACKUP_MASTER_KEY", key}});
    CHECK(acra.out.find(key) == std::string::npos);
    CHECK(acra.err.find(key) == std::string::npos);
    f.same_material(f.a, c, 12);

    // A second export has a fresh backup key.
    std::string key2 = f.export_a(f.dir + "/second.dat", f.dir + "/second-key.txt");
    CHECK(key2 != key);
    // To a descriptor the shell opened.
    auto lock_before = kwtest::read_text(f.a + "/.lock");
    auto viafd = kwtest::run_program({"sh", "-c", "\"$0\" --keystore \"$1\" backup --action=export --file \"$2\" "
                                                  "--backup-key-out 3 3>\"$3\"",
                                      kwtest::binary_path(), f.a, f.dir + "/third.dat", f.dir + "/third-key.txt"},
                                     f.env);
    INFO(viafd.err);
    CHECK(viafd.code == 0);
    CHECK_THAT(viafd.err, Catch::Contains("on file descriptor 3"));
    CHECK_THAT(kwtest::read_text(f.dir + "/third-key.txt"), Catch::StartsWith("Backup master key: "));
    CHECK(kwtest::read_text(f.a + "/.lock") == lock_before);
}

TEST_CASE("v1 backup: the openssl command line and the backup key alone decrypt it", "[cli]") {
    V1Fixture f;
    std::string file = f.dir + "/b.dat", out = f.dir + "/plain";
    std::string key = f.export_a(file, f.dir + "/k.txt");
    REQUIRE(kwtest::sh("BACKUP_MASTER_KEY='" + key + "' " + kwtest::source_root() + "/docs/decrypt-bundle.sh " +
                       file + " - " + out + " >/dev/null") == 0);
    int compared = kwtest::compare_decrypted(out, [&](const std::string& id, const std::string& version) {
        return f.must({"--keystore", f.a, "read", id, "--private", "--format", "raw", "--version", version}).out;
    });
    CHECK(compared == 11);
    // A wrong key does not get past the MAC.
    CHECK(kwtest::sh("BACKUP_MASTER_KEY='" + other_key(key) + "' " + kwtest::source_root() +
                     "/docs/decrypt-bundle.sh " + file + " - " + out + "2 2>/dev/null") != 0);
}

namespace {

// Store A exported to b.dat with its key in k.txt, and an empty v1 store B on kw-dst: the setup of
// the bad-input tests below.
struct V1BadInputFixture : V1Fixture {
    const std::string file = dir + "/b.dat", keyf = dir + "/k.txt";
    const std::string key = export_a(file, keyf);
    const std::string good = kwtest::read_text(file);
    const std::string t = dir + "/t.dat";
    V1BadInputFixture() { must({"--keystore", b, "--token", "kw-dst", "init", "--store-version", "1"}); }
};

}  // namespace

TEST_CASE("v1 backup: bad input is refused with a clear error and changes nothing", "[cli]") {
    V1BadInputFixture f;
    const std::string &key = f.key, &good = f.good, &t = f.t;
    // A v2 bundle, for the row that feeds one to the v1 import.
    std::string v2 = f.dir + "/V2";
    f.must({"--keystore", v2, "--token", "kw-src", "init"});
    f.must({"--keystore", v2, "generate", "--audit-log-key"});
    f.must({"--keystore", v2, "export", "--all", "--private-keys", "--key-bundle-file", f.dir + "/v2.dat",
            "--key-bundle-secret", f.dir + "/v2.json"});

    struct Row {
        const char* name;
        std::string file_text;
        std::optional<std::string> env_key;
        int code;
        const char* message;
    };
    std::vector<Row> rows = {
        {"wrong BACKUP_MASTER_KEY", good, other_key(key), 4, "does not open this backup"},
        {"missing BACKUP_MASTER_KEY", good, std::nullopt, 2, "BACKUP_MASTER_KEY is not set"},
        {"BACKUP_MASTER_KEY of the wrong length", good, "AAAAAAAAAAAAAAAAAAAAAA==", 2, "16 bytes"},
        {"BACKUP_MASTER_KEY not base64", good, "not base64 at all!", 2, "not valid base64"},
        {"a v2 bundle fed to the v1 import", kwtest::read_text(f.dir + "/v2.dat"), key, 4, "keywarden import"},
        {"not a backup at all", "hello\n", key, 4, "not a keywarden v1 backup"},
        {"a future format", "keywarden-v1-backup 2\n" + good.substr(good.find('\n') + 1), key, 4, "upgrade keywarden"},
        {"data after the MAC", good + "extra\n", key, 4, "after its MAC"},
    };
    for (std::size_t cut : {0ul, 10ul, 200ul, good.size() / 2, good.size() - 40, good.size() - 1})
        rows.push_back({"truncated", good.substr(0, cut), key, 4, ""});

    auto before = kwtest::tree_digest(f.b);
    for (const auto& row : rows) {
        INFO(row.name);
        kwtest::write_file(t, row.file_text);
        auto r = f.run({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", t},
                       {{"BACKUP_MASTER_KEY", row.env_key}});
        INFO(r.err);
        CHECK(r.code == row.code);
        if (*row.message) CHECK_THAT(r.err, Catch::Contains(row.message));
        CHECK_THAT(r.err, Catch::StartsWith("error: "));
        CHECK(kwtest::tree_digest(f.b) == before);
    }
}

// Every single-byte flip of a small backup file is refused. The sweep runs in this process
// through the library (a process per offset cost minutes under AddressSanitizer); the rows above
// check the CLI's exit codes and messages for the same errors, and a few flips go through it too.
TEST_CASE("v1 backup: every single-byte flip of a small backup file is refused", "[cli]") {
    V1Fixture f(false);
    std::string small_store = f.dir + "/SMALL";
    f.must({"--keystore", small_store, "--token", "kw-src", "init", "--store-version", "1"});
    f.must({"--keystore", small_store, "generate", "--audit-log-key"});
    f.must({"--keystore", f.b, "--token", "kw-dst", "init", "--store-version", "1"});
    std::string sf = f.dir + "/small.dat", t = f.dir + "/t.dat", pin = f.dir + "/pin";
    f.must({"--keystore", small_store, "backup", "--action=export", "--file", sf, "--backup-key-out",
            f.dir + "/small.key"});
    std::string skey = kwtest::read_text(f.dir + "/small.key").substr(19, 44);
    auto key = keywarden::secret_from_base64(skey);
    REQUIRE(key);
    REQUIRE(key->size() == 32);
    const std::string small = kwtest::read_text(sf);
    kwtest::write_file(pin, kwtest::SoftHsm::user_pin);
    const keywarden::pkcs11::TokenOptions dst{kwtest::module_path(), std::nullopt, "kw-dst", "file:" + pin};
    auto import_into = [&](const std::string& store, bool init) {
        keywarden::backup::V1ImportOptions o;
        o.file = t;
        o.keystore_path = store;
        o.init = init;
        return kwtest::call([&] { keywarden::backup::import_v1_backup(dst, *key, o); });
    };
    // The sweep's own control: the unflipped file imports.
    kwtest::write_file(t, small);
    REQUIRE(import_into(f.dir + "/control", true).code == 0);
    CHECK(fs::exists(f.dir + "/control"));

    auto before = kwtest::tree_digest(f.b);
    int refused = 0;
    for (std::size_t i = 0; i < small.size(); ++i) {
        std::string x = small;
        x[i] = static_cast<char>(x[i] ^ 0x01);
        kwtest::write_file(t, x);
        auto r = import_into(f.b, false);
        INFO("offset " << i << ": " << r.err);
        CHECK(r.code == 4);
        refused += r.code == 4;
    }
    CHECK(refused == static_cast<int>(small.size()));
    CHECK(kwtest::tree_digest(f.b) == before);
    for (std::size_t i : {std::size_t{0}, small.size() / 2, small.size() - 2}) {
        std::string x = small;
        x[i] = static_cast<char>(x[i] ^ 0x01);
        kwtest::write_file(t, x);
        auto r = f.run({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", t},
                       {{"BACKUP_MASTER_KEY", skey}});
        INFO("CLI, offset " << i << ": " << r.err);
        CHECK(r.code == 4);
        CHECK_THAT(r.err, Catch::StartsWith("error: "));
    }
    CHECK(kwtest::tree_digest(f.b) == before);
}

TEST_CASE("v1 backup: import into a non-empty store never overwrites", "[cli]") {
    V1BadInputFixture f;
    const std::string &file = f.file, &key = f.key;
    f.must({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", file},
           {{"BACKUP_MASTER_KEY", key}});
    auto filled = kwtest::tree_digest(f.b);
    auto again = f.run({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", file},
                       {{"BACKUP_MASTER_KEY", key}});
    CHECK(again.code == 1);
    CHECK_THAT(again.err, Catch::Contains("already holds 9 keys"));
    auto merge = f.run({"--keystore", f.b, "--token", "kw-dst", "backup", "--action=import", "--file", file,
                        "--merge"},
                       {{"BACKUP_MASTER_KEY", key}});
    CHECK(merge.code == 1);
    CHECK_THAT(merge.err, Catch::Contains("never overwrites"));
    CHECK(kwtest::tree_digest(f.b) == filled);
}

TEST_CASE("v1 backup: export refuses existing outputs and a missing terminal and leaves no file", "[cli]") {
    V1BadInputFixture f;
    const std::string &file = f.file, &keyf = f.keyf, &good = f.good;
    auto src_before = kwtest::tree_digest(f.a);
    auto exists = f.run({"--keystore", f.a, "backup", "--action=export", "--file", file, "--backup-key-out",
                         f.dir + "/new.key"});
    CHECK(exists.code == 1);
    CHECK_THAT(exists.err, Catch::Contains("already exists"));
    CHECK(!fs::exists(f.dir + "/new.key"));
    CHECK(kwtest::read_text(file) == good);
    // run_cli starts keywarden without a controlling terminal.
    auto no_tty = f.run({"--keystore", f.a, "backup", "--action=export", "--file", f.dir + "/n.dat"});
    CHECK(no_tty.code == 2);
    CHECK_THAT(no_tty.err, Catch::Contains("--backup-key-out"));
    CHECK(!fs::exists(f.dir + "/n.dat"));
    auto key_exists = f.run({"--keystore", f.a, "backup", "--action=export", "--file", f.dir + "/m.dat",
                             "--backup-key-out", keyf});
    CHECK(key_exists.code == 1);
    CHECK(!fs::exists(f.dir + "/m.dat"));
    auto same = f.run({"--keystore", f.a, "backup", "--action=export", "--file", f.dir + "/s.dat",
                       "--backup-key-out", f.dir + "/s.dat"});
    CHECK(same.code == 2);
    CHECK(!fs::exists(f.dir + "/s.dat"));
    // A descriptor number must be one the operator opened: not keywarden's own files, and
    // not stdout or stderr.
    for (const char* fd : {"1", "2", "3", "7", "99"}) {
        INFO("fd " << fd);
        auto r = f.run({"--keystore", f.a, "backup", "--action=export", "--file", f.dir + "/fd.dat",
                        "--backup-key-out", fd});
        CHECK(r.code == 2);
        CHECK(!fs::exists(f.dir + "/fd.dat"));
    }
    CHECK(kwtest::tree_digest(f.a) == src_before);
}

TEST_CASE("migrate: a v1 store with rotated keys into v2, all or nothing, idempotent", "[cli]") {
    V1Fixture f;
    f.must({"--keystore", f.b, "--token", "kw-dst", "init"});
    auto empty = kwtest::tree_digest(f.b);
    auto src_before = kwtest::tree_digest(f.a);

    auto dry = f.must({"migrate", "--src-keystore", f.a, "--dst-keystore", f.b, "--dry-run"});
    CHECK_THAT(dry.out, Catch::Contains("move     client/alice01/storage"));
    CHECK(kwtest::tree_digest(f.b) == empty);

    // Across two tokens, with different master keys.
    auto m = f.must({"migrate", "--src-keystore", f.a, "--dst-keystore", f.b, "--json"});
    auto doc = nlohmann::json::parse(m.out);
    CHECK(doc["moved"].size() == 9);
    CHECK(doc["key_versions"] == 12);
    CHECK(doc["same_token"] == false);
    CHECK(kwtest::read_text(f.b + "/version") == "keywarden-keystore 2\n");
    f.same_material(f.a, f.b, 12);
    // Rotated v1 keys are the older versions, in date order.
    auto list = nlohmann::json::parse(f.must({"--keystore", f.b, "list", "--rotated", "--json"}).out);
    for (const auto& r : list) {
        if (r["key_id"] != "client/alice01/storage") continue;
        REQUIRE(r["versions"].size() == 3);
        CHECK(r["versions"][0]["state"] == "deactivated");
        CHECK(r["versions"][1]["state"] == "deactivated");
        CHECK(r["versions"][2]["current"] == true);
        CHECK(r["versions"][0]["valid_until"] <= r["versions"][1]["valid_until"]);
    }
    f.must({"--keystore", f.b, "keystore", "verify"});
    CHECK(kwtest::tree_digest(f.a) == src_before);  // the source is only read

    // Run twice: nothing is duplicated, nothing changes.
    auto migrated = kwtest::tree_digest(f.b);
    auto again = f.must({"migrate", "--src-keystore", f.a, "--dst-keystore", f.b});
    CHECK_THAT(again.err, Catch::Contains("nothing to migrate"));
    CHECK(kwtest::tree_digest(f.b) == migrated);

    // A non-empty destination with other keys needs --force; on the same token this time.
    std::string c = f.dir + "/C";
    f.must({"--keystore", c, "--token", "kw-src", "init"});
    f.must({"--keystore", c, "generate", "--client-id", "zed0001"});
    auto c_before = kwtest::tree_digest(c);
    auto refused = f.run({"migrate", "--src-keystore", f.a, "--dst-keystore", c});
    CHECK(refused.code == 1);
    CHECK_THAT(refused.err, Catch::Contains("--force"));
    CHECK(kwtest::tree_digest(c) == c_before);
    auto forced = f.must({"migrate", "--src-keystore", f.a, "--dst-keystore", c, "--force", "--json"});
    CHECK(nlohmann::json::parse(forced.out)["same_token"] == true);
    f.same_material(f.a, c, 12);
    CHECK(f.versions(c).size() == 15);

    // Once forced, a second run finds nothing to move and needs no --force.
    auto forced_again = f.must({"migrate", "--src-keystore", f.a, "--dst-keystore", c});
    CHECK_THAT(forced_again.err, Catch::Contains("nothing to migrate"));

    // A tampered source key file: refused before anything is written, no pending file left.
    std::string e = f.dir + "/E";
    f.must({"--keystore", e, "--token", "kw-src", "init"});
    auto e_before = kwtest::tree_digest(e);
    std::string victim = f.a + "/secure_log_key";
    std::string orig = kwtest::read_text(victim), bad = orig;
    bad[bad.size() / 2] ^= 0x01;
    kwtest::write_file(victim, bad);
    auto tampered = f.run({"migrate", "--src-keystore", f.a, "--dst-keystore", e});
    CHECK(tampered.code == 4);
    CHECK(kwtest::tree_digest(e) == e_before);
    kwtest::write_file(victim, orig);

    // The same id with other keys is refused, even with --force.
    std::string d = f.dir + "/D";
    f.must({"--keystore", d, "--token", "kw-src", "init"});
    f.must({"--keystore", d, "generate", "--audit-log-key"});
    auto d_before = kwtest::tree_digest(d);
    auto conflict = f.run({"migrate", "--src-keystore", f.a, "--dst-keystore", d, "--force"});
    CHECK(conflict.code == 1);
    CHECK_THAT(conflict.err, Catch::Contains("different keys"));
    CHECK(kwtest::tree_digest(d) == d_before);
    // A missing destination, or a v2 source.
    auto none = f.run({"migrate", "--src-keystore", f.a, "--dst-keystore", f.dir + "/nowhere"});
    CHECK(none.code == 1);
    CHECK_THAT(none.err, Catch::Contains("keywarden init"));
    auto v2src = f.run({"migrate", "--src-keystore", f.b, "--dst-keystore", d});
    CHECK(v2src.code == 2);
}

// A token that corrupts the blobs of the keys it wraps (tests/wrap_shim.cpp, flip-sensitive):
// the backup's self-check fails, exit 4, no file is left and no backup key is shown.
TEST_CASE("v1 backup: a backup whose self-check fails leaves no file and shows no key", "[cli]") {
    V1Fixture f;
    const std::string out = f.dir + "/out";
    fs::create_directory(out);
    const std::string store_before = kwtest::tree_digest(f.a);
    auto r = f.run({"--keystore", f.a, "backup", "--action=export", "--file", out + "/backup.dat",
                    "--backup-key-out", out + "/key.txt"},
                   {{"KEYWARDEN_MODULE", std::string(KW_WRAP_SHIM_PATH)},
                    {"KW_SHIM_TARGET", kwtest::module_path()},
                    {"KW_SHIM_WRAP", std::string("flip-sensitive")}});
    CHECK(r.code == 4);
    CHECK_THAT(r.err, Catch::Contains("the backup just written does not verify: ") &&
                          Catch::Contains("hint: nothing was written and no backup key was shown"));
    CHECK_THAT(r.out + r.err, !Catch::Contains("Backup master key"));
    CHECK(!fs::exists(out + "/key.txt"));  // where the key would have been shown
    CHECK(fs::is_empty(out));
    CHECK(kwtest::tree_digest(f.a) == store_before);
}

// A killed backup can leave its temp file beside the backup file; the next backup to that path
// removes it once it is a minute old (and not held by a running keywarden), with a warning.
TEST_CASE("v1: backup removes the temp file a killed backup left", "[cli]") {
    V1Fixture f;
    const std::string file = f.dir + "/v1.dat", stale = f.dir + "/.v1.dat.tmp-AbC123", young = f.dir + "/.v1.dat.tmp-XyZ789";
    kwtest::write_file(stale, "half a backup");
    kwtest::write_file(young, "a running backup's file");
    struct timespec ts[2] = {{std::time(nullptr) - 120, 0}, {std::time(nullptr) - 120, 0}};
    REQUIRE(::utimensat(AT_FDCWD, stale.c_str(), ts, AT_SYMLINK_NOFOLLOW) == 0);
    auto r = f.must({"--keystore", f.a, "backup", "--action=export", "--file", file, "--backup-key-out",
                     f.dir + "/v1.key"});
    CHECK_FALSE(fs::exists(stale));
    CHECK_THAT(r.err, Catch::Contains("removed " + stale + ", left behind by an earlier run that was killed"));
    CHECK(fs::exists(young));  // too young to be a leftover
    CHECK(fs::exists(file));
}
