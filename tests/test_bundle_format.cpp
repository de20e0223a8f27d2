// SPDX-License-Identifier: Apache-2.0
// The bundle's entry metadata: the text writer must give the JSON tree's bytes, the strict reader
// must agree with the JSON parser on what it accepts, and MetaCipher must be plain AES-256-CTR.
#include <openssl/evp.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "keywarden/bundle.hpp"
#include "keywarden/error.hpp"
#include "src/backup/internal.hpp"

namespace bk = keywarden::backup;
using keywarden::KeyKind;
using keywarden::SecureBytes;
using keywarden::keystore::KeyState;

namespace {

std::vector<bk::EntryMeta> sample_metas() {
    std::vector<bk::EntryMeta> out;
    bk::EntryMeta m;
    m.key_id = "client/alice/symmetric";
    m.version = 1;
    m.created = 1700000000;
    m.valid_from = 1700000000;
    m.current = true;
    m.kcv = {0x01, 0xab, 0xff, 0x00, 0x10, 0x20};
    m.wrapped = true;
    out.push_back(m);
    m.valid_until = 1800000000;
    m.state = KeyState::deactivated;
    m.current = false;
    m.wrapped = false;
    out.push_back(m);
    m.key_id = "client/bob/storage";
    m.key_type = KeyKind::ec_p256_private;
    m.public_key = std::vector<std::uint8_t>(65, 0x04);
    m.version = 4294967295u;
    m.key_length = 0;
    m.created = -5;
    m.valid_from = 0;
    m.valid_until = -9223372036854775807LL - 1;
    out.push_back(m);
    m.key_id = "audit-log";
    m.key_type = KeyKind::generic_secret;
    m.public_key.clear();
    m.state = KeyState::destroyed;
    m.kcv.clear();
    m.valid_until.reset();
    out.push_back(m);
    // Not valid key ids, but the writer must still write what the JSON library writes.
    for (const char* odd : {"quote\"in", "back\\slash", "tab\there", "caf\xc3\xa9", "ctl\x01", "del\x7f"}) {
        m.key_id = odd;
        out.push_back(m);
    }
    return out;
}

bool same(const bk::EntryMeta& a, const bk::EntryMeta& b) {
    return a.key_id == b.key_id && a.version == b.version && a.state == b.state && a.created == b.created &&
           a.valid_from == b.valid_from && a.valid_until == b.valid_until && a.current == b.current &&
           a.key_type == b.key_type && a.key_length == b.key_length && a.kcv == b.kcv &&
           a.public_key == b.public_key && a.wrapped == b.wrapped;
}

// One-shot AES-256-CTR with OpenSSL's legacy API, as `openssl enc -aes-256-ctr` does it.
std::vector<std::uint8_t> ctr_once(const SecureBytes& key, std::span<const std::uint8_t> iv,
                                   std::span<const std::uint8_t> in) {
    std::vector<std::uint8_t> out(in.size());
    EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
    int n = 0;
    REQUIRE(EVP_EncryptInit_ex(c, EVP_aes_256_ctr(), nullptr, key.data(), iv.data()) == 1);
    REQUIRE(EVP_EncryptUpdate(c, out.data(), &n, in.data(), static_cast<int>(in.size())) == 1);
    EVP_CIPHER_CTX_free(c);
    return out;
}

}  // namespace

TEST_CASE("bundle metadata: the text writer writes the JSON tree's bytes", "[unit]") {
    for (const auto& m : sample_metas()) {
        INFO(m.key_id);
        CHECK(bk::detail::meta_text(m) == bk::detail::meta_json(m));
    }
}

