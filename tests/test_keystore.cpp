// SPDX-License-Identifier: Apache-2.0
// The key store on the software key protector: no token needed.
#include <catch2/catch.hpp>
#include <algorithm>
#include <filesystem>
#include <fstream>

#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/keystore.hpp"
#include "support.hpp"
#include "../src/keystore/detail/format.hpp"

using namespace keywarden;
using namespace keywarden::keystore;
namespace fs = std::filesystem;

namespace {

struct SoftStore {
    std::string root = kwtest::make_temp_dir("kw-store");
    std::string dir = root + "/ks";
    SecureBytes enc = SecureBytes(32, 0x0e), sig = SecureBytes(32, 0x51);

    MasterKeys keys() const {
        MasterKeys k;
        k.protector = std::make_unique<SoftwareKeyProtector>(enc);
        k.mac = std::make_unique<SoftwareMacKey>(sig);
        k.backend = std::make_unique<SoftwareKeyBackend>();
        return k;
    }
    // store_id and created fixed: two such stores have identical store.json bytes.
    explicit SoftStore(const std::string& store_id = {}, std::int64_t created = 0) {
        auto st = open_file_storage(dir);
        auto k = keys();
        StoreMeta meta;
        meta.store_id = store_id;
        meta.created = created;
        meta.token_serial = "soft";
        meta.encryption.label = "enc";
        meta.signature.label = "sig";
        KeyStore::init(*st, k, meta);
    }
    ~SoftStore() {
        std::error_code ec;
        fs::remove_all(root, ec);
    }
    std::unique_ptr<KeyStore> open(bool writable = false, bool strict = true) const {
        return KeyStore::open(open_file_storage(dir), keys(), writable, strict);
    }
    std::string path(const KeyId& id) const { return dir + "/" + id.file(); }
};

void flip(const std::string& path, std::size_t offset) {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    char c = 0;
    f.read(&c, 1);
    c ^= 0x01;
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(&c, 1);
}

// Every field of a ring, as text, to compare two reads of it.
std::string ring_to_text(const KeyRing& r) {
    std::string out = r.id.str() + " current " + (r.current ? std::to_string(*r.current) : "-");
    for (const auto& v : r.versions)
        out += " | " + std::to_string(v.version) + " " + std::string(key_state_name(v.state)) + " " +
               std::to_string(v.created) + " " + std::to_string(v.valid_from) + " " +
               (v.valid_until ? std::to_string(*v.valid_until) : "-") + " " + std::to_string(v.key_length) + " " +
               v.protection + " " + to_hex(v.wrapped) + " " + to_hex(v.kcv) + " " + to_hex(v.public_key);
    return out;
}

const KeyId kAliceSym = {RingKind::symmetric, "alice01"};
const KeyId kAliceStorage = {RingKind::storage_keypair, "alice01"};
const KeyId kBobSym = {RingKind::symmetric, "bob-the-client"};

}  // namespace

TEST_CASE("client ids follow Acra's rule and never reach outside the store", "[unit]") {
    for (const char* good : {"alice", "client_01", "a b c d", "UPPER-lower_09"})
        CHECK_NOTHROW(validate_client_id(good));
    CHECK_NOTHROW(validate_client_id(std::string(256, 'x')));
    const std::string bad[] = {"", "abcd", "../x", "../../etc", "a/b/c/d", "alice.bob",
                               std::string(257, 'x'), std::string(300, 'y'), "tab\there",
                               std::string("nul\0byte", 8), "caf\xc3\xa9s"};
    for (const auto& id : bad) {
        INFO(id);
        try {
            validate_client_id(id);
            FAIL("accepted");
        } catch (const UsageError& e) {
            CHECK_THAT(e.hint(), Catch::Contains("5 to 256 characters"));
        }
    }
    // A 256-character id still gives a file name that fits in one path component.
    KeyId long_id{RingKind::hmac, std::string(256, 'z')};
    CHECK(long_id.file().size() < 200);
    CHECK_THAT(long_id.file(), Catch::StartsWith("keys/client/~"));
    CHECK(KeyId::parse("client/alice01/storage").kind == RingKind::storage_keypair);
    CHECK(KeyId::parse("audit/log").kind == RingKind::audit_log);
    CHECK_THROWS_AS(KeyId::parse("client/../x/storage"), UsageError);
    CHECK_THROWS_AS(KeyId::parse("client/alice01/other"), UsageError);
    CHECK_THROWS_AS(KeyId::parse("poison/other"), UsageError);
}

