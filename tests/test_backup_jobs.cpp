// SPDX-License-Identifier: Apache-2.0
// Backups with --jobs, token batches and token restarts: the same result however the work is cut.
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

TEST_CASE("backup: --jobs 2 gives the same result as one process", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/j.dat", secret = f.dir + "/j.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys", "--jobs", "2"}); return v; }());
    f.must({"--keystore", f.a, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret, "--against-store", "-j", "2"});
    f.must([&] { auto v = f.imp(f.b, bundle, secret); v.insert(v.end(), {"--init", "--jobs", "2"}); return v; }());
    CHECK(f.versions(f.a) == f.versions(f.b));
    for (const auto& [id, version, state] : f.versions(f.a)) {
        if (state == "destroyed") continue;
        INFO(id << " v" << version);
        CHECK(f.must({"--keystore", f.a, "read", id, "--private", "--version", version}).out ==
              f.must({"--keystore", f.b, "read", id, "--private", "--version", version}).out);
    }
    f.must({"--keystore", f.b, "keystore", "verify"});
    // Workers take chunks of entries and leave a ring that started before a chunk to the chunk
    // before: with 3 to 7 workers on 12 entries (one-entry chunks), chunks start inside rings too.
    for (const char* jobs : {"3", "4", "5", "7"}) {
        INFO(jobs << " jobs");
        std::string store = f.dir + "/J" + jobs;
        f.must([&] { auto v = f.imp(store, bundle, secret); v.insert(v.end(), {"--init", "--jobs", jobs}); return v; }());
        CHECK(f.versions(f.a) == f.versions(store));
        for (const auto& [id, version, state] : f.versions(f.a)) {
            if (state == "destroyed") continue;
            CHECK(f.must({"--keystore", f.a, "read", id, "--private", "--version", version}).out ==
                  f.must({"--keystore", store, "read", id, "--private", "--version", version}).out);
        }
        f.must({"--keystore", store, "keystore", "verify"});
    }
    // A changed bundle is still refused with exit 4, and no worker is left behind.
    std::string text = kwtest::read_text(bundle);
    text[text.size() / 2] = static_cast<char>(text[text.size() / 2] ^ 0x01);
    kwtest::write_file(f.dir + "/bad.dat", text);
    auto before = kwtest::tree_digest(f.b);
    auto bad = f.run({"--keystore", f.b, "--token", "kw-dst", "import", "--merge", "--on-conflict", "overwrite",
                      "--key-bundle-file", f.dir + "/bad.dat", "--key-bundle-secret", secret, "-j", "2"});
    CHECK(bad.code == 4);
    CHECK(kwtest::tree_digest(f.b) == before);
    CHECK(f.run({"--keystore", f.a, "verify", "--key-bundle-file", f.dir + "/bad.dat", "--key-bundle-secret", secret, "-j", "2"}).code == 4);
}

// With --jobs, workers take chunks of rings as they go and this process copies the chunks in
// order: the bundle lists the same entries in the same (key id) order as one process writes.
TEST_CASE("backup: export --jobs N writes the entries in the order one process does", "[cli]") {
    BackupFixture f;
    for (int i = 0; i < 12; ++i) f.must({"--keystore", f.a, "generate", "--client-id", "chunk" + std::to_string(100 + i), "--symmetric"});
    auto order = [&](const std::string& jobs) {
        std::string bundle = f.dir + "/o" + jobs + ".dat", secret = f.dir + "/o" + jobs + ".json",
                    out = f.dir + "/plain" + jobs;
        f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys", "--jobs", jobs}); return v; }());
        REQUIRE(kwtest::sh(kwtest::source_root() + "/docs/decrypt-bundle.sh " + bundle + " " + secret + " " + out +
                           " >/dev/null") == 0);
        std::vector<std::string> entries;
        for (int n = 1; fs::exists(out + "/" + std::to_string(n) + ".json"); ++n) {
            auto m = nlohmann::json::parse(kwtest::read_text(out + "/" + std::to_string(n) + ".json"));
            entries.push_back(m["key_id"].get<std::string>() + "@" + std::to_string(m["version"].get<int>()));
        }
        // Every key, as `keywarden read` gives it.
        int compared = kwtest::compare_decrypted(out, [&](const std::string& id, const std::string& version) {
            return f.must({"--keystore", f.a, "read", id, "--private", "--format", "raw", "--version", version}).out;
        });
        CHECK(compared == 22);
        // Nothing of the workers' part files is left beside the bundle.
        for (const auto& e : fs::directory_iterator(f.dir))
            CHECK(e.path().filename().string().find(".parts-") == std::string::npos);
        return entries;
    };
    auto one = order("1");
    REQUIRE(one.size() == 23);  // 10 keys of the fixture + 1 destroyed version + 12 new rings
    CHECK(std::is_sorted(one.begin(), one.end(), [](const std::string& a, const std::string& b) {
        return a.substr(0, a.rfind('@')) < b.substr(0, b.rfind('@'));
    }));
    for (const char* jobs : {"2", "3", "5"}) {
        INFO(jobs << " jobs");
        CHECK(order(jobs) == one);
    }
}

