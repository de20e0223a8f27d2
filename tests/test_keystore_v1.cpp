// SPDX-License-Identifier: Apache-2.0
// Key store v1 on the software key protector, with a storage that fails on demand: interrupted
// rotations, destroy after one, and the staging rule that a write never changes a hard link.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <filesystem>

#include "keywarden/error.hpp"
#include "keywarden/keystore_v1.hpp"
#include "support.hpp"

using namespace keywarden;
using namespace keywarden::keystore;
namespace fs = std::filesystem;

namespace {

// The file storage, except that the write whose name matches `fail_on` throws (a full disk
// at that moment).
class FailingStorage : public Storage {
public:
    explicit FailingStorage(std::unique_ptr<Storage> inner) : m_inner(std::move(inner)) {}
    std::string fail_on;  // a name suffix; empty: never fail

    std::string describe() const override { return m_inner->describe(); }
    bool exists() const override { return m_inner->exists(); }
    std::optional<Bytes> read(const std::string& n) const override { return m_inner->read(n); }
    void write(const std::string& n, const Bytes& d, bool excl) override {
        check(n);
        m_inner->write(n, d, excl);
    }
    void write_unsynced(const std::string& n, const Bytes& d) override {
        check(n);
        m_inner->write_unsynced(n, d);
    }
    void sync() override { m_inner->sync(); }
    void rename(const std::string& a, const std::string& b) override { m_inner->rename(a, b); }
    void remove(const std::string& n) override { m_inner->remove(n); }
    std::vector<std::string> list(const std::string& p) const override { return m_inner->list(p); }
    std::unique_ptr<StorageLock> lock(bool e) override { return m_inner->lock(e); }
    std::unique_ptr<StorageLock> lock_file(const std::string& n) override { return m_inner->lock_file(n); }
    void create() override { m_inner->create(); }
    void check_permissions() const override { m_inner->check_permissions(); }

private:
    void check(const std::string& n) const {
        if (!fail_on.empty() && n.ends_with(fail_on))
            throw Error("cannot write " + n + ": No space left on device (simulated)");
    }
    std::unique_ptr<Storage> m_inner;
};

struct SoftV1 {
    std::string root = kwtest::make_temp_dir("kw-v1");
    std::string dir = root + "/ks";
    SecureBytes master = SecureBytes(32, 0x3c);
    FailingStorage* storage = nullptr;  // owned by the store

    MasterKeys keys() const {
        MasterKeys k;
        k.protector = std::make_unique<SoftwareKeyProtector>(master);
        k.mac = std::make_unique<SoftwareMacKey>(master);
        k.backend = std::make_unique<SoftwareKeyBackend>();
        return k;
    }
    SoftV1() {
        auto st = open_file_storage(dir);
        auto k = keys();
        StoreMeta meta;
        meta.token_serial = "soft";
        meta.encryption.label = "master";
        KeyStoreV1::init(*st, k, meta);
    }
    ~SoftV1() {
        std::error_code ec;
        fs::remove_all(root, ec);
    }
    std::unique_ptr<KeyStoreV1> open(bool writable = true) {
        auto fs = std::make_unique<FailingStorage>(open_file_storage(dir));
        storage = fs.get();
        return KeyStoreV1::open(std::move(fs), keys(), writable);
    }
    // Every file under the store that still holds a wrapped key for this key id.
    int files_with_key(const std::string& file) const {
        int n = 0;
        for (const auto& e : fs::recursive_directory_iterator(dir)) {
            if (!e.is_regular_file()) continue;
            std::string rel = fs::relative(e.path(), dir).string();
            if (!rel.starts_with(file) || rel.ends_with(".pub")) continue;
            std::string text = kwtest::read_text(e.path().string());
            if (text.find("\"wrapped\":null") == std::string::npos) ++n;
        }
        return n;
    }
};

const KeyId kSym = {RingKind::symmetric, "alice01"};

}  // namespace

