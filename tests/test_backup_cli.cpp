// SPDX-License-Identifier: Apache-2.0
// Backups end to end: export from store A on token 1, import into store B on token 2: round
// trips, options, bad input, golden bundles.
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

TEST_CASE("backup: --all --private-keys round trip across tokens", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/bundle.dat", secret = f.dir + "/secret.json";
    // The objects a token holds (its token objects: a new session sees no other's session objects).
    auto token_objects = [&](const char* label) {
        auto s = f.hsm.session(label);
        keywarden::pkcs11::Template all;
        std::size_t n = s->find(all, 10000).size();
        s.reset();
        f.hsm.unload();
        return n;
    };
    // SoftHSM counts every change of a token's objects in its "generation" file.
    auto generations = [&] {
        std::map<std::string, std::string> g;
        for (const auto& d : fs::directory_iterator(f.dir + "/tokens"))
            g[d.path().string()] = kwtest::read_text(d.path().string() + "/generation");
        return g;
    };
    const std::size_t src_objects = token_objects("kw-src"), dst_objects = token_objects("kw-dst");
    CHECK(src_objects == 2);  // the store's master keys
    const auto generations_before = generations();
    REQUIRE(generations_before.size() == 2);
    auto e = f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys", "--json"}); return v; }());
    // The backup keys and every unwrapped key were session objects: no token object was made,
    // changed or destroyed, and the token holds what it held.
    CHECK(generations() == generations_before);
    CHECK(token_objects("kw-src") == src_objects);
    auto doc = nlohmann::json::parse(e.out);
    CHECK(doc["key_rings"] == 9);
    CHECK(doc["entries"] == 11);
    CHECK(doc["wrapped_keys"] == 10);
    CHECK(doc["verified"] == true);
    CHECK_THAT(e.err, Catch::Contains("different places"));
    for (const auto& p : {bundle, secret}) {
        struct stat st {};
        ::stat(p.c_str(), &st);
        CHECK((st.st_mode & 0777) == 0600);
    }
    // Key ids and client ids are not readable without the secret.
    std::string text = kwtest::read_text(bundle);
    CHECK(text.find("alice01") == std::string::npos);
    CHECK(text.find("audit/log") == std::string::npos);

    f.must({"--keystore", f.a, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret,
            "--against-store"});
    auto no_store = f.run(f.imp(f.b, bundle, secret));
    CHECK(no_store.code == 1);
    CHECK_THAT(no_store.err, Catch::Contains("pass --init"));
    // A second later, so that an import which stamped its own dates would show.
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    f.must([&] { auto v = f.imp(f.b + "x", bundle, secret); v.push_back("--init"); return v; }());
    CHECK(token_objects("kw-dst") == dst_objects + 2);  // the new store's master keys, nothing else
    auto va = f.versions(f.a), vb = f.versions(f.b + "x");
    REQUIRE(va.size() == 11);
    CHECK(va == vb);  // every version and state
    // Dates, validity and which version is current too (alice01's rings are rotated: v1 has a
    // valid_until and is not current).
    CHECK(f.metadata(f.a) == f.metadata(f.b + "x"));
    CHECK_THAT(f.metadata(f.a)[0], Catch::Contains("\"created\"") && Catch::Contains("\"current\""));
    for (const auto& [id, version, state] : va) {
        INFO(id << " v" << version);
        std::vector<std::string> base = {"read", id, "--version", version};
        auto pa = f.run([&] { auto v = base; v.insert(v.begin(), {"--keystore", f.a}); v.push_back("--private"); return v; }());
        auto pb = f.run([&] { auto v = base; v.insert(v.begin(), {"--keystore", f.b + "x"}); v.push_back("--private"); return v; }());
        CHECK(pa.code == pb.code);
        CHECK(pa.out == pb.out);
        if (state == "destroyed") CHECK(pa.code == 1);
        else CHECK(pa.out.size() == 45);
        if (keypair(id)) {
            auto qa = f.run({"--keystore", f.a, "read", id, "--version", version, "--public"});
            auto qb = f.run({"--keystore", f.b + "x", "read", id, "--version", version, "--public"});
            CHECK(qa.out == qb.out);
        }
    }
    // The restored store is on the other token, under other master keys.
    auto ma = nlohmann::json::parse(kwtest::read_text(f.a + "/store.json"));
    auto mb = nlohmann::json::parse(kwtest::read_text(f.b + "x/store.json"));
    CHECK(ma["token"]["label"] == "kw-src");
    CHECK(mb["token"]["label"] == "kw-dst");
    CHECK(ma["master_keys"]["encryption"]["kcv"] != mb["master_keys"]["encryption"]["kcv"]);
    f.must({"--keystore", f.b + "x", "keystore", "verify"});
}