// The export parent reads each finished chunk back in pieces of 64 KiB. With 4,000 rings the
// first chunks of 2 workers are 4000/16 = 250 rings of about 400 bytes, about 100 KiB: lines are
// cut between pieces.
TEST_CASE("backup: export --jobs copies chunks larger than its read pieces", "[cli]") {
    BackupFixture f(false);
    f.must({"--keystore", f.a, "--token", "kw-src", "init"});
    std::string ids;
    for (int i = 0; i < 4000; ++i) ids += "client" + std::to_string(100000 + i) + "\n";
    kwtest::write_file(f.dir + "/ids.txt", ids);
    f.must({"--keystore", f.a, "generate", "--client-ids-from", f.dir + "/ids.txt", "--symmetric"});
    std::string bundle = f.dir + "/big.dat", secret = f.dir + "/big.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys", "--jobs", "2"}); return v; }());
    REQUIRE(fs::file_size(bundle) / 4000 * 250 > 65536 + 4096);  // the first chunk is over a piece
    // Every key is in the bundle once, with the check value of the store's key.
    auto r = f.must({"--keystore", f.a, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret,
                     "--against-store", "--json"});
    auto doc = nlohmann::json::parse(r.out);
    CHECK(doc["ok"] == true);
    CHECK(doc["entries"] == 4000);
    CHECK(doc["unwrapped_in_token"] == 4000);
    CHECK(doc["problems"].empty());
    CHECK(doc["against_store"]["missing"].empty());
    CHECK(doc["against_store"]["extra"].empty());
    CHECK(doc["against_store"]["different"].empty());
    CHECK(doc["against_store"]["store_keys_not_covered"] == 0);
}

// SoftHSM keeps destroyed session objects until C_Finalize, so the bulk loops restart the module
// every KEYWARDEN_TOKEN_RESTART_EVERY keys and find or make their keys again. Forcing a restart
// after every key or every third key, in one process and in workers, must change nothing.
TEST_CASE("backup: restarting the token during export, verify and import changes nothing", "[cli]") {
    BackupFixture f;
    const std::vector<std::pair<std::string, std::string>> rows{{"1", "1"}, {"3", "1"}, {"1", "2"}, {"3", "2"}};
    int n = 0;
    for (const auto& [every, jobs] : rows) {
        INFO("restart every " << every << " keys, " << jobs << " jobs");
        kwtest::Env restart{{"KEYWARDEN_TOKEN_RESTART_EVERY", every}};
        std::string tag = std::to_string(n++);
        std::string bundle = f.dir + "/r" + tag + ".dat", secret = f.dir + "/r" + tag + ".json";
        std::string store = f.dir + "/R" + tag;
        auto with = [&](std::vector<std::string> v) {
            v.insert(v.begin(), "-v");
            v.insert(v.end(), {"--jobs", jobs});
            return v;
        };
        auto e = f.must(with([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }()), restart);
        CHECK(e.err.find("restarted the PKCS#11 module") != std::string::npos);
        auto v = f.must(with({"--keystore", f.a, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret,
                              "--against-store"}),
                        restart);
        CHECK(v.err.find("restarted the PKCS#11 module") != std::string::npos);
        auto i = f.must(with([&] { auto v = f.imp(store, bundle, secret); v.push_back("--init"); return v; }()), restart);
        CHECK(i.err.find("restarted the PKCS#11 module") != std::string::npos);
        CHECK(f.versions(f.a) == f.versions(store));
        for (const auto& [id, version, state] : f.versions(f.a)) {
            if (state == "destroyed") continue;
            INFO(id << " v" << version);
            CHECK(f.must({"--keystore", f.a, "read", id, "--private", "--version", version}).out ==
                  f.must({"--keystore", store, "read", id, "--private", "--version", version}).out);
        }
        f.must({"--keystore", store, "keystore", "verify"});
    }
    // A bad value is a usage error, before anything is written.
    std::string bundle = f.dir + "/bad-env.dat", secret = f.dir + "/bad-env.json";
    auto r = f.run([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }(),
                   {{"KEYWARDEN_TOKEN_RESTART_EVERY", "often"}});
    CHECK(r.code == 2);
    CHECK(r.err.find("KEYWARDEN_TOKEN_RESTART_EVERY") != std::string::npos);
    CHECK(!fs::exists(bundle));
    CHECK(!fs::exists(secret));
}