TEST_CASE("bundle metadata: the strict reader reads what the writer writes, and nothing else", "[unit]") {
    int fast = 0;
    for (const auto& m : sample_metas()) {
        INFO(m.key_id);
        std::string t = bk::detail::meta_text(m);
        auto got = bk::detail::meta_from_text(t);
        // Escaped strings are left to the JSON parser.
        if (t.find('\\') != std::string::npos || m.key_id.find('\x7f') != std::string::npos ||
            m.key_id.find('\xc3') != std::string::npos) {
            CHECK_FALSE(got);
            continue;
        }
        REQUIRE(got);
        CHECK(same(*got, m));
        ++fast;
    }
    CHECK(fast == 4);  // the four plain ones

    // Each of these is valid JSON the strict reader does not take: spaces, another key order,
    // escapes, minus zero, numbers out of range, unknown values. The JSON path decides on them.
    const std::string base = bk::detail::meta_text(sample_metas()[1]);
    auto with = [&](const std::string& from, const std::string& to) {
        std::string t = base;
        auto at = t.find(from);
        REQUIRE(at != std::string::npos);
        return t.replace(at, from.size(), to);
    };
    for (const std::string& t : {with("{\"created\":", "{ \"created\":"), with("\"version\":1", "\"version\": 1"),
                                 with("\"created\":1700000000", "\"created\":-0"),
                                 with("\"version\":1", "\"version\":4294967296"),
                                 with("\"key_id\":\"client/alice/symmetric\"", "\"key_id\":\"client\\/alice/symmetric\""),
                                 with("}", "} "), with("\"wrapped\":false}", "\"wrapped\":false,\"extra\":1}"),
                                 with("\"state\":\"deactivated\"", "\"state\":\"nonsense\""),
                                 with("\"kcv\":\"01abff001020\"", "\"kcv\":\"01abff00102\""),
                                 with("\"created\":1700000000,\"current\":false", "\"current\":false,\"created\":1700000000")}) {
        INFO(t);
        CHECK_FALSE(bk::detail::meta_from_text(t));
        CHECK(nlohmann::json::accept(t));
    }
    // A leading zero is not JSON at all: neither path takes it.
    std::string zero = with("\"version\":1", "\"version\":01");
    CHECK_FALSE(bk::detail::meta_from_text(zero));
    CHECK_FALSE(nlohmann::json::accept(zero));
}

TEST_CASE("bundle metadata: MetaCipher is AES-256-CTR, and sealed entries open on both paths", "[unit]") {
    SecureBytes key(32);
    for (std::size_t i = 0; i < key.size(); ++i) key[i] = static_cast<std::uint8_t>(i * 7 + 1);
    bk::MetaCipher c(key);
    std::vector<std::uint8_t> iv(16, 0xfe), in(300);
    for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<std::uint8_t>(i);
    for (int round = 0; round < 3; ++round) {  // the context is reused: each call starts at its IV
        iv[15] = static_cast<std::uint8_t>(0xfe + round);  // the counter carries over bytes 14, 15
        std::vector<std::uint8_t> out(in.size());
        c.apply(iv, in, out.data());
        CHECK(out == ctr_once(key, iv, in));
    }

    std::vector<std::vector<std::uint8_t>> ivs;
    for (const auto& m : sample_metas()) {
        auto sealed = bk::seal_metadata(c, m);
        REQUIRE(sealed.size() == 16 + bk::detail::meta_text(m).size());
        ivs.emplace_back(sealed.begin(), sealed.begin() + 16);
        CHECK(same(bk::open_metadata(c, sealed), m));
        bk::MetaCipher fresh(key);  // another reader's cipher opens it too
        CHECK(same(bk::open_metadata(fresh, sealed), m));
        // The same entry written by the JSON tree (as 0.3.0 and older did) opens the same way.
        std::string j = bk::detail::meta_json(m);
        std::vector<std::uint8_t> old(ivs.back());
        auto ct = ctr_once(key, old, std::span(reinterpret_cast<const std::uint8_t*>(j.data()), j.size()));
        old.insert(old.end(), ct.begin(), ct.end());
        CHECK(same(bk::open_metadata(c, old), m));
    }
    std::sort(ivs.begin(), ivs.end());
    CHECK(std::adjacent_find(ivs.begin(), ivs.end()) == ivs.end());  // fresh random IVs

    // A metadata text with spaces opens through the JSON parser; a broken one is an integrity error.
    std::string spaced = "{ " + bk::detail::meta_text(sample_metas()[0]).substr(1);
    std::vector<std::uint8_t> sealed(16, 0x33);
    auto ct = ctr_once(key, sealed, std::span(reinterpret_cast<const std::uint8_t*>(spaced.data()), spaced.size()));
    sealed.insert(sealed.end(), ct.begin(), ct.end());
    CHECK(same(bk::open_metadata(c, sealed), sample_metas()[0]));
    sealed.back() ^= 0x01;  // the closing brace
    CHECK_THROWS_AS(bk::open_metadata(c, sealed), keywarden::IntegrityError);
}