TEST_CASE("store life cycle on the software protector", "[unit]") {
    SoftStore s;
    {
        auto ks = s.open(true);
        CHECK(ks->list().empty());
        ks->generate({kAliceSym, kAliceStorage, KeyId::global(RingKind::audit_log)});
    }
    auto ks = s.open(true);
    auto rings = ks->list();
    REQUIRE(rings.size() == 3);
    CHECK(rings[0].key_id == "audit/log");
    SecureBytes v1 = ks->read_secret(kAliceSym);
    CHECK(v1.size() == 32);
    auto pub = ks->read_public(kAliceStorage);
    CHECK(pub.size() == 65);
    CHECK(p256_public_from_private(ks->read_secret(kAliceStorage)) == pub);

    SECTION("rotation keeps the old version readable") {
        ks->generate({kAliceSym});
        auto r = ks->load(kAliceSym);
        REQUIRE(r.versions.size() == 2);
        CHECK(r.current == 2u);
        CHECK(r.versions[0].state == KeyState::deactivated);
        CHECK(r.versions[0].valid_until.has_value());
        CHECK(ks->read_secret(kAliceSym, 1) == v1);
        CHECK(ks->read_secret(kAliceSym) != v1);
        // The manifest's count, which a key id export uses instead of reading the ring.
        CHECK(ks->version_count(kAliceSym) == 2);
        CHECK(ks->version_count(kAliceStorage) == 1);
        CHECK_THROWS_AS(ks->version_count(kBobSym), NotFoundError);
    }
    SECTION("destroy wipes one version and keeps the others") {
        ks->generate({kAliceSym});
        SecureBytes v2 = ks->read_secret(kAliceSym);
        ks->destroy(kAliceSym, 1);
        CHECK_THROWS_WITH(ks->read_secret(kAliceSym, 1), Catch::Contains("was destroyed"));
        CHECK(ks->read_secret(kAliceSym) == v2);
        CHECK(ks->load(kAliceSym).versions[0].wrapped.empty());
        ks->destroy(kAliceSym, 2);
        CHECK_THROWS_WITH(ks->read_secret(kAliceSym), Catch::Contains("no current version"));
        CHECK_THROWS_WITH(ks->destroy(kAliceSym, 2), Catch::Contains("already destroyed"));
        CHECK(ks->verify().ok());
    }
    SECTION("verify passes on an intact store") {
        auto rep = ks->verify();
        CHECK(rep.ok());
        CHECK(rep.rings == 3);
        CHECK(rep.keys_checked == 3);
    }
    SECTION("a batch with a duplicate id is refused") {
        CHECK_THROWS_AS(ks->generate({kBobSym, kBobSym}), UsageError);
        CHECK_FALSE(ks->contains(kBobSym));
    }
}

TEST_CASE("tampering is detected, and nothing is changed by the failed operation", "[unit]") {
    SoftStore s;
    s.open(true)->generate({kAliceSym, kBobSym, kAliceStorage});
    const std::string alice = s.path(kAliceSym), bob = s.path(kBobSym);

    SECTION("every single-byte flip of a key ring file") {
        auto size = fs::file_size(alice);
        for (std::size_t i = 0; i < size; ++i) {
            INFO("offset " << i);
            flip(alice, i);
            auto before = kwtest::tree_digest(s.dir);
            auto ks = s.open();
            CHECK_THROWS_AS(ks->read_secret(kAliceSym), Error);
            CHECK_FALSE(ks->verify().ok());
            ks.reset();
            CHECK(kwtest::tree_digest(s.dir) == before);
            flip(alice, i);
        }
        CHECK(s.open()->verify().ok());
    }
    SECTION("every single-byte flip of the manifest") {
        std::string m = s.dir + "/manifest";
        auto size = fs::file_size(m);
        for (std::size_t i = 0; i < size; ++i) {
            INFO("offset " << i);
            flip(m, i);
            CHECK_THROWS_AS(s.open(), Error);
            flip(m, i);
        }
        CHECK(s.open()->verify().ok());
    }
    SECTION("a ring copied under another client id") {
        fs::copy_file(alice, bob, fs::copy_options::overwrite_existing);
        auto ks = s.open(false, false);
        CHECK_THROWS_AS(ks->read_secret(kBobSym), IntegrityError);
        auto rep = ks->verify();
        REQUIRE(rep.problems.size() == 1);
        CHECK(rep.problems[0].key_id == kBobSym.str());
    }
    SECTION("a ring deleted") {
        fs::remove(bob);
        CHECK_THROWS_WITH(s.open(), Catch::Contains("missing"));
        CHECK_FALSE(s.open(false, false)->verify().ok());
    }
    SECTION("an older signed copy of a ring put back") {
        auto old = kwtest::read_text(alice);
        s.open(true)->generate({kAliceSym});
        kwtest::write_file(alice, old);
        auto ks = s.open();
        CHECK_THROWS_WITH(ks->read_secret(kAliceSym), Catch::Contains("does not match the signed manifest"));
    }
    SECTION("an extra key ring file") {
        fs::create_directories(s.dir + "/keys/client/mallory");
        fs::copy_file(alice, s.dir + "/keys/client/mallory/symmetric.keyring");
        CHECK_THROWS_WITH(s.open(), Catch::Contains("not in the signed manifest"));
    }
    SECTION("store.json changed") {
        auto meta = kwtest::read_text(s.dir + "/store.json");
        meta.replace(meta.find("\"soft\""), 6, "\"sofx\"");
        kwtest::write_file(s.dir + "/store.json", meta);
        CHECK_THROWS_WITH(s.open(), Catch::Contains("store.json does not match"));
    }
    SECTION("other master keys") {
        s.enc = SecureBytes(32, 0x77);
        CHECK_THROWS_WITH(s.open(), Catch::Contains("master encryption key found is not this store's"));
        s.enc = SecureBytes(32, 0x0e);
        s.sig = SecureBytes(32, 0x78);
        CHECK_THROWS_WITH(s.open(), Catch::Contains("master signature key found is not this store's"));
    }
    SECTION("group-writable store directory") {
        fs::permissions(s.dir, fs::perms::group_write, fs::perm_options::add);
        CHECK_THROWS_WITH(s.open(), Catch::Contains("writable by group or others"));
    }
}