TEST_CASE("backup: public-only and selected key ids", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/pub.dat", secret = f.dir + "/pub.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.push_back("--all"); return v; }());
    f.must([&] { auto v = f.imp(f.b, bundle, secret); v.push_back("--init"); return v; }());
    auto vb = f.versions(f.b);
    for (const auto& [id, version, state] : vb) CHECK(keypair(id));
    CHECK(vb.size() == 4);  // alice storage v1 v2, bob storage, poison keypair
    {
        std::vector<std::string> keypairs;
        for (const auto& m : f.metadata(f.a))
            if (keypair(m.substr(0, m.find('\t')))) keypairs.push_back(m);
        CHECK(f.metadata(f.b) == keypairs);  // with their dates and current flags
    }
    auto pub_a = f.must({"--keystore", f.a, "read", "client/alice01/storage", "--public"});
    auto pub_b = f.must({"--keystore", f.b, "read", "client/alice01/storage", "--public"});
    CHECK(pub_a.out == pub_b.out);
    auto priv = f.run({"--keystore", f.b, "read", "client/alice01/storage", "--private"});
    CHECK(priv.code == 1);
    CHECK_THAT(priv.err, Catch::Contains("only its public half"));
    f.must({"--keystore", f.b, "keystore", "verify"});

    std::string sb = f.dir + "/sel.dat", ss = f.dir + "/sel.json";
    f.must([&] { auto v = f.exp(sb, ss); v.insert(v.end(), {"--private-keys", "client/alice01/symmetric", "audit/log"}); return v; }());
    f.must([&] { auto v = f.imp(f.dir + "/C", sb, ss); v.push_back("--init"); return v; }());
    auto vc = f.versions(f.dir + "/C");
    CHECK(vc.size() == 3);
    {
        std::vector<std::string> selected;
        for (const auto& m : f.metadata(f.a))
            if (m.starts_with("client/alice01/symmetric\t") || m.starts_with("audit/log\t")) selected.push_back(m);
        CHECK(f.metadata(f.dir + "/C") == selected);
    }
    CHECK(f.must({"--keystore", f.dir + "/C", "read", "audit/log", "--private"}).out ==
          f.must({"--keystore", f.a, "read", "audit/log", "--private"}).out);

    // Selected keypairs without --private-keys: their public halves only.
    std::string pb = f.dir + "/selpub.dat", ps = f.dir + "/selpub.json";
    f.must([&] { auto v = f.exp(pb, ps); v.insert(v.end(), {"client/alice01/storage", "poison/keypair"}); return v; }());
    f.must([&] { auto v = f.imp(f.dir + "/D", pb, ps); v.push_back("--init"); return v; }());
    auto vd = f.versions(f.dir + "/D");
    CHECK(vd.size() == 3);  // alice storage v1 v2, poison keypair
    for (const auto& [id, version, state] : vd) CHECK((id == "client/alice01/storage" || id == "poison/keypair"));
    for (const char* id : {"client/alice01/storage", "poison/keypair"}) {
        INFO(id);
        CHECK(f.must({"--keystore", f.dir + "/D", "read", id, "--public"}).out ==
              f.must({"--keystore", f.a, "read", id, "--public"}).out);
        auto no_private = f.run({"--keystore", f.dir + "/D", "read", id, "--private"});
        CHECK(no_private.code == 1);
        CHECK_THAT(no_private.err, Catch::Contains("only its public half"));
    }
    // --against-store on a selective bundle: the rings it holds match; the others are counted.
    auto cmp = f.run({"--keystore", f.a, "verify", "--key-bundle-file", sb, "--key-bundle-secret", ss, "--against-store", "--json"});
    CHECK(cmp.code == 0);
    auto cdoc = nlohmann::json::parse(cmp.out);
    CHECK(cdoc["ok"] == true);
    CHECK(cdoc["against_store"]["different"].empty());
    CHECK(cdoc["against_store"]["missing"].empty());
    CHECK(cdoc["against_store"]["store_keys_not_covered"] == 7);
    // A version made after the export is missing from the bundle: exit 1, not an integrity error.
    f.must({"--keystore", f.a, "rotate", "audit/log"});
    auto later = f.run({"--keystore", f.a, "verify", "--key-bundle-file", sb, "--key-bundle-secret", ss, "--against-store"});
    CHECK(later.code == 1);
    CHECK_THAT(later.out, Catch::Contains("NOT IN BUNDLE audit/log@2"));
    CHECK_THAT(later.out, Catch::Contains("DIFFERS"));
}

// Acra's spellings of the options, and --against-store against a store that holds other keys
// under some of the same ids.
TEST_CASE("backup: Acra's option spellings, and verify --against-store lists extra and different keys", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/acra.dat", secret = f.dir + "/acra.json";
    auto e = f.must({"--keystore", f.a, "export", "--all", "--private_keys", "--key_bundle_file", bundle,
                     "--key_bundle_secret", secret, "--json"});
    CHECK(nlohmann::json::parse(e.out)["wrapped_keys"] == 10);  // --private_keys took effect
    f.must({"--keystore", f.a, "verify", "--key_bundle_file", bundle, "--key_bundle_secret", secret});
    f.must({"--keystore", f.b, "--token", "kw-dst", "import", "--init", "--key_bundle_file", bundle,
            "--key_bundle_secret", secret});
    CHECK(f.metadata(f.b) == f.metadata(f.a));

    // D holds alice01's three rings too, with other keys (one version each), and nothing else.
    const std::string d = f.dir + "/D";
    f.must({"--keystore", d, "--token", "kw-src", "init"});
    f.must({"--keystore", d, "generate", "--client-id", "alice01"});
    auto r = f.run({"--keystore", d, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret,
                    "--against-store", "--json"});
    CHECK(r.code == 4);  // a key that differs is an integrity problem
    auto doc = nlohmann::json::parse(r.out);
    CHECK(doc["ok"] == false);
    auto list = [&](const char* field) {
        std::set<std::string> out;
        for (const auto& k : doc["against_store"][field]) out.insert(k.get<std::string>());
        return out;
    };
    CHECK(list("different") ==
          std::set<std::string>{"client/alice01/hmac@1", "client/alice01/storage@1", "client/alice01/symmetric@1"});
    // In the bundle, not in D: alice01's second versions and every other ring's live versions
    // (bob's destroyed hmac version is not compared).
    auto extra = list("extra");
    CHECK(extra.count("client/alice01/storage@2") == 1);
    CHECK(extra.count("client/alice01/symmetric@2") == 1);
    CHECK(extra.count("client/bob the client/symmetric@1") == 1);
    CHECK(extra.count("audit/log@1") == 1);
    CHECK(extra.count("client/bob the client/hmac@1") == 0);
    CHECK(list("missing").empty());
    auto text = f.run({"--keystore", d, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret,
                       "--against-store"});
    CHECK(text.code == 4);
    CHECK_THAT(text.out, Catch::Contains("DIFFERENT") && Catch::Contains("client/alice01/hmac@1") &&
                             Catch::Contains("FAILED"));
}

