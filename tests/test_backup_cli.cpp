// SPDX-License-Identifier: Apache-2.0
// Backups end to end: export from store A on token 1, import into store B on token 2.
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
#include "keywarden/encoding.hpp"
#include "keywarden/key_protector.hpp"
#include "support.hpp"
#include "two_tokens.hpp"

using kwtest::run_cli;
using Env = std::map<std::string, std::optional<std::string>>;
namespace fs = std::filesystem;

namespace {

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

bool keypair(const std::string& id) {
    return id.ends_with("/storage") || id == "poison/keypair";
}

// Store A on kw-src with 150 clients of three keys each (450 keys): enough that an export or an
// import takes a while.
void bulk_store(BackupFixture& f) {
    f.must({"--keystore", f.a, "--token", "kw-src", "init"});
    std::string ids;
    for (int i = 0; i < 150; ++i) ids += "bulk-client-" + std::to_string(i) + "\n";
    kwtest::write_file(f.dir + "/ids.txt", ids);
    f.must({"--keystore", f.a, "generate", "--client-ids-from", f.dir + "/ids.txt"});
}

// A fresh store of three symmetric rings (aaa-client, mmm-client, zzz-client, one version each),
// exported with its private keys: the bundle has magic, header, three entry lines and the mac.
std::vector<std::string> three_ring_bundle(BackupFixture& f, const std::string& bundle, const std::string& secret) {
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
void write_with_new_mac(const std::string& path, const std::vector<std::string>& lines, const std::string& secret) {
    std::string body;
    for (const auto& l : lines) body += l + "\n";
    auto key = keywarden::from_base64(nlohmann::json::parse(kwtest::read_text(secret)).at("signature").get<std::string>());
    REQUIRE(key);
    auto tag = keywarden::hmac_sha256(*key, std::span(reinterpret_cast<const std::uint8_t*>(body.data()), body.size()));
    kwtest::write_file(path, body + "mac " + keywarden::to_hex(tag) + "\n");
}

}  // namespace

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

TEST_CASE("backup: bad input is refused with a clear error and changes nothing", "[cli]") {
    BackupFixture f;
    const std::string bundle = f.dir + "/b.dat", secret = f.dir + "/s.json";
    const std::string other_b = f.dir + "/o.dat", other_s = f.dir + "/o.json";
    f.must([&] { auto v = f.exp(bundle, secret); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    f.must([&] { auto v = f.exp(other_b, other_s); v.insert(v.end(), {"--all", "--private-keys"}); return v; }());
    f.must({"--keystore", f.b, "--token", "kw-dst", "init"});  // the empty target
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

    SECTION("every single-byte flip of a small bundle") {
        std::string sb = f.dir + "/small.dat", ss = f.dir + "/small.json";
        f.must([&] { auto v = f.exp(sb, ss); v.insert(v.end(), {"--private-keys", "audit/log"}); return v; }());
        std::string small = kwtest::read_text(sb), small_secret = kwtest::read_text(ss);
        auto before_b = kwtest::tree_digest(f.b);
        int refused = 0;
        for (std::size_t i = 0; i < small.size(); ++i) {
            std::string t = small;
            t[i] = static_cast<char>(t[i] ^ 0x01);
            kwtest::write_file(tb, t);
            kwtest::write_file(ts, small_secret);
            auto r = f.run(f.imp(f.b, tb, ts));
            INFO("offset " << i << ": " << r.err);
            CHECK(r.code == 4);
            // verify refuses it too; and import --init (every 8th offset: a new store each time)
            // creates nothing.
            auto v = f.run({"--keystore", f.a, "verify", "--key-bundle-file", tb, "--key-bundle-secret", ts});
            INFO("verify: " << v.out << v.err);
            CHECK(v.code == 4);
            if (i % 8 == 0) {
                auto n = f.run([&] { auto a = f.imp(f.dir + "/flipped", tb, ts); a.push_back("--init"); return a; }());
                CHECK(n.code == 4);
                CHECK_FALSE(fs::exists(f.dir + "/flipped"));
            }
            refused += r.code == 4 && v.code == 4;
        }
        CHECK(refused == static_cast<int>(small.size()));
        CHECK(kwtest::tree_digest(f.b) == before_b);
    }
    SECTION("import into a non-empty store without --merge") {
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
    SECTION("export refusals leave no files and no change") {
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
}

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