TEST_CASE("an interrupted write is finished or rolled back by the next writer", "[unit]") {
    SoftStore s;
    s.open(true)->generate({kAliceSym});
    SecureBytes before = s.open()->read_secret(kAliceSym);
    const std::string alice = s.path(kAliceSym);

    SECTION("crash after the pending file, before the manifest: rolled back") {
        auto old_manifest = kwtest::read_text(s.dir + "/manifest");
        auto old_ring = kwtest::read_text(alice);
        s.open(true)->generate({kAliceSym});
        // Rebuild the pre-commit state: new ring only as pending, old manifest and ring.
        fs::rename(alice, alice + ".pending");
        kwtest::write_file(alice, old_ring);
        kwtest::write_file(s.dir + "/manifest", old_manifest);
        CHECK(s.open()->read_secret(kAliceSym) == before);  // readers ignore it
        CHECK(s.open(true)->read_secret(kAliceSym) == before);
        CHECK_FALSE(fs::exists(alice + ".pending"));  // the writer removed it
        CHECK(s.open()->verify().ok());
    }
    SECTION("crash after the manifest, before the rename: rolled forward") {
        s.open(true)->generate({kAliceSym});
        SecureBytes after = s.open()->read_secret(kAliceSym);
        auto old_ring = kwtest::read_text(alice);
        fs::rename(alice, alice + ".pending");
        kwtest::write_file(alice, "stale bytes");
        CHECK(s.open()->read_secret(kAliceSym) == after);  // a reader uses the pending copy
        CHECK(s.open(true)->read_secret(kAliceSym) == after);
        CHECK_FALSE(fs::exists(alice + ".pending"));
        CHECK(kwtest::read_text(alice) == old_ring);
    }
    SECTION("crash after the manifest, before the rename, of a new ring: rolled forward, not missing") {
        // Open lists keys/ once for the recovery and the file check; the file the recovery
        // renames into place must count as present (a strict open refuses missing rings).
        s.open(true)->generate({kBobSym});
        SecureBytes bob = s.open()->read_secret(kBobSym);
        const std::string path = s.path(kBobSym);
        fs::rename(path, path + ".pending");
        CHECK(s.open()->read_secret(kBobSym) == bob);
        CHECK(s.open(true)->read_secret(kBobSym) == bob);
        CHECK_FALSE(fs::exists(path + ".pending"));
        CHECK(fs::exists(path));
        CHECK(s.open()->verify().ok());
    }
}

TEST_CASE("a writer that does not commit drops its rings and their pending files (a failed migrate)", "[unit]") {
    SoftStore s;
    s.open(true)->generate({kAliceSym});
    auto before = kwtest::tree_digest(s.dir);
    {
        auto ks = s.open(true);
        // Stage a new ring and a new version of an existing one, as migrate does, then fail.
        KeyRing bob;
        bob.id = {RingKind::hmac, "bob0001"};
        bob.versions.push_back(ks->make_version(bob.id, 1, now_seconds()));
        bob.current = 1;
        KeyRing alice = ks->load(kAliceSym);
        alice.versions.push_back(ks->make_version(kAliceSym, 2, now_seconds()));
        auto w = ks->writer(KeyStore::Writer::Mode::update);
        w->put(bob);
        w->put(alice);
        CHECK(fs::exists(s.path(bob.id) + ".pending"));
        w.reset();  // no commit
        CHECK_FALSE(fs::exists(s.path(bob.id) + ".pending"));
        CHECK_FALSE(fs::exists(s.path(kAliceSym) + ".pending"));
        CHECK_FALSE(ks->contains(bob.id));
        ks->writer(KeyStore::Writer::Mode::update)->commit();  // nothing taken: no new manifest
    }
    CHECK(kwtest::tree_digest(s.dir) == before);
    CHECK(s.open()->verify().ok());
}

TEST_CASE("init refuses an existing store", "[unit]") {
    SoftStore s;
    auto before = kwtest::tree_digest(s.dir);
    auto st = open_file_storage(s.dir);
    auto k = s.keys();
    CHECK_THROWS_AS(KeyStore::init(*st, k, StoreMeta{}), ConflictError);
    CHECK(kwtest::tree_digest(s.dir) == before);
}