// An import --jobs worker reads its chunks through an EntryCursor: positions, one entry put back
// (the one that starts the next ring), skipping forward past it, and the MAC at the end.
TEST_CASE("EntryCursor: positions, put back, skipping forward, and the MAC at the end", "[unit]") {
    namespace fs = std::filesystem;
    using keywarden::Error;
    using keywarden::IntegrityError;
    char tmpl[] = "/tmp/kw-cursor-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    const std::string dir = tmpl, path = dir + "/b.dat";
    bk::SecretFile sec;
    sec.encryption = SecureBytes(32, 0x11);
    sec.signature = SecureBytes(32, 0x22);
    sec.bundle_id = "0123456789abcdef0123456789abcdef";
    sec.wrap_method = "aes-key-wrap-pad";
    bk::BundleHeader h;
    h.bundle_id = sec.bundle_id;
    h.wrap_method = sec.wrap_method;
    h.wrap_mechanism = "CKM_AES_KEY_WRAP_PAD";
    h.kcv_encryption = bk::encryption_kcv(sec.encryption);
    h.kcv_signature = bk::signature_kcv(sec.signature);
    // Rings of 1, 3, 1 and 2 versions: entries 0 | 1 2 3 | 4 | 5 6.
    const std::vector<std::pair<std::string, std::uint32_t>> entries{
        {"client/aaaaa/symmetric", 1}, {"client/bbbbb/symmetric", 1}, {"client/bbbbb/symmetric", 2},
        {"client/bbbbb/symmetric", 3}, {"client/ccccc/symmetric", 1}, {"client/ddddd/symmetric", 1},
        {"client/ddddd/symmetric", 2}};
    h.entries = entries.size();
    h.rings = 4;
    {
        bk::detail::BundleWriter w(path, bk::kMagicLine, h, sec.signature);
        bk::MetaCipher mc(bk::metadata_key(sec.signature));
        for (const auto& [id, version] : entries) {
            bk::EntryMeta m;
            m.key_id = id;
            m.version = version;
            m.kcv = {1, 2, 3};
            bk::EntryLine el;
            el.sealed_meta = bk::seal_metadata(mc, m);
            w.line(bk::encode_entry(el));
        }
        w.finish();
        CHECK_FALSE(fs::exists(path));  // complete under its temp name only
        w.publish();
    }
    auto at = [&](const std::optional<bk::detail::Entry>& e, std::size_t i) {
        REQUIRE(e);
        CHECK(e->meta.key_id == entries[i].first);
        CHECK(e->meta.version == entries[i].second);
    };
    {
        bk::detail::BundleReader r(path, sec);
        bk::detail::EntryCursor c(r);
        CHECK(c.position() == 0);
        auto e = c.next();
        at(e, 0);
        CHECK(c.position() == 1);
        c.put_back(std::move(*e));  // gives it again
        CHECK(c.position() == 0);
        CHECK_THROWS_AS(c.put_back(bk::detail::Entry{}), Error);  // only one entry can go back
        auto again = c.next();
        at(again, 0);
        c.skip_to(3);  // passes over 1 and 2
        CHECK(c.position() == 3);
        at(c.next(), 3);
        auto four = c.next();
        at(four, 4);
        c.put_back(std::move(*four));
        CHECK(c.position() == 4);
        c.skip_to(4);  // already there: the put-back entry is still next
        at(c.next(), 4);
        c.put_back(bk::detail::Entry{*c.next()});  // entry 5 read and put back
        CHECK(c.position() == 5);
        c.skip_to(6);  // drops the put-back entry 5
        CHECK(c.position() == 6);
        at(c.next(), 6);
        CHECK_THROWS_AS(c.skip_to(2), Error);  // only forward
        CHECK_FALSE(c.next());  // the MAC line: checked, no more entries
        c.skip_rest();
    }
    {
        bk::detail::BundleReader r(path, sec);
        bk::detail::EntryCursor c(r);
        CHECK_THROWS_AS(c.put_back(bk::detail::Entry{}), Error);  // nothing read yet
        c.skip_to(2);
        c.skip_rest();  // the whole-file MAC verifies
        CHECK_THROWS_AS(c.skip_to(99), IntegrityError);
    }
    {
        // entry_before: the entry before a chunk, read when the cursor is before it.
        bk::detail::BundleReader r(path, sec);
        bk::detail::EntryCursor c(r);
        CHECK_FALSE(c.entry_before(0));  // at the chunk already
        at(c.entry_before(3), 2);        // skips 0 and 1, reads 2
        CHECK(c.position() == 3);
        CHECK_FALSE(c.entry_before(3));
        at(c.next(), 3);
        CHECK_THROWS_AS(c.entry_before(99), IntegrityError);  // the bundle ends first
    }
    // A changed entry line: skipping to the end still checks the MAC.
    std::string text;
    {
        std::ifstream in(path);
        text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    auto third = text.find('\n', text.find('\n', text.find('\n') + 1) + 1);  // after the first entry
    text[third + 5] = static_cast<char>(text[third + 5] == 'A' ? 'B' : 'A');
    {
        std::ofstream out(path, std::ios::trunc);
        out << text;
    }
    {
        bk::detail::BundleReader r(path, sec);
        bk::detail::EntryCursor c(r);
        at(c.next(), 0);
        CHECK_THROWS_AS(c.skip_rest(), IntegrityError);
    }
    fs::remove_all(dir);
}