// import puts KEYWARDEN_TOKEN_BATCH keys at a time through the token (all unwrapped, checked,
// wrapped, destroyed). Any batch size, in one process or in workers, must give the same store.
TEST_CASE("backup: any token batch size imports the same store; a bad size is refused", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/tb.dat", secret = f.dir + "/tb.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    const auto expected = f.versions(f.a);
    REQUIRE(expected.size() == 11);
    int n = 0;
    for (const char* batch : {"1", "3", "1024"})
        for (const char* jobs : {"1", "2"}) {
            INFO("batch " << batch << ", " << jobs << " jobs");
            std::string store = f.dir + "/TB" + std::to_string(n++);
            f.must([&] { auto v = f.imp(store, bundle, secret); v.insert(v.end(), {"--init", "--jobs", jobs}); return v; }(),
                   {{"KEYWARDEN_TOKEN_BATCH", batch}});
            CHECK(f.versions(store) == expected);
            for (const auto& [id, version, state] : expected) {
                if (state == "destroyed") continue;
                INFO(id << " v" << version);
                CHECK(f.must({"--keystore", f.a, "read", id, "--private", "--version", version}).out ==
                      f.must({"--keystore", store, "read", id, "--private", "--version", version}).out);
            }
            f.must({"--keystore", store, "keystore", "verify"});
        }
    for (const char* bad : {"0", "1025", "many", "-1"}) {
        INFO("KEYWARDEN_TOKEN_BATCH=" << bad);
        std::string store = f.dir + "/TBbad";
        auto r = f.run([&] { auto v = f.imp(store, bundle, secret); v.push_back("--init"); return v; }(),
                       {{"KEYWARDEN_TOKEN_BATCH", bad}});
        CHECK(r.code == 2);
        CHECK_THAT(r.err, Catch::Contains("KEYWARDEN_TOKEN_BATCH"));
        CHECK(!fs::exists(store));
    }
}

// KEYWARDEN_TOKEN_BATCH bounds the temporary keys import holds in the token at once, also when a
// ring has more versions than that. Counted from the -vv call trace: from the first C_UnwrapKey on,
// every C_UnwrapKey makes one and every C_DestroyObject ends one (before it, --init makes and
// destroys objects of its own).
TEST_CASE("backup: import holds at most KEYWARDEN_TOKEN_BATCH temporary keys at once", "[cli]") {
    BackupFixture f;  // two rings have two versions
    std::string bundle = f.dir + "/ob.dat", secret = f.dir + "/ob.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    for (std::size_t batch : {1, 3}) {
        INFO("batch " << batch);
        std::string store = f.dir + "/OB" + std::to_string(batch);
        auto r = f.must([&] { auto v = f.imp(store, bundle, secret); v.insert(v.begin(), "-vv"); v.push_back("--init"); return v; }(),
                        {{"KEYWARDEN_TOKEN_BATCH", std::to_string(batch)}});
        long alive = 0, most = 0, unwraps = 0;
        std::istringstream err(r.err);
        for (std::string l; std::getline(err, l);) {
            if (l.find("C_UnwrapKey -> CKR_OK") != std::string::npos) {
                ++unwraps;
                most = std::max(most, ++alive);
            } else if (unwraps > 0 && l.find("C_DestroyObject -> CKR_OK") != std::string::npos) {
                --alive;
            }
        }
        CHECK(unwraps == 10);  // the bundle's wrapped keys
        CHECK(most == static_cast<long>(batch));
    }
}