// export --all opens the store for one streamed pass (KeyStore::open_streaming): the manifest is
// checked while it streams from disk and read again ring by ring. It must read exactly what a
// loaded store reads and refuse exactly what a loaded store refuses.
TEST_CASE("a streamed store reads what a loaded store reads, and refuses the same tampering", "[unit]") {
    SoftStore s;
    const KeyId poison{RingKind::poison_keypair, ""}, audit{RingKind::audit_log, ""};
    s.open(true)->generate({kAliceSym, kBobSym, kAliceStorage, poison, audit});
    s.open(true)->generate({kAliceSym, kAliceStorage});  // rotated: two versions each
    auto streamed = [&] { return KeyStore::open_streaming(open_file_storage(s.dir), s.keys()); };
    auto all_rings = [](const KeyStore& ks, std::function<bool(const KeyId&)> filter = {}) {
        std::vector<std::string> out;
        auto cur = ks.rings(false, std::move(filter));
        while (auto r = cur.next()) out.push_back(ring_to_text(*r));
        return out;
    };

    SECTION("the same rings, versions and counts") {
        auto loaded = s.open();
        std::vector<std::string> expected;
        for (const auto& id : loaded->key_ids()) expected.push_back(ring_to_text(loaded->load(id)));
        REQUIRE(expected.size() == 5);
        auto ks = streamed();
        CHECK(all_rings(*ks) == expected);
        CHECK(all_rings(*ks) == all_rings(*loaded));  // a second pass reads the file again
        auto counts = ks->counts_by_kind();
        CHECK(counts == loaded->counts_by_kind());
        CHECK(counts.at(RingKind::symmetric).rings == 2);
        CHECK(counts.at(RingKind::symmetric).versions == 3);
        auto keypairs = all_rings(*ks, [](const KeyId& id) { return has_public(id.kind); });
        CHECK(keypairs.size() == 2);
        CHECK_THROWS_AS(ks->key_ids(), Error);  // nothing but the streamed pass
    }
    SECTION("every single-byte flip, truncation and extension of the manifest") {
        std::string m = s.dir + "/manifest";
        auto size = fs::file_size(m);
        // The same refusal as a loaded store: the same exit code (a flipped key id is a MAC
        // mismatch, exit 4, not an invalid key id, exit 2) and the same message.
        auto refusal = [](const std::function<void()>& f) -> std::string {
            try {
                f();
            } catch (const Error& e) {
                return std::to_string(static_cast<int>(e.exit_code())) + " " + e.what();
            }
            return "accepted";
        };
        for (std::size_t i = 0; i < size; ++i) {
            INFO("offset " << i);
            flip(m, i);
            std::string loaded = refusal([&] { s.open(); });
            CHECK(loaded != "accepted");
            CHECK(refusal([&] { streamed(); }) == loaded);
            flip(m, i);
        }
        auto whole = kwtest::read_text(m);
        for (std::size_t cut : {std::size_t{0}, std::size_t{5}, std::size_t{14}, size / 2, size - 32, size - 1}) {
            INFO("cut at " << cut);
            kwtest::write_file(m, whole.substr(0, cut));
            CHECK_THROWS_AS(streamed(), Error);
        }
        kwtest::write_file(m, whole + "x");
        CHECK_THROWS_AS(streamed(), IntegrityError);
        kwtest::write_file(m, whole);
        CHECK(all_rings(*streamed()).size() == 5);
    }
    SECTION("a manifest larger than the scanner's 256 KiB buffer") {
        std::vector<KeyId> many;
        for (int i = 0; i < 1500; ++i) many.push_back({RingKind::symmetric, "client-" + std::to_string(100000 + i)});
        s.open(true)->generate(many);
        std::string m = s.dir + "/manifest";
        auto size = fs::file_size(m);
        REQUIRE(size > 300 * 1024);
        auto loaded = s.open();
        CHECK(all_rings(*streamed()) == all_rings(*loaded));
        CHECK(streamed()->counts_by_kind() == loaded->counts_by_kind());
        for (std::size_t i : {std::size_t{262143}, std::size_t{262144}, std::size_t{262145}, size - 33, size - 32, size - 1}) {
            INFO("offset " << i);
            flip(m, i);
            CHECK_THROWS_WITH(streamed(), Catch::Contains("does not verify (MAC mismatch)"));
            flip(m, i);
        }
    }
    SECTION("an older signed copy of a ring put back, or a ring deleted") {
        const std::string alice = s.path(kAliceSym);
        auto old = kwtest::read_text(alice);
        s.open(true)->generate({kAliceSym});
        kwtest::write_file(alice, old);
        CHECK_THROWS_WITH(all_rings(*streamed()), Catch::Contains("does not match the signed manifest"));
        fs::remove(alice);
        CHECK_THROWS_WITH(all_rings(*streamed()), Catch::Contains("missing"));
    }
    SECTION("a committed pending copy after a crash is the one read") {
        const std::string alice = s.path(kAliceSym);
        auto expected = all_rings(*s.open());
        fs::rename(alice, alice + ".pending");
        kwtest::write_file(alice, "stale bytes");
        CHECK(all_rings(*streamed()) == expected);
        CHECK(kwtest::read_text(alice) == "stale bytes");  // a reader changes nothing
    }
    SECTION("a manifest replaced between the open and the pass") {
        std::string m = s.dir + "/manifest";
        auto old = kwtest::read_text(m);  // validly signed, one generation older
        s.open(true)->generate({KeyId{RingKind::symmetric, "zed-the-last"}});  // every other ring unchanged
        auto ks = streamed();
        kwtest::write_file(m, old);
        CHECK_THROWS_WITH(all_rings(*ks), Catch::Contains("changed while the store was being read"));
        // A reader that skips rings (a --jobs worker before its share) passes over their values
        // unparsed: the replaced file is still noticed, at the end.
        auto skip_all = [&] {
            auto cur = ks->rings(false, [](const KeyId&) { return true; });  // export always filters
            std::size_t n = 0;
            while (cur.skip()) ++n;
            return n;
        };
        CHECK_THROWS_WITH(skip_all(), Catch::Contains("changed while the store was being read"));
        // Also when a skipped ring's key id is no key id at all.
        auto bytes = kwtest::read_text(m);
        auto at = bytes.find("\"client/");
        REQUIRE(at != std::string::npos);
        bytes[at + 3] = 'X';  // "clXent/...": not a kind
        kwtest::write_file(m, bytes);
        CHECK_THROWS_WITH(skip_all(), Catch::Contains("changed while the store was being read"));
    }
    SECTION("a reader that skips every ring passes over each once") {
        std::size_t expected = s.open()->key_ids().size();
        auto ks = streamed();
        auto cur = ks->rings(false);
        std::size_t skipped = 0;
        while (cur.skip()) ++skipped;
        CHECK(skipped == expected);
        CHECK(expected >= 2);
    }
}