// Missing parent directories of a store are made 0700, whatever the umask, by init and by
// import --init; existing ones keep their mode.
TEST_CASE("backup: init and import --init make missing parent directories 0700", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    REQUIRE(::chmod(f.dir.c_str(), 0755) == 0);
    auto mode = [](const std::string& p) {
        struct stat st {};
        REQUIRE(::stat(p.c_str(), &st) == 0);
        return st.st_mode & 07777;
    };
    f.must({"--keystore", f.dir + "/p1/p2/S", "--token", "kw-dst", "init"});
    f.must([&] { auto v = f.imp(f.dir + "/q1/q2/R", bundle, secret); v.push_back("--init"); return v; }());
    for (const char* d : {"/p1", "/p1/p2", "/p1/p2/S", "/q1", "/q1/q2", "/q1/q2/R"}) {
        INFO(d);
        CHECK(mode(f.dir + d) == 0700);
    }
    CHECK(mode(f.dir) == 0755);
}

TEST_CASE("backup: the openssl command line alone decrypts a bundle", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json", out = f.dir + "/plain";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    REQUIRE(kwtest::sh(kwtest::source_root() + "/docs/decrypt-bundle.sh " + bundle + " " + secret + " " + out +
                       " >/dev/null") == 0);
    int compared = kwtest::compare_decrypted(out, [&](const std::string& id, const std::string& version) {
        return f.must({"--keystore", f.a, "read", id, "--private", "--format", "raw", "--version", version}).out;
    });
    CHECK(compared == 10);
}