// Two keys of the same type with their wrapped halves swapped (and the bundle's MAC made again with
// the secret): each unwraps, but to the other's key. The key check value catches it, names the
// first key whose check value differs, in bundle order, whatever the batch size, and nothing is
// imported.
TEST_CASE("backup: a key that unwraps to another key's value is refused in any batch", "[cli]") {
    BackupFixture f(false);
    std::string bundle = f.dir + "/s.dat", secret = f.dir + "/s.json", swapped = f.dir + "/swapped.dat";
    std::vector<std::string> lines = three_ring_bundle(f, bundle, secret);
    REQUIRE(lines.size() == 6);  // magic, header, three entries, mac
    auto halves = [](const std::string& l) {
        auto sp = l.find(' ');
        return std::make_pair(l.substr(0, sp), l.substr(sp + 1));
    };
    auto [meta_m, key_m] = halves(lines[3]);
    auto [meta_z, key_z] = halves(lines[4]);
    REQUIRE(key_m != key_z);
    lines[3] = meta_m + " " + key_z;
    lines[4] = meta_z + " " + key_m;
    lines.pop_back();  // the old mac
    write_with_new_mac(swapped, lines, secret);

    auto v = f.run({"--keystore", f.a, "verify", "--key-bundle-file", swapped, "--key-bundle-secret", secret});
    CHECK(v.code == 4);
    // Both keys are reported, in bundle order, however many workers (taking chunks) found them.
    CHECK(v.out.find("client/mmm-client/symmetric@1") < v.out.find("client/zzz-client/symmetric@1"));
    CHECK(v.out.find("client/zzz-client/symmetric@1") != std::string::npos);
    for (const char* jobs : {"2", "3"}) {
        auto vj = f.run({"--keystore", f.a, "verify", "--key-bundle-file", swapped, "--key-bundle-secret", secret, "-j", jobs});
        CHECK(vj.code == 4);
        CHECK(vj.out == v.out);
    }
    // A dry run unwraps every key in the destination token too: the MAC alone would pass. With
    // --jobs 2 too, it writes nothing, not even beside the bundle (the directory's mtime stays).
    enum class Target { init, empty, full };
    for (Target target : {Target::init, Target::empty, Target::full}) {
        const bool init = target == Target::init, full = target == Target::full;
        INFO("dry run, " << (init ? "--init" : full ? "into a store that holds a key" : "into an empty store"));
        std::string store = f.dir + (init ? "/DRY-new" : full ? "/DRY-full" : "/DRY-empty");
        if (!init) f.must({"--keystore", store, "--token", "kw-dst", "init"});
        if (full) f.must({"--keystore", store, "generate", "--client-id", "someone-else", "--symmetric"});
        std::string before = init ? "" : kwtest::tree_digest(store);
        auto dry = [&](const std::string& b) {
            auto v = f.imp(store, b, secret);
            v.insert(v.end(), {"--dry-run", "--jobs", "2"});
            if (init) v.push_back("--init");
            return v;
        };
        auto mtime = [&] {
            struct stat st {};
            ::stat(f.dir.c_str(), &st);
            return std::make_pair(st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
        };
        const auto dir_before = mtime();
        auto bad = f.run(dry(swapped));
        CHECK(bad.code == 4);  // also where the import would be refused (exit 1)
        CHECK_THAT(bad.err, Catch::Contains("the bundle does not restore: client/mmm-client/symmetric@1: the key's "
                                            "check value differs") &&
                                Catch::Contains("(and 1 more problem)") && Catch::Contains("keywarden --token TOKEN verify"));
        if (full) CHECK_THAT(bad.err, Catch::Contains("the import would also be refused: the target store already holds 1"));
        else CHECK_THAT(bad.err, !Catch::Contains("refused"));
        auto good = f.run(dry(bundle));
        CHECK(good.code == (full ? 1 : 0));
        CHECK_THAT(good.err, Catch::Contains("dry run: the bundle verifies (3 keys unwrapped and checked in the token)"));
        CHECK(mtime() == dir_before);
        if (init) CHECK(!fs::exists(store));
        else CHECK(kwtest::tree_digest(store) == before);
    }
    // A token that fails (its object table full) is the token's problem, not the bundle's: exit
    // 3 with the token's error, from verify and from a dry run alike.
    {
        kwtest::Env failing{{"KEYWARDEN_MODULE", std::string(KW_WRAP_SHIM_PATH)},
                            {"KW_SHIM_TARGET", kwtest::module_path()},
                            {"KW_SHIM_UNWRAP", std::string("device-memory")}};
        auto v3 = f.run({"--token", "kw-src", "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret},
                        failing);
        CHECK(v3.code == 3);
        CHECK_THAT(v3.err, Catch::Contains("CKR_DEVICE_MEMORY"));
        CHECK_THAT(v3.out + v3.err, !Catch::Contains("does not restore") && !Catch::Contains("PROBLEM"));
        auto d3 = f.run([&] { auto v = f.imp(f.dir + "/DRY-token", bundle, secret); v.insert(v.end(), {"--dry-run", "--init"}); return v; }(),
                        failing);
        CHECK(d3.code == 3);
        CHECK_THAT(d3.err, Catch::Contains("CKR_DEVICE_MEMORY") && !Catch::Contains("does not restore"));
    }
    for (const char* batch : {"1", "16"})
        for (const char* jobs : {"1", "2"}) {
            INFO("batch " << batch << ", " << jobs << " jobs");
            std::string store = f.dir + "/S" + batch + "-" + jobs;
            auto r = f.run([&] { auto v = f.imp(store, swapped, secret); v.insert(v.end(), {"--init", "--jobs", jobs}); return v; }(),
                           {{"KEYWARDEN_TOKEN_BATCH", batch}});
            CHECK(r.code == 4);
            // One process stops at the first bad key in bundle order. Workers take chunks as they
            // go, so with 2 either bad key may be the one a worker stops at first; the error
            // names it.
            if (std::string(jobs) == "1")
                CHECK_THAT(r.err, Catch::Contains("client/mmm-client/symmetric version 1: the key's check value differs"));
            else
                CHECK_THAT(r.err, Catch::Contains("client/mmm-client/symmetric version 1: the key's check value differs") ||
                                      Catch::Contains("client/zzz-client/symmetric version 1: the key's check value differs"));
            CHECK(!fs::exists(store));
        }
}

// A header whose ring count is not the bundle's, in a bundle MACed with its own secret (only an
// exporter holding the secret could make one): verify finds it with any number of jobs, and so
// does import.
TEST_CASE("backup: a header with the wrong ring count is refused with any --jobs", "[cli]") {
    BackupFixture f(false);
    std::string bundle = f.dir + "/o.dat", secret = f.dir + "/o.json", wrong = f.dir + "/wrong.dat";
    std::vector<std::string> lines = three_ring_bundle(f, bundle, secret);
    REQUIRE(lines.size() == 6);
    lines.pop_back();  // the old mac
    const std::string rings = "\"rings\":3,";
    REQUIRE(lines[1].find(rings) != std::string::npos);
    lines[1].replace(lines[1].find(rings), rings.size(), "\"rings\":2,");
    write_with_new_mac(wrong, lines, secret);
    for (const char* jobs : {"1", "2", "3"}) {
        INFO(jobs << " jobs");
        auto r = f.run({"--keystore", f.a, "verify", "--jobs", jobs, "--key-bundle-file", wrong, "--key-bundle-secret", secret});
        CHECK(r.code == 4);
        CHECK_THAT(r.out + r.err, Catch::Contains("3 entries in 3 rings but its header says 3 in 2"));
        auto i = f.run([&] { auto v = f.imp(f.dir + "/I" + jobs, wrong, secret); v.insert(v.end(), {"--init", "--jobs", jobs}); return v; }());
        CHECK(i.code == 4);
        CHECK_FALSE(fs::exists(f.dir + "/I" + jobs));
    }
}