// import --init fills its new store with KeyStore::BulkWriter: ring files straight to their
// names, the manifest streamed from a scratch file. The result must be the store that staging
// and committing the same rings gives, whatever the order the rings come in.
TEST_CASE("a bulk-written store equals a staged one, in any ring order", "[unit]") {
    SoftStore src;
    const KeyId poison{RingKind::poison_keypair, ""}, audit{RingKind::audit_log, ""};
    src.open(true)->generate({kAliceSym, kBobSym, kAliceStorage, poison, audit});
    src.open(true)->generate({kAliceSym});
    std::vector<KeyRing> rings;
    {
        auto ks = src.open();
        for (const auto& id : ks->key_ids()) rings.push_back(ks->load(id));
    }
    auto fill = [&](SoftStore& dst, const std::vector<std::size_t>& order) {
        auto ks = dst.open(true);
        auto bulk = ks->writer(KeyStore::Writer::Mode::fill, dst.root);
        for (auto i : order) bulk->put(rings[i]);
        bulk->commit();
        CHECK_THROWS_AS(ks->key_ids(), Error);  // closed after the commit
    };
    auto text_of = [](const KeyStore& ks) {
        std::vector<std::string> out;
        for (const auto& id : ks.key_ids()) out.push_back(ring_to_text(ks.load(id)));
        return out;
    };
    std::vector<std::string> expected = text_of(*src.open());
    REQUIRE(rings.size() == 5);

    for (const auto& order : std::vector<std::vector<std::size_t>>{{0, 1, 2, 3, 4}, {3, 0, 4, 1, 2}, {4, 3, 2, 1, 0}}) {
        INFO("order " << order[0] << order[1] << order[2] << order[3] << order[4]);
        SoftStore dst("0123456789abcdef0123456789abcdef", 1700000000);
        fill(dst, order);
        auto ks = dst.open();
        CHECK(text_of(*ks) == expected);
        CHECK(ks->verify().ok());
        CHECK(ks->generation() == 2);
        // Byte for byte the manifest that staging and committing the same rings writes.
        SoftStore staged("0123456789abcdef0123456789abcdef", 1700000000);
        {
            auto w = staged.open(true);
            auto writer = w->writer(KeyStore::Writer::Mode::update);
            for (const auto& r : rings) writer->put(r);
            writer->commit();
        }
        CHECK(kwtest::read_text(dst.dir + "/store.json") == kwtest::read_text(staged.dir + "/store.json"));
        CHECK(kwtest::read_text(dst.dir + "/manifest") == kwtest::read_text(staged.dir + "/manifest"));
    }
    SECTION("a ring added twice is refused, in order or not") {
        for (const auto& order : std::vector<std::vector<std::size_t>>{{0, 1, 1}, {2, 0, 2}}) {
            SoftStore dst;
            auto ks = dst.open(true);
            auto bulk = ks->writer(KeyStore::Writer::Mode::fill, dst.root);
            bulk->put(rings[order[0]]);
            bulk->put(rings[order[1]]);
            CHECK_THROWS_AS(bulk->put(rings[order[2]]), IntegrityError);
        }
    }
    SECTION("only into an empty store") {
        CHECK_THROWS_AS(src.open(true)->writer(KeyStore::Writer::Mode::fill, src.root), Error);
    }
}

// The bulk writer's commit hands the manifest to the MAC and to the file in 64 KiB pieces, and
// import --jobs adds the rings its workers wrote by the text they pass back. A manifest of several
// pieces must still be, byte for byte, the one staging and committing the same rings writes.
TEST_CASE("a bulk-written manifest of many pieces equals a staged one, however the rings come", "[unit]") {
    SoftStore src;
    std::vector<KeyId> ids;
    for (int i = 0; i < 800; ++i) ids.push_back({RingKind::symmetric, "client" + std::to_string(1000 + i)});
    src.open(true)->generate(ids);
    std::vector<KeyRing> rings;
    {
        auto ks = src.open();
        for (const auto& id : ks->key_ids()) rings.push_back(ks->load(id));
    }
    REQUIRE(rings.size() == 800);
    // One ring with a manifest member of more than one piece on its own: 700 versions.
    {
        KeyRing big = rings.front();
        big.id = KeyId{RingKind::symmetric, "client0999"};
        const KeyVersion v = big.versions.front();
        big.versions.clear();
        for (std::uint32_t i = 1; i <= 700; ++i) {
            KeyVersion c = v;
            c.version = i;
            c.state = i == 700 ? KeyState::active : KeyState::deactivated;
            big.versions.push_back(c);
        }
        big.current = 700;
        rings.insert(rings.begin(), big);  // client0999 sorts before client1000
    }
    SoftStore staged("0123456789abcdef0123456789abcdef", 1700000000);
    {
        auto w = staged.open(true);
        auto writer = w->writer(KeyStore::Writer::Mode::update);
        for (const auto& r : rings) writer->put(r);
        writer->commit();
    }
    const std::string expected = kwtest::read_text(staged.dir + "/manifest");
    REQUIRE(expected.size() > 3 * 64 * 1024);
    REQUIRE(keystore::detail::manifest_member(rings.front().id.str(),
                                              {rings.front().id.file(), std::string(64, '0'),
                                               keystore::detail::summarize(rings.front())})
                .size() > 64 * 1024);
    for (const char* how : {"add", "written, with text", "written, without text", "written, with text, reversed"}) {
        INFO(how);
        SoftStore dst("0123456789abcdef0123456789abcdef", 1700000000);
        std::vector<KeyRing> order = rings;
        if (std::string(how).ends_with("reversed")) std::reverse(order.begin(), order.end());
        {
            auto ks = dst.open(true);
            auto bulk = ks->writer(KeyStore::Writer::Mode::fill, dst.root);
            auto part = ks->part_writer(KeyStore::Writer::Mode::fill);  // as a worker has
            for (const auto& r : order) {
                if (std::string(how) == "add") {
                    bulk->put(r);
                    continue;
                }
                auto p = part->write(r, part->seal(r));  // as a worker does
                if (std::string(how).starts_with("written, with text")) bulk->take(p, KeyStore::pending_text(p));
                else bulk->take(p);
            }
            bulk->commit();
        }
        CHECK(kwtest::read_text(dst.dir + "/manifest") == expected);
        auto ks = dst.open();
        CHECK(ks->key_ids().size() == 801);
        CHECK(ks->verify().ok());
    }
}