TEST_CASE("v1: a rotation whose key file write fails leaves the store as it was", "[unit]") {
    SoftV1 s;
    auto ks = s.open();
    ks->generate({kSym});
    SecureBytes v1 = ks->read_secret(kSym, 1u);
    // The key file write fails after the rotated copy was written: that copy (and the .old
    // directory made for it) is removed again.
    auto before = kwtest::tree_digest(s.dir);
    s.storage->fail_on = "alice01_storage_sym";
    CHECK_THROWS_AS(ks->generate({kSym}), Error);
    CHECK(kwtest::tree_digest(s.dir) == before);
    CHECK(ks->load(kSym).versions.size() == 1);
    CHECK(ks->read_secret(kSym) == v1);
    CHECK(ks->verify().ok());
    // A batch is made in the token first: a failure on the second key's file leaves the first
    // key's rotation done and the second untouched (v1 has no manifest to commit a batch).
    s.storage->fail_on = "bob0001_hmac";
    const KeyId bob = {RingKind::hmac, "bob0001"};
    CHECK_THROWS_AS(ks->generate({kSym, bob}), Error);
    CHECK(ks->load(kSym).versions.size() == 2);
    CHECK_FALSE(ks->contains(bob));
    CHECK(ks->verify().ok());
}

TEST_CASE("v1: destroy removes a second copy that an interrupted rotation left", "[unit]") {
    SoftV1 s;
    auto ks = s.open();
    ks->generate({kSym});
    SecureBytes v1 = ks->read_secret(kSym, 1u);
    // Make the crash state: the rotated copy written, the key file not replaced. The first
    // rotation is run with the key file write failing, and its copy is then restored from a
    // snapshot taken by a second store directory where the same rotation succeeded halfway.
    fs::path snap = s.root + "/snap";
    fs::copy(s.dir, snap, fs::copy_options::recursive);
    ks->generate({kSym});  // the copy of v1 under .old, v2 in the key file
    std::string old_name;
    for (const auto& e : fs::directory_iterator(s.dir + "/alice01_storage_sym.old")) old_name = e.path().filename();
    REQUIRE(!old_name.empty());
    // Back to the state before the key file was replaced: the old key file, plus the copy.
    fs::copy_file(snap / "alice01_storage_sym", s.dir + "/alice01_storage_sym", fs::copy_options::overwrite_existing);
    ks.reset();
    ks = s.open();
    // v1 is found twice: the key file wins, the copy is reported.
    auto r = ks->load(kSym);
    REQUIRE(r.versions.size() == 1);
    CHECK(ks->read_secret(kSym) == v1);
    auto rep = ks->verify();
    REQUIRE(rep.problems.size() == 1);
    CHECK_THAT(rep.problems.front().problem, Catch::Contains("interrupted rotation"));
    CHECK(s.files_with_key("alice01_storage_sym") == 2);

    SECTION("destroy tombstones the key file and removes the copy") {
        ks->destroy(kSym, 1u);
        CHECK(s.files_with_key("alice01_storage_sym") == 0);
        CHECK(!fs::exists(s.dir + "/alice01_storage_sym.old/" + old_name));
        CHECK(ks->verify().ok());
    }
    SECTION("the next rotation finishes it: no third copy, no duplicate") {
        ks->generate({kSym});
        auto after = ks->load(kSym);
        REQUIRE(after.versions.size() == 2);
        CHECK(ks->read_secret(kSym, 1u) == v1);
        int copies = 0;
        for (const auto& e : fs::directory_iterator(s.dir + "/alice01_storage_sym.old")) copies += e.is_regular_file();
        CHECK(copies == 1);
        CHECK(ks->verify().ok());
    }
}

TEST_CASE("storage: write_unsynced replaces a hard-linked file without changing the other link", "[unit]") {
    std::string root = kwtest::make_temp_dir("kw-link");
    auto st = open_file_storage(root + "/s");
    st->create();
    st->write("a", {1, 2, 3});
    REQUIRE(::link((root + "/s/a").c_str(), (root + "/live").c_str()) == 0);
    st->write_unsynced("a", {9, 9});
    CHECK(kwtest::read_text(root + "/live") == std::string("\x01\x02\x03", 3));
    CHECK(kwtest::read_text(root + "/s/a") == std::string("\x09\x09", 2));
    std::error_code ec;
    fs::remove_all(root, ec);
}