namespace {

// Store A populated and exported twice (b.dat/s.json and o.dat/o.json), and an empty store B on
// kw-dst: the setup of the bad-input tests below.
struct BadInputFixture : BackupFixture {
    const std::string bundle = dir + "/b.dat", secret = dir + "/s.json";
    const std::string other_b = dir + "/o.dat", other_s = dir + "/o.json";
    BadInputFixture() {
        must([&] { auto v = exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
        must([&] { auto v = exp(other_b, other_s); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
        must({"--keystore", b, "--token", "kw-dst", "init"});  // the empty target
    }
};

}  // namespace

TEST_CASE("backup: bad input is refused with a clear error and changes nothing", "[cli]") {
    BadInputFixture f;
    const std::string &bundle = f.bundle, &secret = f.secret, &other_b = f.other_b, &other_s = f.other_s;
    const std::string good_bundle = kwtest::read_text(bundle), good_secret = kwtest::read_text(secret);
    auto lines = [&] {
        std::vector<std::string> v;
        std::istringstream in(good_bundle);
        for (std::string l; std::getline(in, l);) v.push_back(l + "\n");
        return v;
    }();
    auto join = [](const std::vector<std::string>& v) {
        std::string s;
        for (const auto& l : v) s += l;
        return s;
    };
    const std::string tb = f.dir + "/t.dat", ts = f.dir + "/t.json";
    auto swapped_secret = [&] {
        auto j = good_secret;
        auto e = j.find("\"encryption\": \"") + 15, s = j.find("\"signature\": \"") + 14;
        std::string ev = j.substr(e, 44), sv = j.substr(s, 44);
        j.replace(e, 44, sv);
        j.replace(s, 44, ev);
        return j;
    }();

    struct Row {
        const char* name;
        std::string bundle_text, secret_text;
        int code;
        const char* message;
    };
    std::vector<Row> rows = {
        {"wrong secret file (not a secret file)", good_bundle, "{\"hello\": 1}\n", 4, "secret file"},
        {"a secret from another export", good_bundle, kwtest::read_text(other_s), 4, "does not belong to this bundle"},
        {"encryption and signature keys swapped", good_bundle, swapped_secret, 4, "swapped"},
        {"entries reordered", join({lines[0], lines[1], lines[3], lines[2], lines[4], lines[5], lines[6], lines[7],
                                    lines[8], lines[9], lines[10], lines[11], lines[12], lines[13]}),
         good_secret, 4, "MAC mismatch"},
        // Found by decrypting (the import into a store reads each entry's metadata in its first
        // pass) or by counting (verify and import --init check the MAC and the count first).
        {"an entry duplicated", [&] { auto v = lines; v.insert(v.begin() + 3, lines[2]); return join(v); }(), good_secret, 4,
         "appears twice|more entries than its header says"},
        {"an entry removed", [&] { auto v = lines; v.erase(v.begin() + 4); return join(v); }(), good_secret, 4, "MAC mismatch"},
        {"a header from another bundle", [&] { auto v = lines; std::istringstream in(kwtest::read_text(other_b)); std::string l; std::getline(in, l); std::getline(in, l); v[1] = l + "\n"; return join(v); }(),
         good_secret, 4, "does not belong to this bundle"},
        {"a future format version", [&] { auto v = lines; v[0] = "keywarden-bundle 2\n"; return join(v); }(), good_secret, 4, "upgrade keywarden"},
        {"a future format version in the header",
         [&] {
             auto v = lines;
             REQUIRE(v[1].find("\"format\":1,") != std::string::npos);
             v[1].replace(v[1].find("\"format\":1,"), 11, "\"format\":2,");
             return join(v);
         }(),
         good_secret, 4, "bundle format 2 is not supported"},
        {"a future secret file format",
         good_bundle,
         [&] {
             auto t = good_secret;
             REQUIRE(t.find("\"format\": 1,") != std::string::npos);
             t.replace(t.find("\"format\": 1,"), 12, "\"format\": 2,");
             return t;
         }(),
         4, "secret file format 2 is not supported"},
        {"not a bundle at all", "hello\n", good_secret, 4, "not a keywarden key bundle"},
        {"data after the MAC", good_bundle + "extra\n", good_secret, 4, "after its MAC"},
    };
    rows.push_back({"truncated to nothing", "", good_secret, 4, "not a keywarden key bundle"});
    for (std::size_t cut : {10ul, 200ul, good_bundle.size() / 2, good_bundle.size() - 40, good_bundle.size() - 1})
        rows.push_back({"truncated", good_bundle.substr(0, cut), good_secret, 4, "truncated"});
    rows.push_back({"truncated at a line's end, before the MAC line",
                    join(std::vector<std::string>(lines.begin(), lines.end() - 1)), good_secret, 4,
                    "truncated: it ends after"});

    // `message`: what the error must say; alternatives separated by '|'.
    auto says = [](const std::string& text, const std::string& message) {
        for (std::size_t from = 0;;) {
            auto at = message.find('|', from);
            if (text.find(message.substr(from, at == std::string::npos ? at : at - from)) != std::string::npos)
                return true;
            if (at == std::string::npos) return false;
            from = at + 1;
        }
    };
    auto check_row = [&](const std::string& name, const std::string& btext, const std::string& stext, int code,
                         const std::string& message) {
        INFO(name);
        kwtest::write_file(tb, btext);
        kwtest::write_file(ts, stext);
        auto before_b = kwtest::tree_digest(f.b);
        auto r = f.run(f.imp(f.b, tb, ts));
        INFO(r.err);
        CHECK(r.code == code);
        if (!message.empty()) CHECK(says(r.err, message));
        CHECK_THAT(r.err, Catch::StartsWith("error: "));
        CHECK(kwtest::tree_digest(f.b) == before_b);
        // The same into a store that --init would create: nothing is created.
        auto fresh = f.run([&] { auto v = f.imp(f.dir + "/fresh", tb, ts); v.push_back("--init"); return v; }());
        CHECK(fresh.code == code);
        if (!message.empty()) CHECK(says(fresh.err, message));
        CHECK_FALSE(fs::exists(f.dir + "/fresh"));
        auto v = f.run({"--keystore", f.a, "verify", "--key-bundle-file", tb, "--key-bundle-secret", ts});
        CHECK(v.code == code);
        INFO("verify: " << v.out << v.err);
        if (!message.empty()) CHECK(says(v.out + v.err, message));
    };
    for (const auto& row : rows) check_row(row.name, row.bundle_text, row.secret_text, row.code, row.message);
}

TEST_CASE("backup: import into a non-empty store without --merge is refused", "[cli]") {
    BadInputFixture f;
    const std::string &bundle = f.bundle, &secret = f.secret, &other_b = f.other_b, &other_s = f.other_s;
    f.must(f.imp(f.b, bundle, secret));
    auto before = kwtest::tree_digest(f.b);
    auto r = f.run(f.imp(f.b, other_b, other_s));
    CHECK(r.code == 1);
    CHECK_THAT(r.err, Catch::Contains("--merge"));
    CHECK(kwtest::tree_digest(f.b) == before);
    auto abort = f.run([&] { auto v = f.imp(f.b, other_b, other_s); v.insert(v.end(), {"--merge"}); return v; }());
    CHECK(abort.code == 1);
    CHECK_THAT(abort.err, Catch::Contains("already exist"));
    CHECK(kwtest::tree_digest(f.b) == before);
    // A dry run says what the real import would do, refusal included.
    auto dry = f.run([&] { auto v = f.imp(f.b, other_b, other_s); v.insert(v.end(), {"--merge", "--dry-run", "--json"}); return v; }());
    CHECK(dry.code == 1);
    CHECK_THAT(dry.err, Catch::Contains("would be refused"));
    CHECK(nlohmann::json::parse(dry.out)["conflicts"].size() == 9);
    auto dry_skip = f.must([&] { auto v = f.imp(f.b, other_b, other_s); v.insert(v.end(), {"--merge", "--on-conflict", "skip", "--dry-run"}); return v; }());
    CHECK_THAT(dry_skip.out, Catch::Contains("skip      audit/log"));
    CHECK(kwtest::tree_digest(f.b) == before);
    f.must([&] { auto v = f.imp(f.b, other_b, other_s); v.insert(v.end(), {"--merge", "--on-conflict", "skip"}); return v; }());
    CHECK(kwtest::tree_digest(f.b) == before);  // every ring conflicted and was skipped
    CHECK(f.versions(f.b) == f.versions(f.a));
    f.must([&] { auto v = f.imp(f.b, other_b, other_s); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite"}); return v; }());
    f.must({"--keystore", f.b, "keystore", "verify"});
}

TEST_CASE("backup: export refusals leave no files and no change", "[cli]") {
    BadInputFixture f;
    const std::string &bundle = f.bundle, &secret = f.secret;
    // The source store and the set of files beside it (the token's own files may change).
    auto state = [&] {
        std::set<std::string> names;
        for (const auto& e : fs::directory_iterator(f.dir)) names.insert(e.path().filename().string());
        std::string s = kwtest::tree_digest(f.a);
        for (const auto& n : names) s += " " + n;
        return s;
    };
    auto before = state();
    auto same = f.run([&] { auto v = f.exp(f.dir + "/x.dat", f.dir + "/x.dat"); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    CHECK(same.code == 2);
    CHECK_THAT(same.err, Catch::Contains("different files"));
    auto exists = f.run([&] { auto v = f.exp(f.dir + "/new.dat", secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    CHECK(exists.code == 1);
    CHECK_THAT(exists.err, Catch::Contains("already exists"));
    auto exists2 = f.run([&] { auto v = f.exp(bundle, f.dir + "/new.json"); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    CHECK(exists2.code == 1);
    auto neither = f.run(f.exp(f.dir + "/n.dat", f.dir + "/n.json"));
    CHECK(neither.code == 2);
    // A named ring without a public half, without --private-keys: refused, not left out.
    auto no_public = f.run([&] { auto v = f.exp(f.dir + "/p.dat", f.dir + "/p.json"); v.insert(v.end(), {"client/alice01/storage", "audit/log"}); return v; }());
    CHECK(no_public.code == 2);
    CHECK_THAT(no_public.err, Catch::Contains("audit/log has no public half") && Catch::Contains("--private-keys"));
    // A full disk (a 1 KiB file size limit) during export.
    auto full = kwtest::run_program({"/bin/sh", "-c", "ulimit -f 1; exec \"$0\" \"$@\"", kwtest::binary_path(),
                                     "--keystore", f.a, "export", "--all", "--private-keys",
                                     "--key-bundle-file", f.dir + "/full.dat", "--key-bundle-secret",
                                     f.dir + "/full.json"},
                                    f.env);
    INFO(full.err);
    CHECK(full.code == 1);
    CHECK_THAT(full.err, Catch::Contains("full"));
    CHECK(state() == before);
}

// Every single-byte flip of a small bundle is refused by import, verify and import --init. The
// sweep runs in this process through the library (a process per offset cost minutes under
// AddressSanitizer); the rows above check the CLI's exit codes and messages for the same errors.
TEST_CASE("backup: every single-byte flip of a small bundle is refused", "[cli]") {
    BackupFixture f(false);
    f.must({"--keystore", f.a, "--token", "kw-src", "init"});
    f.must({"--keystore", f.a, "generate", "--audit-log-key"});
    f.must({"--keystore", f.b, "--token", "kw-dst", "init"});
    std::string sb = f.dir + "/small.dat", ss = f.dir + "/small.json";
    f.must([&] { auto v = f.exp(sb, ss); v.insert(v.end(), {"--private-keys", "audit/log"}); return v; }());
    const std::string small = kwtest::read_text(sb), small_secret = kwtest::read_text(ss);
    const std::string tb = f.dir + "/t.dat", ts = f.dir + "/t.json", pin = f.dir + "/pin";
    kwtest::write_file(pin, kwtest::SoftHsm::user_pin);
    namespace kb = keywarden::backup;
    const keywarden::pkcs11::TokenOptions src{kwtest::module_path(), std::nullopt, "kw-src", "file:" + pin};
    const keywarden::pkcs11::TokenOptions dst{kwtest::module_path(), std::nullopt, "kw-dst", "file:" + pin};
    auto import_into = [&](const std::string& store, bool init) {
        kb::ImportOptions o;
        o.bundle_path = tb;
        o.secret_path = ts;
        o.keystore_path = store;
        o.init = init;
        return kwtest::call([&] { kb::import_bundle(dst, o); });
    };
    // verify as the CLI reports it: exit 4 for a report with problems.
    auto verify = [&] {
        return kwtest::call([&] {
            auto token = keywarden::pkcs11::open_token(src, true);
            if (!kb::verify_bundle(tb, ts, token, nullptr).ok()) throw keywarden::IntegrityError("problems");
        });
    };
    // The sweep's own control: the unflipped bundle imports and verifies.
    kwtest::write_file(tb, small);
    kwtest::write_file(ts, small_secret);
    REQUIRE(verify().code == 0);
    REQUIRE(import_into(f.dir + "/control", true).code == 0);
    CHECK(fs::exists(f.dir + "/control/store.json"));

    auto before_b = kwtest::tree_digest(f.b);
    int refused = 0;
    for (std::size_t i = 0; i < small.size(); ++i) {
        std::string t = small;
        t[i] = static_cast<char>(t[i] ^ 0x01);
        kwtest::write_file(tb, t);
        kwtest::write_file(ts, small_secret);
        auto r = import_into(f.b, false);
        INFO("offset " << i << ": " << r.err);
        CHECK(r.code == 4);
        // verify refuses it too; and import --init (every 8th offset: a new store each time)
        // creates nothing.
        auto v = verify();
        INFO("verify: " << v.err);
        CHECK(v.code == 4);
        if (i % 8 == 0) {
            auto n = import_into(f.dir + "/flipped", true);
            CHECK(n.code == 4);
            CHECK_FALSE(fs::exists(f.dir + "/flipped"));
        }
        refused += r.code == 4 && v.code == 4;
    }
    CHECK(refused == static_cast<int>(small.size()));
    CHECK(kwtest::tree_digest(f.b) == before_b);
    // A handful of flips through the CLI: the same exit code from the binary.
    for (std::size_t i : {std::size_t{0}, small.size() / 2, small.size() - 2}) {
        std::string t = small;
        t[i] = static_cast<char>(t[i] ^ 0x01);
        kwtest::write_file(tb, t);
        auto r = f.run(f.imp(f.b, tb, ts));
        INFO("CLI, offset " << i << ": " << r.err);
        CHECK(r.code == 4);
        CHECK_THAT(r.err, Catch::StartsWith("error: "));
    }
    CHECK(kwtest::tree_digest(f.b) == before_b);
}

// What a scheduled drill reads: a public-only bundle verifies (exit 0) but says it restores no
// secret; a bundle that fails its checks is not declared to match the store.
TEST_CASE("backup: verify notes a public-only bundle and compares no failed bundle with the store", "[cli]") {
    BackupFixture f;
    const std::string pub_b = f.dir + "/pub.dat", pub_s = f.dir + "/pub.json";
    const std::string all_b = f.dir + "/all.dat", all_s = f.dir + "/all.json";
    f.must([&] { auto v = f.exp(pub_b, pub_s); v.push_back("--all"); return v; }());
    f.must([&] { auto v = f.exp(all_b, all_s); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    const std::string note = "note: this bundle holds public keys only";
    auto pub = f.must({"--keystore", f.a, "verify", "--key-bundle-file", pub_b, "--key-bundle-secret", pub_s, "--against-store"});
    CHECK_THAT(pub.err, Catch::Contains(note));
    CHECK_THAT(pub.out, Catch::Contains("; matches the store"));
    auto all = f.must({"--keystore", f.a, "verify", "--key-bundle-file", all_b, "--key-bundle-secret", all_s, "--against-store"});
    CHECK_THAT(all.err, !Catch::Contains(note));
    std::string text = kwtest::read_text(all_b);
    const std::string cut = f.dir + "/cut.dat";
    kwtest::write_file(cut, text.substr(0, text.rfind('\n', text.size() - 2) + 1));  // the MAC line gone
    auto r = f.run({"--keystore", f.a, "verify", "--key-bundle-file", cut, "--key-bundle-secret", all_s, "--against-store"});
    INFO(r.out << r.err);
    CHECK(r.code == 4);
    CHECK_THAT(r.out, Catch::Contains("FAILED: ") && Catch::Contains("; not compared with the store: the bundle failed its checks"));
    CHECK_THAT(r.out, !Catch::Contains("matches the store"));
    auto rj = f.run({"--keystore", f.a, "verify", "--key-bundle-file", cut, "--key-bundle-secret", all_s, "--against-store", "--json"});
    CHECK(rj.code == 4);
    auto j = nlohmann::json::parse(rj.out);
    CHECK(j["against_store"]["compared"] == false);
    CHECK(j["against_store"]["missing"].empty());
    auto aj = f.must({"--keystore", f.a, "verify", "--key-bundle-file", all_b, "--key-bundle-secret", all_s, "--against-store", "--json"});
    CHECK(nlohmann::json::parse(aj.out)["against_store"]["compared"] == true);
}

// --merge --on-conflict overwrite with a bundle older than the store: the bundle's versions
// replace the store's, and the versions rotated in after the export stay (not current), with
// their keys unchanged, so nothing is lost and the next rotation never reuses their numbers.
// --dry-run names them. With 1 and 2 jobs.
TEST_CASE("backup: overwrite keeps the versions the store made after the export", "[cli]") {
    BackupFixture f;
    std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    const std::string base = f.dir + "/B0";
    f.must([&] { auto v = f.imp(base, bundle, secret); v.push_back("--init"); return v; }());
    f.must({"--keystore", base, "rotate", "audit/log", "client/alice01/symmetric"});
    auto key = [&](const std::string& store, const std::string& id, const char* version) {
        return f.must({"--keystore", store, "read", id, "--private", "--version", version, "--format", "base64"}).out;
    };
    const std::string log2 = key(base, "audit/log", "2"), sym3 = key(base, "client/alice01/symmetric", "3");
    auto dry = f.must([&] { auto v = f.imp(base, bundle, secret); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite", "--dry-run"}); return v; }());
    CHECK_THAT(dry.out, Catch::Contains("overwrite audit/log (keeps version 2, which the bundle does not hold)\n"));
    CHECK_THAT(dry.out, Catch::Contains("overwrite client/alice01/symmetric (keeps version 3, which the bundle does not hold)\n"));
    CHECK_THAT(dry.out, Catch::Contains("overwrite client/bob the client/symmetric\n"));
    auto dry_json = f.must([&] { auto v = f.imp(base, bundle, secret); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite", "--dry-run", "--json"}); return v; }());
    CHECK(nlohmann::json::parse(dry_json.out)["kept_versions"] ==
          nlohmann::json({{"audit/log", {2}}, {"client/alice01/symmetric", {3}}}));
    for (const char* jobs : {"1", "2"}) {
        INFO(jobs << " jobs");
        const std::string b = f.dir + "/B" + jobs;
        REQUIRE(kwtest::sh("cp -a '" + base + "' '" + b + "'") == 0);
        auto done = f.must([&] { auto v = f.imp(b, bundle, secret); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite", "--jobs", jobs}); return v; }());
        CHECK_THAT(done.err, Catch::Contains("(11 key versions)") && Catch::Contains("; kept 2 versions of overwritten rings"));
        // The bundle's current versions again, the later ones still there with the same keys.
        auto rings = nlohmann::json::parse(f.must({"--keystore", b, "list", "--rotated", "--json"}).out);
        std::map<std::string, std::vector<std::pair<int, bool>>> seen;  // id -> (version, current)
        for (const auto& r : rings)
            for (const auto& v : r["versions"]) seen[r["key_id"]].push_back({v["version"].get<int>(), v["current"].get<bool>()});
        // The store's current version, made after the export, stays current.
        CHECK(seen["audit/log"] == std::vector<std::pair<int, bool>>{{1, false}, {2, true}});
        CHECK(seen["client/alice01/symmetric"] == std::vector<std::pair<int, bool>>{{1, false}, {2, false}, {3, true}});
        CHECK(key(b, "audit/log", "2") == log2);
        CHECK(key(b, "client/alice01/symmetric", "3") == sym3);
        CHECK(key(b, "audit/log", "1") == key(f.a, "audit/log", "1"));
        f.must({"--keystore", b, "keystore", "verify"});
        // The next rotation makes version 3, not a second version 2.
        f.must({"--keystore", b, "rotate", "audit/log"});
        auto after = nlohmann::json::parse(f.must({"--keystore", b, "list", "--rotated", "--json"}).out);
        for (const auto& r : after)
            if (r["key_id"] == "audit/log") CHECK(r["versions"].size() == 3);
        CHECK(key(b, "audit/log", "2") == log2);
        CHECK(key(b, "audit/log", "3") != log2);
    }

    // A version both hold with different keys: overwrite would lose the store's, so it refuses,
    // as does a public-only bundle over the store's private keys. Nothing changes.
    f.must({"--keystore", f.a, "rotate", "audit/log"});  // A's audit/log@2 is another key than B0's
    const std::string newer = f.dir + "/newer.dat", newer_s = f.dir + "/newer.json";
    const std::string pub = f.dir + "/pub.dat", pub_s = f.dir + "/pub.json";
    f.must([&] { auto v = f.exp(newer, newer_s); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    f.must([&] { auto v = f.exp(pub, pub_s); v.push_back("--all"); return v; }());
    const auto before = kwtest::tree_digest(base);
    struct Refusal {
        std::string bundle, secret, first;
    };
    for (const auto& r : {Refusal{newer, newer_s, "audit/log@2 first"}, Refusal{pub, pub_s, "client/alice01/storage@1 first"}}) {
        INFO(r.bundle);
        auto no = f.run([&] { auto v = f.imp(base, r.bundle, r.secret); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite"}); return v; }());
        CHECK(no.code == 1);
        CHECK_THAT(no.err, Catch::Contains("of the store's key versions or rings would be lost") && Catch::Contains("; " + r.first));
        CHECK_THAT(no.err, Catch::Contains("hint: keep the store's keys with --on-conflict skip"));
        auto dry = f.run([&] { auto v = f.imp(base, r.bundle, r.secret); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite", "--dry-run", "--json"}); return v; }());
        CHECK(dry.code == 1);
        CHECK_FALSE(nlohmann::json::parse(dry.out)["replaced_versions"].empty());
        CHECK(kwtest::tree_digest(base) == before);
    }

    // A store ring that cannot be read: what it holds is unknown, so it is refused too.
    const std::string d = f.dir + "/D";
    REQUIRE(kwtest::sh("cp -a '" + base + "' '" + d + "'") == 0);
    const std::string ring = d + "/keys/poison/symmetric.keyring";
    std::string text = kwtest::read_text(ring);
    text[text.size() / 2] ^= 0x01;
    kwtest::write_file(ring, text);
    const auto damaged = kwtest::tree_digest(d);
    auto refused = f.run([&] { auto v = f.imp(d, bundle, secret); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite"}); return v; }());
    CHECK(refused.code == 1);
    CHECK_THAT(refused.err, Catch::Contains("the store's key ring poison/symmetric cannot be read") &&
                                Catch::Contains("; poison/symmetric first"));
    CHECK(kwtest::tree_digest(d) == damaged);

    // A version destroyed in the store holds nothing to lose: the bundle's comes back, with the
    // same key (v1) or even another one (v2, whose store key was not the bundle's).
    const std::string e = f.dir + "/E";
    REQUIRE(kwtest::sh("cp -a '" + base + "' '" + e + "'") == 0);
    f.must({"--keystore", e, "destroy", "audit/log", "--version", "1"});
    f.must({"--keystore", e, "destroy", "audit/log", "--version", "2"});
    f.must([&] { auto v = f.imp(e, newer, newer_s); v.insert(v.end(), {"--merge", "--on-conflict", "overwrite"}); return v; }());
    CHECK(key(e, "audit/log", "1") == key(f.a, "audit/log", "1"));
    CHECK(key(e, "audit/log", "2") == key(f.a, "audit/log", "2"));
    CHECK(key(e, "audit/log", "2") != log2);
}

// export, verify and import show a progress bar when stderr is a terminal (here a pty from
// script(1)), and none otherwise.
TEST_CASE("backup: a progress bar on a terminal, none without one", "[cli]") {
    BackupFixture f;
    const std::string bundle = f.dir + "/pb.dat", secret = f.dir + "/pb.json", run = f.dir + "/run.sh";
    auto on_tty = [&](const std::string& command) {
        kwtest::write_file(run, "exec \"$KEYWARDEN_BIN\" " + command + "\n", 0700);
        auto env = f.env;
        env["KEYWARDEN_BIN"] = kwtest::binary_path();
        return kwtest::run_program({"script", "-qec", "sh " + run, "/dev/null"}, env);
    };
    const std::string files = " --key-bundle-file " + bundle + " --key-bundle-secret " + secret;
    auto e = on_tty("--keystore " + f.a + " export --all --private-keys --jobs 2" + files);
    INFO(e.out << e.err);
    REQUIRE(e.code == 0);
    CHECK_THAT(e.out, Catch::Contains("exporting [##############################] 11/11"));
    auto v = on_tty("--keystore " + f.a + " verify" + files);
    CHECK_THAT(v.out, Catch::Contains("verifying [##############################] 11/11"));
    auto i = on_tty("--keystore " + f.b + " --token kw-dst import --init" + files);
    CHECK_THAT(i.out, Catch::Contains("importing [##############################] 11/11"));
    // Without a terminal (run_cli has none): no bar.
    auto quiet = f.must({"--keystore", f.a, "verify", "--key-bundle-file", bundle, "--key-bundle-secret", secret});
    CHECK(quiet.err.find("verifying [") == std::string::npos);
    CHECK(quiet.out.find("verifying [") == std::string::npos);
}

TEST_CASE("golden: the bundle written by keywarden 0.1.0 still imports", "[cli]") {
    BackupFixture f(false);
    std::string data = kwtest::source_root() + "/tests/data/";
    std::string bundle = f.dir + "/golden.dat", secret = f.dir + "/golden.json";
    fs::copy_file(data + "bundle-v1/bundle.dat", bundle);
    fs::copy_file(data + "bundle-v1/secret.json", secret);
    f.must([&] { auto v = f.imp(f.b, bundle, secret); v.push_back("--init"); return v; }());
    auto expected = nlohmann::json::parse(kwtest::read_text(data + "keystore-v2/expected.json"));
    REQUIRE(expected.size() == 11);
    for (const auto& [key, want] : expected.items()) {
        auto at = key.rfind('@');
        std::string id = key.substr(0, at), version = key.substr(at + 1);
        INFO(key);
        auto priv = f.run({"--keystore", f.b, "read", id, "--private", "--version", version});
        if (want["private"].is_null()) CHECK(priv.code == 1);
        else CHECK(priv.out == want["private"].get<std::string>() + "\n");
        if (!want["public"].is_null())
            CHECK(f.run({"--keystore", f.b, "read", id, "--public", "--version", version}).out ==
                  want["public"].get<std::string>() + "\n");
    }
}

// export --all reads the store in one streamed pass; a damaged store is refused just the same,
// with exit 4, and no output file is left.
TEST_CASE("backup: export --all of a damaged store is refused and leaves no files", "[cli]") {
    BackupFixture f;
    std::string manifest = f.a + "/manifest";
    std::string ring = f.a + "/keys/client/alice01/symmetric.keyring";
    const std::string good_manifest = kwtest::read_text(manifest), good_ring = kwtest::read_text(ring);
    f.must({"--keystore", f.a, "rotate", "client/alice01/symmetric"});
    const std::string newer_manifest = kwtest::read_text(manifest), newer_ring = kwtest::read_text(ring);
    struct Row {
        std::string what;
        std::function<void()> damage;
    };
    std::vector<Row> rows{
        {"a byte of the manifest flipped", [&] { auto t = newer_manifest; t[t.size() / 2] ^= 1; kwtest::write_file(manifest, t); }},
        {"the manifest truncated", [&] { kwtest::write_file(manifest, newer_manifest.substr(0, newer_manifest.size() - 40)); }},
        {"an older ring put back", [&] { kwtest::write_file(ring, good_ring); }},
        {"an older manifest put back", [&] { kwtest::write_file(manifest, good_manifest); }},
        {"a ring file deleted", [&] { fs::remove(ring); }},
    };
    int n = 0;
    for (const auto& row : rows) {
        INFO(row.what);
        row.damage();
        std::string bundle = f.dir + "/d" + std::to_string(n) + ".dat", secret = f.dir + "/d" + std::to_string(n) + ".json";
        ++n;
        auto before = kwtest::tree_digest(f.a);
        for (const char* jobs : {"1", "2"}) {
            auto r = f.run([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys", "--jobs", jobs}); return v; }());
            CHECK(r.code == 4);
            CHECK(r.err.find("error:") != std::string::npos);
            CHECK(!fs::exists(bundle));
            CHECK(!fs::exists(secret));
        }
        CHECK(kwtest::tree_digest(f.a) == before);
        kwtest::write_file(manifest, newer_manifest);
        kwtest::write_file(ring, newer_ring);
        ::chmod(ring.c_str(), 0600);
    }
    f.must([&] { auto v = f.exp(f.dir + "/ok.dat", f.dir + "/ok.json"); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
}

// Bundles from keywarden 0.2.0 and older list the rings of a key id export in the order given.
// import --init then keeps the manifest members in memory instead of streaming them. Such a
// bundle is made here by reversing the rings of a bundle (one version each, so each entry line
// is a ring) and computing its MAC again with the secret file's signature key.
TEST_CASE("backup: a bundle whose rings are not in key id order still imports", "[cli]") {
    BackupFixture f(false);
    std::string bundle = f.dir + "/o.dat", secret = f.dir + "/o.json", reversed = f.dir + "/rev.dat";
    std::vector<std::string> lines = three_ring_bundle(f, bundle, secret);
    REQUIRE(lines.size() == 6);  // magic, header, three entries, mac
    REQUIRE(lines.back().starts_with("mac "));
    std::reverse(lines.begin() + 2, lines.begin() + 5);
    lines.pop_back();  // the old mac
    write_with_new_mac(reversed, lines, secret);
    f.must({"--keystore", f.a, "verify", "--key-bundle-file", reversed, "--key-bundle-secret", secret});
    for (const char* jobs : {"1", "2"}) {
        INFO(jobs << " jobs");
        std::string store = f.dir + "/O" + jobs;
        f.must([&] { auto v = f.imp(store, reversed, secret); v.insert(v.end(), {"--init", "--jobs", jobs}); return v; }());
        CHECK(f.versions(f.a) == f.versions(store));
        for (const auto& [id, version, state] : f.versions(f.a))
            CHECK(f.must({"--keystore", f.a, "read", id, "--private", "--version", version}).out ==
                  f.must({"--keystore", store, "read", id, "--private", "--version", version}).out);
        f.must({"--keystore", store, "keystore", "verify"});
    }
}

// A store directory an administrator made ready, in a parent directory the user cannot write:
// init cannot put its record of the planned master keys beside the store, so it warns and goes
// on without one. Run as another user (setpriv, uid 65534) when the tests run as root, since
// root writes anywhere; otherwise the parent is made read-only for this user.
TEST_CASE("backup: init into a prepared store directory whose parent it cannot write warns and works", "[cli]") {
    BackupFixture f(false);
    const std::string admin = f.dir + "/admin", store = admin + "/store";
    fs::create_directory(admin);
    fs::create_directory(store);
    ::chmod(store.c_str(), 0700);
    const bool root = ::geteuid() == 0;
    std::vector<std::string> prefix;
    if (root) {
        // Everything the run touches belongs to uid 65534 (the tokens, the store directory);
        // `admin` stays root's, 0755.
        REQUIRE(kwtest::sh("chown -R 65534:65534 '" + f.dir + "' && chown 0:0 '" + admin + "'") == 0);
        ::chmod(admin.c_str(), 0755);
        ::chmod(f.dir.c_str(), 0755);
        prefix = {"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", fs::absolute(kwtest::binary_path()).string()};
    } else {
        ::chmod(admin.c_str(), 0555);
        prefix = {fs::absolute(kwtest::binary_path()).string()};
    }
    auto as_user = [&](std::vector<std::string> args) {
        args.insert(args.begin(), prefix.begin(), prefix.end());
        return kwtest::run_program(args, f.env);
    };
    auto r = as_user({"--keystore", store, "--token", "kw-dst", "init"});
    INFO(r.out << r.err);
    CHECK(r.code == 0);
    CHECK_THAT(r.err, Catch::Contains("cannot write the record of the master keys about to be generated beside the store") &&
                          Catch::Contains("delete its new master keys by hand"));
    CHECK(as_user({"--keystore", store, "keystore", "verify"}).code == 0);
    std::size_t entries = 0;
    for (const auto& e : fs::directory_iterator(admin)) {
        ++entries;
        CHECK(e.path().filename() == "store");
    }
    CHECK(entries == 1);
    if (!root) ::chmod(admin.c_str(), 0755);  // so that the fixture can remove it
}