namespace {
// One ring of each of the six kinds (one with a space in its client id), two with a second
// version, one version destroyed.
void fill_every_kind(KeyStore& ks) {
    const KeyId poison{RingKind::poison_keypair, ""}, audit{RingKind::audit_log, ""};
    const KeyId poison_sym{RingKind::poison_symmetric, ""}, spaced{RingKind::hmac, "bob the client"};
    ks.generate({kAliceSym, kAliceStorage, poison, audit, poison_sym, spaced});
    ks.generate({kAliceSym, kAliceStorage});
    ks.destroy(kAliceSym, 1);
}
}  // namespace

// Sealing writes ring bodies as text directly (detail::ring_body); the bytes must stay those of
// the JSON tree's dump() that earlier versions wrote, for every kind of ring and version.
TEST_CASE("ring bodies written as text equal the JSON tree's dump", "[unit]") {
    SoftStore s;
    auto ks = s.open(true);
    fill_every_kind(*ks);
    std::size_t n = 0;
    for (const auto& id : ks->key_ids()) {
        KeyRing r = ks->load(id);
        INFO(id.str());
        CHECK(keystore::detail::ring_body(r, ks->meta().store_id) == keystore::detail::ring_to_json(r, ks->meta().store_id).dump());
        r.current.reset();  // a ring with no current version
        r.versions.front().valid_until = -5;
        CHECK(keystore::detail::ring_body(r, "x\"y") == keystore::detail::ring_to_json(r, "x\"y").dump());
        ++n;
    }
    CHECK(n == 6);
}

namespace {
bool same_ring(const KeyRing& a, const KeyRing& b) {
    if (!(a.id == b.id) || a.current != b.current || a.versions.size() != b.versions.size()) return false;
    for (std::size_t i = 0; i < a.versions.size(); ++i) {
        const auto &x = a.versions[i], &y = b.versions[i];
        if (x.version != y.version || x.state != y.state || x.created != y.created || x.valid_from != y.valid_from ||
            x.valid_until != y.valid_until || x.key_type != y.key_type || x.key_length != y.key_length ||
            x.protection != y.protection || x.wrapped != y.wrapped || x.kcv != y.kcv || x.public_key != y.public_key)
            return false;
    }
    return true;
}
}  // namespace

// Reading rings without a JSON tree (detail::ring_from_text) must give exactly what the JSON path
// gives for what keywarden writes, and must leave everything else to the JSON path.
TEST_CASE("ring bodies are read as text exactly as the JSON path reads them", "[unit]") {
    SoftStore s;
    auto ks = s.open(true);
    fill_every_kind(*ks);
    const std::string sid = ks->meta().store_id;
    std::size_t n = 0;
    for (const auto& id : ks->key_ids()) {
        KeyRing r = ks->load(id);
        INFO(id.str());
        for (int variant = 0; variant < 2; ++variant) {
            if (variant == 1) {
                r.current.reset();
                r.versions.front().valid_until = -5;
            }
            std::string body = keystore::detail::ring_body(r, sid);
            auto fast = keystore::detail::ring_from_text(body, sid);
            REQUIRE(fast);
            CHECK(same_ring(*fast, keystore::detail::ring_from_json(nlohmann::json::parse(body), sid)));
            CHECK(same_ring(*fast, r));
        }
        ++n;
    }
    CHECK(n == 6);

    // Each change below is left to the JSON path (nullopt), which then accepts or refuses it.
    KeyRing r = ks->load(kAliceStorage);
    const std::string body = keystore::detail::ring_body(r, sid);
    auto with = [&](const std::string& from, const std::string& to) {
        std::string t = body;
        auto at = t.find(from);
        REQUIRE(at != std::string::npos);
        return t.replace(at, from.size(), to);
    };
    struct Row {
        std::string text;
        bool json_accepts;  // whether ring_from_json reads it (the same ring), or throws
    };
    std::vector<Row> rows = {
        {with("{\"client_id\"", "{ \"client_id\""), true},
        {with("\"format\":1", "\"format\":2"), true},  // not checked in the body (the frame has it)
        // (Another first digit: a store id that starts with 0 would otherwise be left as it is.)
        {with("\"store_id\":\"" + sid, std::string("\"store_id\":\"") + (sid[0] == '0' ? '1' : '0') + sid.substr(1)),
         false},
        {with("\"kind\":\"storage-keypair\"", "\"kind\":\"symmetric\""), false},
        {with("\"key_type\":\"ec-p256-private\"", "\"key_type\":\"aes\""), false},
        {with("\"state\":\"active\"", "\"state\":\"asleep\""), false},
        {with("\"version\":1", "\"version\":-1"), true},  // as before: the JSON library's conversion
        {with("\"valid_until\":null", "\"valid_until\":1.5"), true},
        {with("\"kcv\":\"", "\"kcv\":\"z"), false},
        {with("\"key_id\":\"client/alice01/storage\"", "\"key_id\":\"client\\/alice01/storage\""), true},
        {with("]}", "],\"extra\":1}"), true},
        {with("]}", "]} "), true},
    };
    for (const auto& row : rows) {
        INFO(row.text);
        CHECK_FALSE(keystore::detail::ring_from_text(row.text, sid));
        if (row.json_accepts) CHECK_NOTHROW(keystore::detail::ring_from_json(nlohmann::json::parse(row.text), sid));
        else CHECK_THROWS(keystore::detail::ring_from_json(nlohmann::json::parse(row.text), sid));
    }
    CHECK_FALSE(keystore::detail::ring_from_text(body.substr(0, body.size() - 1), sid));  // truncated
    CHECK(keystore::detail::ring_from_text(body, sid));
}

