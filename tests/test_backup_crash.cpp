// SPDX-License-Identifier: Apache-2.0
// Backups killed, interrupted or undermined: a full disk, a kill at any point of init, import and
// export, a token that corrupts what it wraps, a path taken while an export runs.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <thread>

#include <catch2/catch.hpp>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>
#include <chrono>
#include <map>
#include <set>

#include "decrypt_check.hpp"
#include "keywarden/backup.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/key_protector.hpp"
#include "keywarden/token_context.hpp"
#include "backup_fixture.hpp"
#include "support.hpp"
#include "two_tokens.hpp"

using kwtest::run_cli;
using namespace kwtest::backup_tests;
using Env = std::map<std::string, std::optional<std::string>>;
namespace fs = std::filesystem;

TEST_CASE("backup: a full disk or a kill during import leaves the target as it was", "[cli]") {
    BackupFixture f(false);
    bulk_store(f);  // enough keys that an import takes a while
    std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    f.must({"--keystore", f.b, "--token", "kw-dst", "init"});
    auto before = kwtest::tree_digest(f.b);

    auto full = kwtest::run_program([&] {
        std::vector<std::string> v = {"/bin/sh", "-c", "ulimit -f 8; exec \"$0\" \"$@\"", kwtest::binary_path()};
        auto i = f.imp(f.b, bundle, secret);
        v.insert(v.end(), i.begin(), i.end());
        return v;
    }(), f.env);
    INFO(full.err);
    CHECK(full.code == 1);
    CHECK_THAT(full.err, Catch::Contains("full"));
    CHECK(kwtest::tree_digest(f.b) == before);

    // Kill points relative to how long a whole import takes on this machine, so that they land
    // inside the import whatever the machine's speed.
    auto t0 = std::chrono::steady_clock::now();
    f.must([&] { auto v = f.imp(f.dir + "/timing", bundle, secret); v.push_back("--init"); return v; }());
    double whole = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    int kills = 0;
    for (double fraction : {0.1, 0.25, 0.4, 0.55, 0.7, 0.85}) {
        char delay[32];
        std::snprintf(delay, sizeof delay, "%.3f", whole * fraction);
        INFO("killed after " << delay << " s of " << whole);
        std::vector<std::string> v = {"timeout", "-s", "KILL", delay, kwtest::binary_path()};
        auto i = f.imp(f.b, bundle, secret);
        v.insert(v.end(), i.begin(), i.end());
        auto r = kwtest::run_program(v, f.env);
        if (r.code == 0) break;  // finished before the kill: nothing more to learn
        CHECK(r.code == 128 + 9);
        ++kills;
        f.must({"--keystore", f.b, "keystore", "verify"});
        if (kwtest::tree_digest(f.b) == before) continue;
        // Killed after the atomic switch (while removing the old tree): the import is whole.
        CHECK(f.versions(f.b) == f.versions(f.a));
        break;
    }
    CHECK(kills >= 3);  // the kills really landed in the middle of imports
    // And a complete import still works afterwards (it also clears the killed staging dirs).
    auto done = f.run(f.imp(f.b, bundle, secret));
    if (done.code != 0) CHECK_THAT(done.err, Catch::Contains("--merge"));  // an earlier run finished
    CHECK(f.versions(f.b) == f.versions(f.a));
    int leftovers = 0;
    for (const auto& e : fs::directory_iterator(f.dir))
        leftovers += e.path().filename().string().starts_with(".B.import-");
    CHECK(leftovers == 0);
}