// Manifest members are read without a JSON tree when they are exactly as written
// (detail::entry_from_text); the result must be the JSON path's.
TEST_CASE("manifest members are read as text exactly as the JSON path reads them", "[unit]") {
    using keystore::detail::ManifestEntry;
    auto same_entry = [](const ManifestEntry& a, const ManifestEntry& b) {
        return a.file == b.file && a.sha256 == b.sha256 && keystore::detail::same_summary(a.summary, b.summary);
    };
    SoftStore s;
    auto ks = s.open(true);
    ks->generate({kAliceSym, kAliceStorage});
    ks->generate({kAliceSym});
    std::size_t n = 0;
    for (const auto& id : ks->key_ids()) {
        KeyRing r = ks->load(id);
        r.versions.back().valid_until = -7;
        ManifestEntry e{id.file(), std::string(64, 'a'), keystore::detail::summarize(r)};
        std::string member = keystore::detail::manifest_member(id.str(), e);
        std::string value = member.substr(member.find(':') + 1);
        INFO(value);
        auto fast = keystore::detail::entry_from_text(id.str(), value);
        REQUIRE(fast);
        CHECK(same_entry(*fast, e));
        // What the text reader does not take: another file name (the JSON path refuses it), spaces,
        // other members (the JSON path reads them), a broken end.
        std::string other = value;
        other.replace(other.find(id.file()), id.file().size(), "keys/other");
        CHECK_FALSE(keystore::detail::entry_from_text(id.str(), other));
        CHECK_FALSE(keystore::detail::entry_from_text(id.str(), "{ " + value.substr(1)));
        CHECK_FALSE(keystore::detail::entry_from_text(id.str(), value.substr(0, value.size() - 1) + ",\"x\":1}"));
        CHECK_FALSE(keystore::detail::entry_from_text(id.str(), value.substr(0, value.size() - 1)));
        CHECK_FALSE(keystore::detail::entry_from_text("not a key id", value));
        ++n;
    }
    CHECK(n == 2);
}

// How --jobs workers hand written rings to the parent: one line each, read back exactly.
TEST_CASE("pending ring records survive the trip from a worker to the parent", "[unit]") {
    SoftStore s;
    auto ks = s.open(true);
    const KeyId spaced{RingKind::hmac, "bob the client"};
    ks->generate({kAliceSym, kAliceStorage, spaced});
    ks->generate({kAliceSym});
    std::size_t n = 0;
    for (const auto& id : ks->key_ids()) {
        KeyRing r = ks->load(id);
        KeyStore::PendingRing p{id.str(), id.file(), std::string(64, 'f'), keystore::detail::summarize(r)};
        std::string line = KeyStore::pending_text(p);
        INFO(line);
        CHECK(line.find('\n') == std::string::npos);
        auto back = KeyStore::pending_from_text(line);
        CHECK(back.key_id == p.key_id);
        CHECK(back.file == p.file);
        CHECK(back.sha256 == p.sha256);
        CHECK(keystore::detail::same_summary(back.summary, p.summary));
        CHECK_THROWS_AS(KeyStore::pending_from_text(line.substr(0, line.size() - 1)), Error);
        // The parent copies a record into the manifest as it reads it, so only the exact written
        // form is taken: a kind other than the key id's is refused.
        std::string kind = std::string("\"kind\":\"") + ring_kind_name(id.kind) + "\"";
        REQUIRE(line.find(kind) != std::string::npos);
        std::string other = line;
        other.replace(other.find(kind), kind.size(),
                      std::string("\"kind\":\"") + ring_kind_name(id.kind == RingKind::hmac ? RingKind::symmetric
                                                                                        : RingKind::hmac) + "\"");
        CHECK_THROWS_AS(KeyStore::pending_from_text(other), Error);
        ++n;
    }
    CHECK(n == 3);
    for (const char* bad : {"", "\"", "\"a\"", "\"a\":{}", "wrapped 3", "\"client\\/x/symmetric\":{}",
                            "\"bad \\u00zz\":{}", "x\"client/x/symmetric\":{}"})
        CHECK_THROWS_AS(KeyStore::pending_from_text(bad), Error);
}

namespace {
// A manifest file around `body` with a dummy tag: parse_manifest_body does not check the MAC.
Bytes framed_manifest(const std::string& body) {
    Bytes f = keystore::detail::frame(keystore::detail::kManifestMagic, keystore::detail::kManifestFormat, body);
    f.resize(f.size() + keystore::detail::kMacSize, 0);
    return f;
}
}  // namespace

// A loaded store's manifest goes through the same scanner as a streamed one
// (detail::parse_manifest_body). What it parses must write back to the same bytes, in the text
// fast path and in the JSON fallback, and it must refuse rings out of order or twice.
TEST_CASE("a loaded manifest parses back to its own bytes, and refuses rings out of order", "[unit]") {
    namespace d = keystore::detail;
    SoftStore s;
    std::vector<KeyId> many{kAliceStorage};
    for (int i = 0; i < 1500; ++i) many.push_back({RingKind::symmetric, "client-" + std::to_string(100000 + i)});
    s.open(true)->generate(many);
    s.open(true)->generate({kAliceStorage, many[7]});  // rotated: two versions each
    auto file = kwtest::read_text(s.dir + "/manifest");
    REQUIRE(file.size() > 300 * 1024);  // more than the scanner's 256 KiB buffer
    std::string body = file.substr(d::kHeaderSize, file.size() - d::kHeaderSize - d::kMacSize);
    auto bytes = [](const std::string& t) { return Bytes(t.begin(), t.end()); };
    auto framed = framed_manifest;

    auto m = d::parse_manifest_body(bytes(file));
    CHECK(m.rings.size() == many.size());
    CHECK(d::manifest_body(m) == body);
    // The JSON fallback (not the exact written form): the same data.
    auto pretty = nlohmann::json::parse(body).dump(1);
    REQUIRE(pretty != body);
    CHECK(d::manifest_body(d::parse_manifest_body(framed(pretty))) == body);

    auto it = m.rings.begin();
    const auto& [id1, e1] = *it++;
    const auto& [id2, e2] = *it;
    std::string rest;
    for (auto r = std::next(it); r != m.rings.end(); ++r) rest += "," + d::manifest_member(r->first, r->second);
    std::string swapped = d::manifest_prefix(m) + d::manifest_member(id2, e2) + "," + d::manifest_member(id1, e1) +
                          rest + d::manifest_suffix(m);
    std::string twice = d::manifest_prefix(m) + d::manifest_member(id1, e1) + "," + d::manifest_member(id1, e1) + "," +
                        d::manifest_member(id2, e2) + rest + d::manifest_suffix(m);
    REQUIRE(swapped.size() == body.size());
    CHECK_THROWS_AS(d::parse_manifest_body(framed(swapped)), FormatError);
    CHECK_THROWS_AS(d::parse_manifest_body(framed(twice)), FormatError);

    // Every top-level field is required, as the JSON parser required them.
    for (const char* field : {"format", "generation", "store_id", "meta_sha256"}) {
        INFO(field);
        auto j = nlohmann::json::parse(body);
        j.erase(field);
        CHECK_THROWS_WITH(d::parse_manifest_body(framed(j.dump())), Catch::Contains(std::string("missing field: ") + field));
    }
    // A body that ends early although its frame and MAC are right was written so: a format error.
    std::string short_body = body.substr(0, body.size() - 1);
    CHECK_THROWS_AS(d::parse_manifest_body(framed(short_body)), FormatError);

    // A ring rotated 150,000 times has a member of more than 16 MiB, the streamed scanner's
    // limit; a loaded store, which holds the file anyway, reads it.
    auto big = m;
    auto& versions = big.rings.begin()->second.summary.versions;
    auto v = versions.front();
    versions.clear();
    for (std::uint32_t i = 1; i <= 150000; ++i) {
        v.version = i;
        v.current = i == 150000;
        versions.push_back(v);
    }
    std::string big_body = d::manifest_body(big);
    REQUIRE(d::manifest_member(big.rings.begin()->first, big.rings.begin()->second).size() > (16u << 20));
    CHECK(d::manifest_body(d::parse_manifest_body(framed(big_body))) == big_body);
}

TEST_CASE("a loaded manifest with a mistyped top-level field is a format error", "[unit]") {
    namespace d = keystore::detail;
    SoftStore s;
    s.open(true)->generate({kAliceSym});
    auto file = kwtest::read_text(s.dir + "/manifest");
    std::string body = file.substr(d::kHeaderSize, file.size() - d::kHeaderSize - d::kMacSize);
    auto j = nlohmann::json::parse(body);
    for (const char* field : {"generation", "store_id", "meta_sha256", "format"}) {
        INFO(field);
        auto bad = j;
        bad[field] = nlohmann::json::array();
        CHECK_THROWS_AS(d::parse_manifest_body(framed_manifest(bad.dump())), FormatError);
    }
}

// The writer: one commit makes what it took visible; it commits once; a part writer (a worker's)
// only seals and writes, and what it wrote is visible only once a committing writer takes it.
TEST_CASE("a writer commits once; a part writer only seals and writes", "[unit]") {
    SoftStore s;
    s.open(true)->generate({kAliceSym});
    auto ks = s.open(true);
    KeyRing bob;
    bob.id = {RingKind::hmac, "bob0001"};
    bob.versions.push_back(ks->make_version(bob.id, 1, now_seconds()));
    bob.current = 1;
    auto part = ks->part_writer(KeyStore::Writer::Mode::update);
    auto p = part->write(bob, part->seal(bob));
    CHECK_THROWS_AS(part->take(p), Error);
    CHECK_THROWS_AS(part->commit(), Error);
    part.reset();  // a part writer removes nothing: its file waits for the committing writer
    CHECK(fs::exists(s.path(bob.id) + ".pending"));
    CHECK_FALSE(ks->contains(bob.id));
    auto w = ks->writer(KeyStore::Writer::Mode::update);
    w->take(p);
    CHECK_FALSE(ks->contains(bob.id));  // not before the commit
    w->commit();
    CHECK(ks->contains(bob.id));
    CHECK_THROWS_AS(w->commit(), Error);
    CHECK_THROWS_AS(w->take(p), Error);
    w.reset();
    ks.reset();  // its exclusive lock
    auto again = s.open();
    CHECK(again->contains(bob.id));
    CHECK(again->verify().ok());
    CHECK_FALSE(fs::exists(s.path(bob.id) + ".pending"));
    // A read-only store has no writer.
    CHECK_THROWS_AS(again->writer(KeyStore::Writer::Mode::update), Error);
}