// What a killed `import --init` into R leaves is its staging directory `.R.import-init-XXXXXX`:
// a new store whose generated master keys are on the token. The next `import --init` into R
// destroys those keys (they protect nothing), and only those.
TEST_CASE("backup: import --init destroys the master keys a killed import --init had made", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    auto label_of = [&](const std::string& store, const char* role) {
        return nlohmann::json::parse(kwtest::read_text(store + "/store.json"))["master_keys"][role]["label"]
            .get<std::string>();
    };
    // A live store C on kw-dst, whose keys a leftover names with --master-*-key.
    const std::string c = f.dir + "/C";
    f.must({"--keystore", c, "--token", "kw-dst", "init"});
    struct Leftover {
        std::string name, token;
        bool named, keys_go;
        std::string version = "2";
        const char* mode = "";  // chmod after init
        bool unfinished = false;  // killed before its version file: store.json only
    };
    const std::vector<Leftover> leftovers = {
        {".R.import-init-Killed", "kw-dst", false, true},       // generated keys on this token: they go
        {".R.import-init-KillV1", "kw-dst", false, true, "1"},  // a v1 import --init's one key too
        {".R.import-init-OtherT", "kw-src", false, false},      // on another token: named in a warning
        {".R.import-init-NamedK", "kw-dst", true, false},       // C's keys, named: never touched
        {".R.import-Merged", "kw-dst", false, false},           // not an --init: a merge names live keys
        {".R.import-init-Public", "kw-dst", false, false, "2", "0755"},  // not private: not believed
        {".R.import-init-Unfini", "kw-dst", false, true, "2", "", true},  // no version file yet: keys go
        {".R.import-init-NotMkdtemp", "kw-dst", false, false},              // not a name mkdtemp gives
    };
    for (const auto& l : leftovers) {
        std::vector<std::string> init = {"--keystore", f.dir + "/" + l.name, "--token", l.token, "init",
                                         "--store-version", l.version};
        if (l.named)
            for (std::string role : {"encryption", "signature"})
                init.insert(init.end(), {"--master-" + role + "-key", "pkcs11:object=" + label_of(c, role.c_str())});
        f.must(init);
        if (*l.mode) REQUIRE(kwtest::sh(std::string("chmod ") + l.mode + " '" + f.dir + "/" + l.name + "'") == 0);
        // A copy elsewhere tells afterwards whether its master keys are still on the token.
        REQUIRE(kwtest::sh("cp -a '" + f.dir + "/" + l.name + "' '" + f.dir + "/copy" + l.name + "'") == 0);
        if (l.unfinished) fs::remove(f.dir + "/" + l.name + "/version");
    }
    const std::string killed_enc = label_of(f.dir + "/copy.R.import-init-Killed", "encryption");
    const std::string other_enc = label_of(f.dir + "/copy.R.import-init-OtherT", "encryption");

    const std::string r = f.dir + "/R";
    auto done = f.must([&] { auto v = f.imp(r, bundle, secret); v.push_back("--init"); return v; }());
    CHECK(f.versions(r) == f.versions(f.a));
    CHECK_THAT(done.err, Catch::Contains("removed the master key '" + killed_enc + "'"));
    CHECK_THAT(done.err, Catch::Contains("removed the master key '" + label_of(f.dir + "/copy.R.import-init-Killed", "signature") + "'"));
    CHECK_THAT(done.err, Catch::Contains(other_enc) && Catch::Contains("on token 'kw-src'"));
    CHECK_THAT(done.err, Catch::Contains("not acting on the master keys that " + f.dir + "/.R.import-init-Public/store.json"));
    // Gone, except where keys may remain: on another token, or named by a directory not believed.
    std::set<std::string> left;
    for (const auto& e : fs::directory_iterator(f.dir))
        if (e.path().filename().string().starts_with(".R.import-")) left.insert(e.path().filename().string());
    CHECK(left == std::set<std::string>{".R.import-init-OtherT", ".R.import-init-Public", ".R.import-init-NotMkdtemp"});
    CHECK_THAT(done.err, Catch::Contains("and leaving " + f.dir + "/.R.import-init-Public"));
    for (const auto& l : leftovers) {
        INFO(l.name);
        auto opened = f.run({"--keystore", f.dir + "/copy" + l.name, "--token", l.token, "keystore", "verify"});
        if (l.keys_go) {
            CHECK(opened.code == 3);
            CHECK_THAT(opened.err, Catch::Contains("is not on token"));
        } else {
            CHECK(opened.code == 0);
        }
    }
    f.must({"--keystore", c, "--token", "kw-dst", "keystore", "verify"});
    // A merge import handles an --init leftover too when no --init to that path runs (it takes
    // the lock such an import holds, without waiting): the directory and its keys go.
    f.must({"--keystore", f.dir + "/.R.import-init-Again1", "--token", "kw-dst", "init"});
    REQUIRE(kwtest::sh("cp -a '" + f.dir + "/.R.import-init-Again1' '" + f.dir + "/copy-again'") == 0);
    auto merged = f.run([&] { auto v = f.imp(r, bundle, secret); v.insert(v.end(), {"--merge", "--on-conflict", "skip"}); return v; }());
    INFO(merged.err);
    CHECK(merged.code == 0);
    CHECK_FALSE(fs::exists(f.dir + "/.R.import-init-Again1"));
    CHECK(f.run({"--keystore", f.dir + "/copy-again", "--token", "kw-dst", "keystore", "verify"}).code == 3);
    // While an --init to that path holds its lock, a merge leaves such leftovers alone.
    f.must({"--keystore", f.dir + "/.R.import-init-Held01", "--token", "kw-dst", "init"});
    REQUIRE(kwtest::sh("cp -a '" + f.dir + "/.R.import-init-Held01' '" + f.dir + "/copy-held'") == 0);
    int held = ::open((f.dir + "/.R.import.lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    REQUIRE(held >= 0);
    REQUIRE(::flock(held, LOCK_EX | LOCK_NB) == 0);
    auto merged2 = f.run([&] { auto v = f.imp(r, bundle, secret); v.insert(v.end(), {"--merge", "--on-conflict", "skip"}); return v; }());
    ::close(held);
    CHECK(merged2.code == 0);
    CHECK(fs::exists(f.dir + "/.R.import-init-Held01"));
    f.must({"--keystore", f.dir + "/copy-held", "--token", "kw-dst", "keystore", "verify"});
}

// A plain init records the master keys it is about to generate too (".<name>.init-keys-XXXXXX"),
// removes the record once store.json names them, and the next init to that path destroys the
// keys a killed init's record names. A record another init still holds (flock) is left alone,
// and so is an unfinished store (store.json but no version file), which init refuses, naming its
// keys.
TEST_CASE("backup: init removes the master keys a killed init recorded, and names those of an unfinished store", "[cli]") {
    BackupFixture f(false);
    auto record_of = [&](const std::string& store) {
        auto meta = nlohmann::json::parse(kwtest::read_text(store + "/store.json"));
        nlohmann::json keys = nlohmann::json::array();
        for (const char* role : {"encryption", "signature"})
            keys.push_back({{"role", role}, {"label", meta["master_keys"][role]["label"]}, {"id", meta["master_keys"][role]["id"]}});
        return nlohmann::json{{"format", "keywarden-import-init-keys"}, {"version", 1},
                              {"store_id", meta["store_id"]},         {"store_version", 2},
                              {"token_serial", meta["token"]["serial"]}, {"token_label", meta["token"]["label"]},
                              {"keys", keys}}.dump(2);
    };
    auto label = [&](const std::string& store, const char* role) {
        return nlohmann::json::parse(kwtest::read_text(store + "/store.json"))["master_keys"][role]["label"].get<std::string>();
    };
    auto write_record = [&](const std::string& path, const std::string& text) {
        kwtest::write_file(path, text);
        fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write);
    };
    // A killed init's record: its keys go.
    const std::string x = f.dir + "/X", killed = f.dir + "/.T.init-keys-Killed";
    f.must({"--keystore", x, "--token", "kw-dst", "init"});
    write_record(killed, record_of(x));
    auto t = f.must({"--keystore", f.dir + "/T", "--token", "kw-dst", "init"});
    CHECK_THAT(t.err, Catch::Contains("removed the master key '" + label(x, "encryption") + "'") &&
                          Catch::Contains("that an init which was killed had made"));
    CHECK_THAT(t.err, Catch::Contains("removed the master key '" + label(x, "signature") + "'"));
    CHECK_FALSE(fs::exists(killed));
    CHECK(f.run({"--keystore", x, "keystore", "verify"}).code == 3);
    for (const auto& e : fs::directory_iterator(f.dir)) CHECK_FALSE(e.path().filename().string().starts_with(".T.init-keys-"));

    // A record a running init holds: left alone.
    const std::string y = f.dir + "/Y", live = f.dir + "/.U.init-keys-Live01";
    f.must({"--keystore", y, "--token", "kw-dst", "init"});
    write_record(live, record_of(y));
    int fd = ::open(live.c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
    auto u = f.must({"--keystore", f.dir + "/U", "--token", "kw-dst", "init"});
    ::close(fd);
    CHECK_THAT(u.err, !Catch::Contains("removed the master key"));
    CHECK(fs::exists(live));
    f.must({"--keystore", y, "keystore", "verify"});

    // An unfinished store: refused, its keys named, nothing changed.
    const std::string v = f.dir + "/V";
    f.must({"--keystore", v, "--token", "kw-dst", "init"});
    fs::remove(v + "/version");
    auto before = kwtest::tree_digest(v);
    auto again = f.run({"--keystore", v, "--token", "kw-dst", "init"});
    CHECK(again.code == 1);
    CHECK_THAT(again.err, Catch::Contains("unfinished store") && Catch::Contains("'" + label(v, "encryption") + "'") &&
                              Catch::Contains("'" + label(v, "signature") + "'"));
    CHECK(kwtest::tree_digest(v) == before);
    // Killed before store.json: only the store's .lock. Refused as unfinished too.
    const std::string h = f.dir + "/H";
    fs::create_directory(h);
    ::chmod(h.c_str(), 0700);
    kwtest::write_file(h + "/.lock", "");
    auto hidden = f.run({"--keystore", h, "--token", "kw-dst", "init"});
    CHECK(hidden.code == 1);
    CHECK_THAT(hidden.err, Catch::Contains("unfinished store (no store.json yet, only its .lock)"));

    // "P/" names the store P: the record goes beside P, not into it, and is gone at the end; a
    // record a killed run had not finished writing (no key made yet) is removed.
    const std::string stale = f.dir + "/.P.init-keys.tmp-Half01";
    write_record(stale, "{\"format\": \"keywarden-imp");
    f.must({"--keystore", f.dir + "/P/", "--token", "kw-dst", "init"});
    f.must({"--keystore", f.dir + "/P", "keystore", "verify"});
    CHECK_FALSE(fs::exists(stale));
    for (const auto& e : fs::directory_iterator(f.dir)) CHECK_FALSE(e.path().filename().string().starts_with(".P.init-keys"));
    for (const auto& e : fs::directory_iterator(f.dir + "/P")) CHECK_FALSE(e.path().filename().string().starts_with("..init-keys"));

    // "link/../Q" is where the kernel resolves it: beside the link's target, not beside the link.
    fs::create_directories(f.dir + "/real/sub");
    fs::create_directory_symlink(f.dir + "/real/sub", f.dir + "/link");
    f.must({"--keystore", f.dir + "/link/../Q", "--token", "kw-dst", "init"});
    CHECK(fs::exists(f.dir + "/real/Q/version"));
    CHECK_FALSE(fs::exists(f.dir + "/Q"));
    std::string bundle = f.dir + "/q.dat", secret = f.dir + "/q.json";
    f.must({"--keystore", f.dir + "/real/Q", "generate", "--client-id", "qclient"});
    f.must({"--keystore", f.dir + "/real/Q", "export", "--all", "--private-keys", "--key-bundle-file", bundle, "--key-bundle-secret", secret});
    f.must({"--keystore", f.dir + "/link/../Q2", "--token", "kw-dst", "import", "--init", "--key-bundle-file", bundle, "--key-bundle-secret", secret});
    CHECK(fs::exists(f.dir + "/real/Q2/version"));
    CHECK_FALSE(fs::exists(f.dir + "/Q2"));
    f.must({"--keystore", f.dir + "/link/../Q2", "--token", "kw-dst", "import", "--merge", "--on-conflict", "skip", "--key-bundle-file", bundle, "--key-bundle-secret", secret});
    f.must({"--keystore", f.dir + "/real/Q2", "keystore", "verify"});
    // A store path ending in ".." names no store directory of its own: refused, nothing made.
    auto dots = f.run({"--keystore", f.dir + "/real/Q2/keys/..", "--token", "kw-dst", "import", "--merge",
                       "--on-conflict", "skip", "--key-bundle-file", bundle, "--key-bundle-secret", secret});
    CHECK(dots.code == 2);
    CHECK_THAT(dots.err, Catch::Contains("ends in '..'"));

    // The record a real init writes names exactly the keys its store.json names, and is gone at
    // the end (a shell spins until it appears and copies it; a missed window is retried).
    bool caught = false;
    for (int attempt = 0; attempt < 20 && !caught; ++attempt) {
        const std::string name = "W" + std::to_string(attempt), copy = f.dir + "/" + name + ".copy";
        const std::string script =
            "\"$0\" \"$@\" >/dev/null 2>&1 & pid=$!; "
            "while kill -0 $pid 2>/dev/null; do "
            "  for r in \"$KW_RECORD\"*; do [ -s \"$r\" ] && cp \"$r\" \"$KW_COPY\" 2>/dev/null && break 2; done; "
            "done; wait $pid; echo $?";
        auto env = f.env;
        env["KW_RECORD"] = f.dir + "/." + name + ".init-keys-";
        env["KW_COPY"] = copy;
        auto r = kwtest::run_program({"/bin/sh", "-c", script, kwtest::binary_path(), "--keystore", f.dir + "/" + name,
                                      "--token", "kw-dst", "init"},
                                     env);
        REQUIRE(r.out == "0\n");
        for (const auto& e : fs::directory_iterator(f.dir))
            CHECK_FALSE(e.path().filename().string().starts_with("." + name + ".init-keys-"));
        if (!fs::exists(copy) || !nlohmann::json::accept(kwtest::read_text(copy))) continue;
        caught = true;
        CHECK(nlohmann::json::parse(kwtest::read_text(copy)) == nlohmann::json::parse(record_of(f.dir + "/" + name)));
    }
    CHECK(caught);
}

// An import --init killed after generating master keys but before its store.json named them
// leaves only ".R.import-keys-XXXXXX", the record of the keys it was about to generate (written
// and synced before the first one). The next import --init into R destroys the keys a record
// names, on its own token, when label and id are the generated ones, and removes the record; a
// record it cannot read names no key. A record whose keys may remain (on another token) is kept.
// A record that is not a 0600 regular file of this user stops the import and stays. Each row's
// keys are those of a store S made by init; S opened afterwards tells whether they are still on
// the token.
TEST_CASE("backup: import --init destroys the keys a killed import --init recorded before generating them", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    enum Record { removed, kept, refused };
    struct Row {
        const char* what;
        std::string token, version;
        std::function<void(nlohmann::json&)> change;  // of the record
        bool keys_go;
        Record record;
        std::string says;  // in the import's stderr; "LABEL-enc" stands for S's encryption key
        std::function<void(const std::string&)> place = {};  // how the record file is put there
    };
    auto keep = [](nlohmann::json&) {};
    const std::vector<Row> rows = {
        {"generated keys on this token", "kw-dst", "2", keep, true, removed, "removed the master key 'LABEL-enc'"},
        {"a v1 store's one key", "kw-dst", "1", keep, true, removed, "removed the master key 'LABEL-v1'"},
        {"keys on another token", "kw-src", "2", keep, false, kept, "on token 'kw-src'"},
        {"another id under the label", "kw-dst", "2",
         [](nlohmann::json& j) { j["keys"][0]["id"] = std::string(32, '0'); j["keys"].erase(1); }, false, removed,
         ""},
        {"labels not of the record's store id", "kw-dst", "2",
         [](nlohmann::json& j) { j["store_id"] = std::string(32, 'f'); }, false, removed, ""},
        {"a future record version", "kw-dst", "2", [](nlohmann::json& j) { j["version"] = 2; }, false, removed,
         "which this version cannot read"},
        {"a torn record", "kw-dst", "2", [](nlohmann::json& j) { j = "{\"format\": \"keywarden-imp"; }, false,
         removed, "which this version cannot read"},
        {"a record others may write (0644)", "kw-dst", "2", keep, false, refused, "not a regular file of this user",
         [](const std::string& p) { fs::permissions(p, fs::perms::owner_read | fs::perms::owner_write |
                                                            fs::perms::group_read | fs::perms::others_read); }},
        {"a symbolic link to a record", "kw-dst", "2", keep, false, refused, "not a regular file of this user",
         [](const std::string& p) {
             const std::string target = fs::path(p).parent_path().string() + "/linked-record";
             fs::rename(p, target);
             fs::create_symlink(target, p);
         }},
        {"a directory", "kw-dst", "2", keep, false, refused, "not a regular file of this user",
         [](const std::string& p) {
             fs::remove(p);
             fs::create_directory(p);
         }},
    };
    int n = 0;
    for (const auto& row : rows) {
        INFO(row.what);
        const std::string s = f.dir + "/S" + std::to_string(n), r = f.dir + "/R" + std::to_string(n);
        const std::string record = f.dir + "/.R" + std::to_string(n) + ".import-keys-Killed";
        ++n;
        f.must({"--keystore", s, "--token", row.token, "init", "--store-version", row.version});
        auto meta = nlohmann::json::parse(kwtest::read_text(s + "/store.json"));
        nlohmann::json keys = nlohmann::json::array();
        for (const char* role : {"encryption", "signature"}) {
            if (row.version == "1" && std::string(role) == "signature") break;
            const auto& k = meta["master_keys"][role];
            keys.push_back({{"role", row.version == "1" ? "single" : role}, {"label", k["label"]}, {"id", k["id"]}});
        }
        nlohmann::json rec = {{"format", "keywarden-import-init-keys"}, {"version", 1},
                              {"store_id", meta["store_id"]},         {"store_version", std::stoi(row.version)},
                              {"token_serial", meta["token"]["serial"]}, {"token_label", meta["token"]["label"]},
                              {"keys", keys}};
        row.change(rec);
        kwtest::write_file(record, rec.is_string() ? rec.get<std::string>() : rec.dump(2));
        fs::permissions(record, fs::perms::owner_read | fs::perms::owner_write);
        if (row.place) row.place(record);
        auto done = f.run([&] { auto v = f.imp(r, bundle, secret); v.push_back("--init"); return v; }());
        INFO(done.err);
        if (row.record == refused) {
            CHECK(done.code != 0);
            CHECK_FALSE(fs::exists(r));
        } else {
            CHECK(done.code == 0);
            CHECK(f.versions(r) == f.versions(f.a));
        }
        CHECK(fs::exists(fs::symlink_status(record)) == (row.record != removed));
        std::string says = row.says;
        if (auto at = says.find("LABEL"); at != std::string::npos)
            says.replace(at, 5, "keywarden-" + meta["store_id"].get<std::string>().substr(0, 8));
        if (!says.empty()) CHECK_THAT(done.err, Catch::Contains(says));
        if (!row.keys_go) CHECK_THAT(done.err, !Catch::Contains("removed the master key"));
        auto opened = f.run({"--keystore", s, "--token", row.token, "keystore", "verify"});
        if (row.keys_go) {
            CHECK(opened.code == 3);
            CHECK_THAT(opened.err, Catch::Contains("is not on token"));
        } else {
            CHECK(opened.code == 0);
        }
        if (row.record == kept) {
            // Kept for a later run, which warns again and still imports; a merge never touches it.
            auto again = f.run({"--keystore", r, "--token", "kw-dst", "import", "--key-bundle-file", bundle,
                                "--key-bundle-secret", secret, "--merge", "--on-conflict", "skip"});
            CHECK(again.code == 0);
            CHECK(fs::exists(record));
        }
    }
}

// The record an import --init writes before generating its master keys names exactly the keys
// its store.json names afterwards, and is gone when it ends. A shell spins until the record
// appears and copies it (an attempt that misses the window is repeated).
TEST_CASE("backup: import --init records the master keys it generates before it makes them", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    bool caught = false;
    for (int attempt = 0; attempt < 20 && !caught; ++attempt) {
        const std::string name = "R" + std::to_string(attempt);
        const std::string record = f.dir + "/." + name + ".import-keys-", copy = f.dir + "/" + name + ".copy";
        // The record's name ends in 6 random characters.
        const std::string script =
            "\"$0\" \"$@\" >/dev/null 2>&1 & pid=$!; "
            "while kill -0 $pid 2>/dev/null; do "
            "  for r in \"$KW_RECORD\"*; do [ -f \"$r\" ] && cp \"$r\" \"$KW_COPY\" 2>/dev/null && break 2; done; "
            "done; wait $pid; echo $?";
        auto env = f.env;
        env["KW_RECORD"] = record;
        env["KW_COPY"] = copy;
        std::vector<std::string> cmd = {"/bin/sh", "-c", script, kwtest::binary_path()};
        auto v = f.imp(f.dir + "/" + name, bundle, secret);
        v.push_back("--init");
        cmd.insert(cmd.end(), v.begin(), v.end());
        auto r = kwtest::run_program(cmd, env);
        INFO(r.out << r.err);
        REQUIRE(r.out == "0\n");
        for (const auto& e : fs::directory_iterator(f.dir))
            CHECK_FALSE(e.path().filename().string().starts_with("." + name + ".import-"));
        if (!fs::exists(copy)) continue;  // missed the window
        if (!nlohmann::json::accept(kwtest::read_text(copy))) continue;  // copied while being written
        caught = true;
        INFO(kwtest::read_text(copy));
        auto rec = nlohmann::json::parse(kwtest::read_text(copy));
        auto meta = nlohmann::json::parse(kwtest::read_text(f.dir + "/" + name + "/store.json"));
        CHECK(rec["format"] == "keywarden-import-init-keys");
        CHECK(rec["version"] == 1);
        CHECK(rec["store_id"] == meta["store_id"]);
        CHECK(rec["store_version"] == 2);
        CHECK(rec["token_serial"] == meta["token"]["serial"]);
        REQUIRE(rec["keys"].size() == 2);
        for (const auto& k : rec["keys"]) {
            const auto& m = meta["master_keys"][k["role"].get<std::string>()];
            CHECK(k["label"] == m["label"]);
            CHECK(k["id"] == m["id"]);
        }
        // cp gives the copy the record's mode less the umask.
        CHECK((fs::status(copy).permissions() & (fs::perms::group_all | fs::perms::others_all)) == fs::perms::none);
    }
    CHECK(caught);
}

// export writes both files under temp names and puts them in place only after its self-check,
// the secret file first: a kill during the check leaves neither. Observed from outside by a shell
// that spins until the bundle appears: the secret file is there by then, and with --jobs 2 the
// self-check's work directory (.<bundle>.verify-XXXXXX, beside the bundle) has come and gone.
TEST_CASE("backup: export puts the bundle in place only after its self-check", "[cli]") {
    BackupFixture f(false);
    bulk_store(f);  // a self-check that takes a while
    for (const char* jobs : {"1", "2"}) {
        INFO(jobs << " jobs");
        const std::string name = std::string("late-") + jobs + ".dat";
        const std::string bundle = f.dir + "/" + name, secret = f.dir + "/late-" + jobs + ".json";
        // Prints the exit code, whether the secret file was there when the bundle appeared, and
        // whether a verify work directory was seen before that.
        const std::string script =
            "\"$0\" \"$@\" >/dev/null 2>&1 & pid=$!; saw=0; "
            "while [ ! -e \"$KW_DIR/$KW_NAME\" ] && kill -0 $pid 2>/dev/null; do "
            "  for d in \"$KW_DIR/.$KW_NAME.verify-\"*; do [ -d \"$d\" ] && saw=1; done; "
            "done; "
            "if [ -e \"$KW_SECRET\" ]; then sec=1; else sec=0; fi; "
            "wait $pid; echo \"$? $sec $saw\"";
        auto env = f.env;
        env["KW_DIR"] = f.dir;
        env["KW_NAME"] = name;
        env["KW_SECRET"] = secret;
        auto r = kwtest::run_program({"/bin/sh", "-c", script, kwtest::binary_path(), "--keystore", f.a, "export",
                                      "--all", "--private-keys", "--jobs", jobs, "--key-bundle-file", bundle,
                                      "--key-bundle-secret", secret},
                                     env);
        INFO(r.out << r.err);
        std::istringstream in(r.out);
        int code = -1, secret_first = -1, checked_first = -1;
        in >> code >> secret_first >> checked_first;
        REQUIRE(code == 0);
        CHECK(secret_first == 1);
        if (std::string(jobs) == "2") CHECK(checked_first == 1);
        f.must({"--keystore", f.a, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret});
    }
}

// A token that corrupts what it wraps (tests/wrap_shim.cpp flips the last byte of the blob of
// every sensitive key C_WrapKey wraps) makes an export whose bundle does not verify: the
// self-check catches it, the export exits 4, and neither file nor any temp file is left; the
// store is unchanged.
TEST_CASE("backup: an export whose self-check fails leaves no files", "[cli]") {
    BackupFixture f;
    const std::string out = f.dir + "/out";
    fs::create_directory(out);
    const std::string store_before = kwtest::tree_digest(f.a);
    for (const char* jobs : {"1", "2"}) {
        INFO(jobs << " jobs");
        const std::string bundle = out + "/b.dat", secret = out + "/s.json";
        auto r = f.run({"--keystore", f.a, "export", "--all", "--private-keys", "--jobs", jobs, "--key-bundle-file",
                        bundle, "--key-bundle-secret", secret},
                       {{"KEYWARDEN_MODULE", std::string(KW_WRAP_SHIM_PATH)},
                        {"KW_SHIM_TARGET", kwtest::module_path()},
                        {"KW_SHIM_WRAP", std::string("flip-sensitive")}});
        CHECK(r.code == 4);
        // Named: the first key in bundle order (its version), then how many more.
        CHECK_THAT(r.err, Catch::Contains("the bundle just written does not verify: audit/log@1: unwrap failed") &&
                              Catch::Contains(" more problems)") && Catch::Contains("hint: nothing was written") &&
                              Catch::Contains("keywarden token check"));
        CHECK(fs::is_empty(out));
        CHECK(kwtest::tree_digest(f.a) == store_before);
    }
    // The same export through the shim with nothing falsified succeeds: the failure above is the
    // corrupted blobs, not the shim.
    for (const char* jobs : {"1", "2"}) {
        INFO(jobs << " jobs, nothing falsified");
        const std::string bundle = out + "/b" + jobs + ".dat", secret = out + "/s" + jobs + ".json";
        auto ok = f.run({"--keystore", f.a, "export", "--all", "--private-keys", "--jobs", jobs, "--key-bundle-file",
                         bundle, "--key-bundle-secret", secret},
                        {{"KEYWARDEN_MODULE", std::string(KW_WRAP_SHIM_PATH)}, {"KW_SHIM_TARGET", kwtest::module_path()}});
        CHECK(ok.code == 0);
        CHECK(fs::exists(bundle));
        CHECK(fs::exists(secret));
    }
}

// Another process creates the bundle or the secret path while the export runs (the shim's
// KW_SHIM_CREATE makes the file at the export's first C_UnwrapKey, after the export checked that
// neither path exists): linking into place finds it (EEXIST), the export fails without touching
// that file, and leaves neither of its own files nor a temp file.
TEST_CASE("backup: a path taken while the export runs is never overwritten", "[cli]") {
    BackupFixture f;
    for (const char* taken : {"bundle", "secret"})
        for (const char* jobs : {"1", "2"}) {
            INFO(taken << " taken, " << jobs << " jobs");
            const std::string out = f.dir + "/out-" + taken + "-" + jobs;
            fs::create_directory(out);
            const std::string bundle = out + "/b.dat", secret = out + "/s.json";
            const std::string other = std::string(taken) == "bundle" ? bundle : secret;
            auto r = f.run({"--keystore", f.a, "export", "--all", "--private-keys", "--jobs", jobs,
                            "--key-bundle-file", bundle, "--key-bundle-secret", secret},
                           {{"KEYWARDEN_MODULE", std::string(KW_WRAP_SHIM_PATH)},
                            {"KW_SHIM_TARGET", kwtest::module_path()},
                            {"KW_SHIM_CREATE", other}});
            CHECK(r.code == 1);
            CHECK_THAT(r.err, Catch::Contains(other + " already exists") &&
                                  Catch::Contains("nothing was overwritten"));
            CHECK(kwtest::read_text(other) == "someone else's file\n");
            std::vector<std::string> left;
            for (const auto& e : fs::directory_iterator(out)) left.push_back(e.path().string());
            CHECK(left == std::vector<std::string>{other});
        }
}

// A killed export, verify or import can leave a temp file or a work directory beside the bundle
// (or the secret). The next run on the same path removes those that no live run holds and that
// are over a minute old, and says so; anything else there is left alone. --dry-run removes nothing.
// Only export looks beside the secret file (verify and import only read it).
TEST_CASE("backup: the next run removes what a killed run left beside the bundle, and nothing else", "[cli]") {
    BackupFixture f;
    const std::string out = f.dir + "/out", bundle = out + "/b.dat", secret = out + "/s.json";
    fs::create_directories(out);
    struct Row {
        std::string name;
        bool dir, aged, locked, stale;
    };
    const std::vector<Row> rows{
        {".b.dat.tmp-AAAAAA", false, true, false, true},    // a killed export's bundle
        {".s.json.tmp-BBBBBB", false, true, false, true},   // and its secret
        {".b.dat.parts-CCCCCC", true, true, false, true},   // export workers' directory
        {".b.dat.verify-DDDDDD", true, true, false, true},  // verify workers'
        {".b.dat.import-EEEEEE", true, true, false, true},  // import workers'
        {".b.dat.tmp-FFFFFF", false, true, true, false},    // a live run holds it
        {".b.dat.parts-GGGGGG", true, true, true, false},   // a live run's workers hold it
        {".b.dat.tmp-HHHHHH", false, false, false, false},  // just made: maybe not locked yet
        {".b.dat.other-IIIIII", false, true, false, false}, // not keywarden's
        {".b.dat.tmp-JJJJJJJ", false, true, false, false},  // not a mkstemp name
        {".c.dat.tmp-KKKKKK", false, true, false, false},   // another bundle's
        {"b.dat.tmp-LLLLLL", false, true, false, false},    // not hidden
    };
    std::vector<int> held;
    auto plant = [&] {
        for (int fd : held) ::close(fd);
        held.clear();
        for (const auto& r : rows) {
            std::string p = out + "/" + r.name;
            if (fs::exists(p)) fs::remove_all(p);
            std::string lock = p;
            if (r.dir) {
                fs::create_directory(p);
                kwtest::write_file(p + "/0", "part");
                lock = p + "/.lock";
            }
            kwtest::write_file(lock, "");
            if (r.locked) {
                int fd = ::open(lock.c_str(), O_RDONLY | O_CLOEXEC);
                REQUIRE(fd >= 0);
                REQUIRE(::flock(fd, LOCK_EX | LOCK_NB) == 0);
                held.push_back(fd);
            }
            if (r.aged) {
                struct timespec ts[2] = {{std::time(nullptr) - 120, 0}, {std::time(nullptr) - 120, 0}};
                REQUIRE(::utimensat(AT_FDCWD, p.c_str(), ts, AT_SYMLINK_NOFOLLOW) == 0);
            }
        }
    };
    // verify and import clean beside the secret file too: a killed export's temp copy of it holds
    // the backup keys.
    auto check = [&](const kwtest::CliResult& r, bool cleans) {
        for (const auto& row : rows) {
            INFO(row.name);
            bool gone = row.stale && cleans;
            CHECK(fs::exists(out + "/" + row.name) == !gone);
            CHECK((r.err.find("removed " + out + "/" + row.name + ",") != std::string::npos) == gone);
        }
    };
    plant();
    check(f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }()), true);
    plant();
    check(f.must({"--keystore", f.a, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret}), true);
    plant();
    check(f.must([&] { auto v = f.imp(f.dir + "/L1", bundle, secret); v.insert(v.end(), {"--init", "--dry-run"}); return v; }()),
          false);
    check(f.must([&] { auto v = f.imp(f.dir + "/L2", bundle, secret); v.push_back("--init"); return v; }()), true);
    for (int fd : held) ::close(fd);
}
