// SPDX-License-Identifier: Apache-2.0
#include <unistd.h>

#include <filesystem>

#include <catch2/catch.hpp>

#include "keywarden/token_check.hpp"
#include "keywarden/token_context.hpp"
#include "keywarden/token_protector.hpp"
#include "pipeline/pipeline.hpp"
#include "support.hpp"

using namespace keywarden;
using namespace keywarden::pkcs11;
using keywarden::pipeline::run_in_processes;
using keywarden::pipeline::SharedWork;

namespace {

SecureBytes bytes(const std::string& s) { return SecureBytes(s.begin(), s.end()); }

std::size_t count_in(const std::vector<std::string>& trace, const std::string& line) {
    std::size_t n = 0;
    for (const auto& l : trace) n += l == line;
    return n;
}

// All objects visible to the session (session and token objects).
std::size_t object_count(Session& s) {
    Template all;
    return s.find(all, 10000).size();
}

// A non-extractable AES-256 wrapping key, as a master key would be (but a session object).
SessionObject make_kek(Session& s, std::span<const std::uint8_t> value = {}) {
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_AES);
    t.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true).add_bool(CKA_SENSITIVE, true);
    t.add_bool(CKA_EXTRACTABLE, false).add_bool(CKA_WRAP, true).add_bool(CKA_UNWRAP, true);
    if (value.empty()) {
        t.add_ulong(CKA_VALUE_LEN, 32);
        return s.generate_key(CKM_AES_KEY_GEN, t);
    }
    t.add_bytes(CKA_VALUE, value);
    return s.create_object(t);
}

// A key with a known value, readable, so round trips can be compared byte for byte.
std::unique_ptr<TokenKey> known_key(const std::shared_ptr<Session>& s, KeyKind kind,
                                    const SecureBytes& value) {
    Template t;
    fill_key_template(t, kind, Exposure::readable);
    t.add_bytes(CKA_VALUE, value);
    return std::make_unique<TokenKey>(KeySpec{kind, 32}, s->create_object(t));
}

// A token context on the test token, logged in with the user PIN (kept, as open_token keeps it).
TokenContext logged_in(kwtest::SoftHsm& hsm) {
    TokenContext ctx;
    ctx.module = hsm.module();
    ctx.token = hsm.token();
    ctx.session = Session::open(ctx.module, ctx.token.slot, true);
    std::string_view pin = kwtest::SoftHsm::user_pin;
    ctx.pin = std::make_shared<SecureBytes>(pin.begin(), pin.end());
    ctx.session->login(*ctx.pin);
    return ctx;
}

}  // namespace

TEST_CASE("login: right PIN works, wrong PIN is tried exactly once", "[token]") {
    kwtest::SoftHsm hsm;
    auto tok = hsm.token();
    {
        auto s = Session::open(hsm.module(), tok.slot);
        clear_call_trace();
        try {
            s->login(bytes("wrong-pin"));
            FAIL("logged in with a wrong PIN");
        } catch (const Pkcs11Error& e) {
            CHECK(e.rv() == CKR_PIN_INCORRECT);
            CHECK_THAT(e.what(), Catch::StartsWith("C_Login: CKR_PIN_INCORRECT (0xA0)"));
            CHECK(e.exit_code() == ExitCode::token);
        }
        CHECK(count_in(call_trace(), "C_Login -> CKR_PIN_INCORRECT") == 1);
        CHECK(count_in(call_trace(), "C_Login -> CKR_OK") == 0);
        s->login(bytes(kwtest::SoftHsm::user_pin));
        // A second login on the same token counts as success (CKR_USER_ALREADY_LOGGED_IN).
        auto s2 = Session::open(hsm.module(), tok.slot);
        CHECK_NOTHROW(s2->login(bytes(kwtest::SoftHsm::user_pin)));
    }
    // SoftHSM has no PIN counter flags to set: the refusals are tested in test_select.cpp.
}

TEST_CASE("module loading: by path, by p11-kit name, init args, failures", "[token]") {
    kwtest::SoftHsm hsm;
    hsm.unload();
    SECTION("by p11-kit registered name") {
        auto m = Module::load("softhsm2");
        CHECK(m->path().find("libsofthsm2.so") != std::string::npos);
        CHECK(select_token(list_tokens(*m), "kw-test").label == "kw-test");
    }
    SECTION("init args reach the module as pReserved") {
        // SoftHSM insists on pReserved == NULL, so a string proves it was passed through.
        try {
            Module::load(kwtest::module_path(), std::string("x-test=1"));
            FAIL("SoftHSM accepted pReserved");
        } catch (const Error& e) {
            CHECK_THAT(e.what(), Catch::StartsWith("C_Initialize: CKR_ARGUMENTS_BAD"));
            CHECK_THAT(e.hint(), Catch::Contains("refused the string given with --module-init-args"));
        }
    }
    SECTION("failures") {
        CHECK_THROWS_WITH(Module::load("/nonexistent/libnothing.so"),
                          Catch::Contains("cannot load PKCS#11 module"));
        CHECK_THROWS_WITH(Module::load("no-such-module-name"),
                          Catch::Contains("no PKCS#11 module is registered"));
        CHECK_THROWS_AS(Module::load(""), UsageError);
    }
}

TEST_CASE("AES key wrap protector on SoftHSM", "[token]") {
    kwtest::SoftHsm hsm;
    auto s = hsm.session();
    auto mech = AesWrapProtector::choose_mechanism(*s);
    REQUIRE(mech);
    // SoftHSM 2.6.1 has no CKM_AES_KEY_WRAP_KWP, so WRAP_PAD comes next.
    CHECK(*mech == CKM_AES_KEY_WRAP_PAD);
    auto kek = make_kek(*s);
    AesWrapProtector p(s, kek.handle(), *mech);
    CHECK(p.method() == "aes-key-wrap-pad");
    const std::size_t baseline = object_count(*s);

    SECTION("known values survive protect/unprotect for every kind") {
        SecureBytes v(32);
        for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<std::uint8_t>(i * 7 + 1);
        for (KeyKind kind : {KeyKind::aes, KeyKind::generic_secret}) {
            INFO(key_kind_name(kind));
            auto k = known_key(s, kind, v);
            auto blob = p.protect(*k);
            CHECK(blob.size() == 40);
            auto back = p.unprotect(blob, {kind, 32}, Exposure::readable);
            CHECK(back->value() == v);
        }
    }
    SECTION("generated keys of every kind wrap and unwrap without leaving objects") {
        for (KeyKind kind : {KeyKind::aes, KeyKind::generic_secret, KeyKind::ec_p256_private}) {
            INFO(key_kind_name(kind));
            std::vector<std::uint8_t> pub;
            auto k = generate_session_key(s, kind, &pub);
            if (kind == KeyKind::ec_p256_private) {
                REQUIRE(pub.size() == 65);  // the bare uncompressed point
                CHECK(pub[0] == 0x04);
            }
            auto blob = p.protect(*k);
            auto sensitive = p.unprotect(blob, {kind, 32}, Exposure::sensitive);
            CHECK_THROWS_AS(sensitive->value(), Pkcs11Error);  // sensitive stays in the token
            // Re-wrapping the unwrapped object gives a blob that unwraps to the same key.
            auto readable1 = p.unprotect(blob, {kind, 32}, Exposure::readable);
            auto readable2 = p.unprotect(p.protect(*sensitive), {kind, 32}, Exposure::readable);
            CHECK(readable1->value() == readable2->value());
            CHECK(readable1->value().size() == 32);
        }
        CHECK(object_count(*s) == baseline);
    }
    SECTION("tampered, truncated or foreign blobs are integrity errors and leave no object") {
        auto k = generate_session_key(s, KeyKind::aes);
        auto blob = p.protect(*k);
        k.reset();
        for (std::size_t i = 0; i < blob.size(); ++i) {
            auto bad = blob;
            bad[i] ^= 0x80;
            INFO("flipped byte " << i);
            CHECK_THROWS_AS(p.unprotect(bad, {KeyKind::aes, 32}, Exposure::sensitive),
                            IntegrityError);
        }
        std::vector<std::uint8_t> cut(blob.begin(), blob.begin() + 24);
        CHECK_THROWS_AS(p.unprotect(cut, {KeyKind::aes, 32}, Exposure::sensitive), IntegrityError);
        auto other = make_kek(*s);
        AesWrapProtector q(s, other.handle(), *mech);
        CHECK_THROWS_AS(q.unprotect(blob, {KeyKind::aes, 32}, Exposure::sensitive),
                        IntegrityError);
        other.reset();
        CHECK(object_count(*s) == baseline);
    }
    SECTION("software keys are refused by the token protector") {
        auto sk = SoftwareKey::generate({KeyKind::aes, 32});
        CHECK_THROWS_WITH(p.protect(*sk), Catch::Contains("only wrap keys held in the token"));
    }
}

TEST_CASE("SoftHSM's CKM_AES_KEY_WRAP_PAD is RFC 5649 for 32-byte keys", "[token]") {
    // The backup format relies on this: `openssl enc -id-aes256-wrap-pad` must undo it.
    kwtest::SoftHsm hsm;
    auto s = hsm.session();
    SecureBytes kek_value(32, 0x42), key_value(32);
    for (std::size_t i = 0; i < 32; ++i) key_value[i] = static_cast<std::uint8_t>(255 - i);
    auto kek = make_kek(*s, kek_value);
    AesWrapProtector p(s, kek.handle(), CKM_AES_KEY_WRAP_PAD);
    auto key = known_key(s, KeyKind::generic_secret, key_value);
    CHECK(p.protect(*key) == aes_wrap_pad(kek_value, key_value));
    // And a blob made by OpenSSL unwraps in the token.
    auto back = p.unprotect(aes_wrap_pad(kek_value, key_value), {KeyKind::generic_secret, 32},
                            Exposure::readable);
    CHECK(back->value() == key_value);
}

TEST_CASE("wrap_key: one C_WrapKey call for usual keys, two above 4 KiB", "[token]") {
    // SoftHSM does the whole wrap to answer a size query, so wrap_key skips it while the blob
    // fits its first buffer; a larger blob must still come back whole and correct.
    kwtest::SoftHsm hsm;
    auto s = hsm.session();
    SecureBytes kek_value(32, 0x5a);
    auto kek = make_kek(*s, kek_value);
    struct Row { std::size_t size; std::size_t wrap_calls; };
    // Multiples of 8 only: SoftHSM pads other lengths its own way (PKCS11-NOTES.md), and the
    // blob is compared with OpenSSL's RFC 5649. 4088 bytes give a 4096-byte blob, the first
    // buffer exactly; 4096 bytes give 4104.
    for (Row r : {Row{32, 1}, Row{4088, 1}, Row{4096, 2}, Row{6000, 2}}) {
        INFO(r.size);
        SecureBytes value(r.size);
        for (std::size_t i = 0; i < value.size(); ++i) value[i] = static_cast<std::uint8_t>(i * 7 + 1);
        auto key = known_key(s, KeyKind::generic_secret, value);
        CK_MECHANISM m{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
        clear_call_trace();
        auto blob = s->wrap_key(&m, kek.handle(), key->object().handle());
        auto trace = call_trace();
        CHECK(blob == aes_wrap_pad(kek_value, value));
        // Above 4 KiB: CKR_BUFFER_TOO_SMALL with the length SoftHSM needs, then the real call,
        // with no size query in between.
        CHECK(count_in(trace, "C_WrapKey -> CKR_OK") == 1u);
        CHECK(count_in(trace, "C_WrapKey -> CKR_BUFFER_TOO_SMALL") == (r.wrap_calls == 1 ? 0u : 1u));
        CHECK(count_in(trace, "C_WrapKey -> CKR_OK") + count_in(trace, "C_WrapKey -> CKR_BUFFER_TOO_SMALL") == r.wrap_calls);
    }
}

TEST_CASE("wrap_key with a token that misreports C_WrapKey's output length", "[token]") {
    // tests/wrap_shim.cpp forwards to SoftHSM and falsifies the lengths its C_WrapKey reports.
    const char* shim = KW_WRAP_SHIM_PATH;  // where meson built it
    kwtest::SoftHsm hsm;
    struct ShimEnv {
        ShimEnv() {
            ::setenv("KW_SHIM_TARGET", kwtest::module_path().c_str(), 1);
            ::unsetenv("KW_SHIM_WRAP");
        }
        ~ShimEnv() {
            ::unsetenv("KW_SHIM_TARGET");
            ::unsetenv("KW_SHIM_WRAP");
        }
    } shim_env;
    std::shared_ptr<Session> s;
    {
        auto m = Module::load(shim);
        auto tok = select_token(list_tokens(*m), "label:kw-test");
        s = Session::open(m, tok.slot, true);
        std::string pin = kwtest::SoftHsm::user_pin;
        s->login(SecureBytes(pin.begin(), pin.end()));
    }
    SecureBytes kek_value(32, 0x3c);
    auto kek = make_kek(*s, kek_value);
    struct Row {
        const char* mode;
        std::size_t size;
        std::size_t ok_calls, too_small_calls;  // when it works
        const char* error;                      // or the error's words
    };
    const Row rows[] = {
        // A token that gives no length, one too small to be true, or one no wrapped key has,
        // gets a size query.
        {"no-length", 6000, 2, 1, nullptr},
        {"understated", 6000, 2, 1, nullptr},
        {"huge-once", 6000, 2, 1, nullptr},
        // A length a little short: the room to spare takes it.
        {"short-by-8", 6000, 1, 1, nullptr},
        // Lengths no wrapped key has, after the size query too; a size query that contradicts
        // the first answer; more bytes written than the buffer held.
        {"huge", 6000, 0, 0, "asked for 2097152 bytes for one wrapped key"},
        {"query-zero", 6000, 0, 0, "answered a size query with 0 bytes after saying 4096 were too few"},
        {"query-4096", 6000, 0, 0, "answered a size query with 4096 bytes after saying 4096 were too few"},
        {"short-by-100", 6000, 0, 0, "asked for 5908 bytes, then found 5972 too few"},
        {"overrun", 32, 0, 0, "reported 4097 bytes written into a buffer of 4096"},
        {"overrun", 6000, 0, 0, "bytes written into a buffer of"},
        {"", 6000, 1, 1, nullptr},  // the shim itself changes nothing
    };
    for (const Row& r : rows) {
        INFO(r.mode << ", " << r.size << " bytes");
        SecureBytes value(r.size);
        for (std::size_t i = 0; i < value.size(); ++i) value[i] = static_cast<std::uint8_t>(i * 11 + 3);
        auto key = known_key(s, KeyKind::generic_secret, value);
        CK_MECHANISM m{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
        ::setenv("KW_SHIM_WRAP", r.mode, 1);
        clear_call_trace();
        if (r.error) {
            try {
                s->wrap_key(&m, kek.handle(), key->object().handle());
                FAIL("wrap_key accepted the misreported length");
            } catch (const TokenError& e) {
                CHECK_THAT(e.what(), Catch::Contains(r.error));
                CHECK_THAT(e.hint(), Catch::Contains("misreports C_WrapKey's output length"));
            }
        } else {
            auto blob = s->wrap_key(&m, kek.handle(), key->object().handle());
            auto trace = call_trace();
            CHECK(blob == aes_wrap_pad(kek_value, value));
            CHECK(count_in(trace, "C_WrapKey -> CKR_OK") == r.ok_calls);
            CHECK(count_in(trace, "C_WrapKey -> CKR_BUFFER_TOO_SMALL") == r.too_small_calls);
        }
    }
}

TEST_CASE("token check on the default SoftHSM profile", "[token]") {
    kwtest::SoftHsm hsm;
    auto s = hsm.session();
    const std::size_t before = object_count(*s);
    auto r = check_token(s);
    std::map<std::string, bool> works;
    for (const auto& m : r.methods) works[m.name] = m.works;
    CHECK(works.at("aes-key-wrap"));
    CHECK(works.at("aes-key-wrap-pad"));
    CHECK_FALSE(works.at("aes-key-wrap-kwp"));
    CHECK(works.at("aes-gcm"));
    CHECK(works.at("hmac-sha256"));
    CHECK(works.at("rsa-oaep"));
    CHECK(works.at("ecdh"));
    CHECK(r.chosen == "aes-key-wrap-pad");
    CHECK(r.chosen_implemented);
    CHECK(object_count(*s) == before);  // every trial object was destroyed
}

TEST_CASE("token check on the no-AES (smartcard-like) profile", "[token]") {
    kwtest::SoftHsm hsm("softhsm2-noaes.conf.in");
    auto s = hsm.session();
    auto r = check_token(s);
    for (const auto& m : r.methods) {
        INFO(m.name << ": " << m.detail);
        if (m.name.starts_with("aes-") || m.name == "hmac-sha256") {
            CHECK_FALSE(m.works);
            CHECK_FALSE(m.listed);
        } else {
            CHECK(m.works);
        }
    }
    CHECK_FALSE(AesWrapProtector::choose_mechanism(*s));
    CHECK(r.chosen == "rsa-oaep-envelope");
    CHECK_FALSE(r.chosen_implemented);
}

TEST_CASE("token HMAC: streamed parts give the same MAC as one call", "[token]") {
    kwtest::SoftHsm hsm;
    auto s = hsm.session();
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
    t.add_ulong(CKA_VALUE_LEN, 32).add_bool(CKA_TOKEN, false).add_bool(CKA_SIGN, true);
    t.add_bool(CKA_VERIFY, true);
    auto key = s->generate_key(CKM_GENERIC_SECRET_KEY_GEN, t);
    TokenMacKey mac(s, key.handle());
    for (std::size_t size : {100u, 70'000u, 3'000'000u}) {  // one call below 64 KiB, streamed above
        INFO(size);
        std::vector<std::uint8_t> a(size), b(size / 3 + 1);
        for (std::size_t i = 0; i < a.size(); ++i) a[i] = static_cast<std::uint8_t>(i * 31);
        std::vector<std::uint8_t> whole(a);
        whole.insert(whole.end(), b.begin(), b.end());
        auto tag = mac.mac_parts({a, b});
        CHECK(tag == mac.mac(whole));
        CHECK(mac.verify_parts({a, b}, tag));
        tag[5] ^= 1;
        CHECK_FALSE(mac.verify_parts({a, b}, tag));
    }
}

TEST_CASE("EC private keys whose scalar starts with zero bytes read back at full length", "[token]") {
    // Tokens return CKA_VALUE of an EC key as an integer without leading zeros; about one
    // P-256 key in 256 has a 31-byte value. Found by an intermittent round-trip failure.
    kwtest::SoftHsm hsm;
    auto s = hsm.session();
    SecureBytes scalar(32, 0);
    for (std::size_t i = 2; i < 32; ++i) scalar[i] = static_cast<std::uint8_t>(i);  // two zero bytes
    auto point = p256_public_from_private(scalar);
    Template t;
    fill_key_template(t, KeyKind::ec_p256_private, Exposure::readable);
    const std::uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    t.add_bytes(CKA_EC_PARAMS, p256);
    SecureBytes value(scalar.begin() + 2, scalar.end());  // as a token would store it
    t.add_bytes(CKA_VALUE, value);
    TokenKey key({KeyKind::ec_p256_private, 32}, s->create_object(t));
    CHECK(key.value() == scalar);
    TokenKeyBackend backend(s);
    auto kcv = backend.check_value(key, point);  // the ECDSA proof works with it too
    CHECK(kcv.size() == 8);
}

// restart_token: C_Finalize and C_Initialize, a new session, a new login. SoftHSM hands out the
// same handle numbers again, so a session or session object from before must never act on what
// now has its handle.
TEST_CASE("after a token restart old sessions are dead and never touch new objects", "[token]") {
    kwtest::SoftHsm hsm;
    TokenContext ctx = logged_in(hsm);
    auto old_session = ctx.session;
    auto old_key = make_kek(*old_session);
    CK_OBJECT_HANDLE old_handle = old_key.handle();

    keywarden::pkcs11::restart_token(ctx);
    CHECK_FALSE(old_session->live());
    CHECK(ctx.session->live());
    CHECK(ctx.session != old_session);
    CHECK_THROWS_AS(old_session->handle(), keywarden::Error);
    // The new session is logged in: it can make private objects.
    std::vector<SessionObject> fresh;
    for (int i = 0; i < 8; ++i) fresh.push_back(make_kek(*ctx.session));
    bool reused = false;
    for (const auto& k : fresh) reused |= k.handle() == old_handle;
    INFO("old handle " << old_handle);
    CHECK(reused);  // SoftHSM numbers handles afresh: the hazard this guards against is real
    std::size_t before = object_count(*ctx.session);
    old_key.reset();      // must not destroy the new object that has the old number
    old_session.reset();  // must not close the new session
    CHECK(object_count(*ctx.session) == before);
    for (const auto& k : fresh) CHECK(ctx.session->get_ulong(k.handle(), CKA_KEY_TYPE) == CKK_AES);
}

TEST_CASE("worker processes: every worker is waited for, and a worker's error wins", "[token]") {
    kwtest::SoftHsm hsm;
    TokenContext ctx = logged_in(hsm);
    const std::string dir = hsm.dir();
    auto marker = [&](std::size_t k) { return dir + "/done-" + std::to_string(k); };

    // Each worker has its own live session; the parent's is untouched.
    run_in_processes(ctx, 3, [&](std::size_t k, TokenContext& c) {
        if (!c.session->live() || c.session == ctx.session) throw Error("no session of its own");
        if (k == 0) ::usleep(200000);  // the first worker ends last
        kwtest::write_file(marker(k), "x");
    });
    for (std::size_t k = 0; k < 3; ++k) CHECK(kwtest::read_text(marker(k)) == "x");
    CHECK(ctx.session->live());

    // A worker fails: its error (message and exit code) is thrown, after every worker has ended,
    // and it wins over what meanwhile() throws.
    try {
        run_in_processes(
            ctx, 3,
            [&](std::size_t k, TokenContext&) {
                if (k == 1) throw IntegrityError("worker one failed", "its hint");
                if (k == 2) ::usleep(200000);
                kwtest::write_file(marker(10 + k), "x");
            },
            [&](const std::function<bool()>& running) {
                while (running()) ::usleep(1000);
                throw Error("must not win");
            });
        FAIL("no error");
    } catch (const Error& e) {
        CHECK_THAT(e.what(), Catch::Contains("worker one failed"));
        CHECK(e.hint() == "its hint");
        CHECK(e.exit_code() == ExitCode::integrity);
    }
    CHECK(kwtest::read_text(marker(12)) == "x");  // the slow worker was waited for
}

TEST_CASE("worker processes: shared chunks are each done once, in order, and meanwhile sees them", "[token]") {
    kwtest::SoftHsm hsm;
    TokenContext ctx = logged_in(hsm);
    const std::string dir = hsm.dir();

    // Chunks shrink as the work runs out and cover the items exactly.
    for (std::size_t items : {0, 1, 2, 7, 100, 20000}) {
        for (std::size_t jobs : {1, 2, 3}) {
            INFO(items << " items, " << jobs << " jobs");
            SharedWork w(items, jobs);
            std::size_t at = 0, last_size = SIZE_MAX;
            while (auto c = w.claim()) {
                CHECK(c->first == at);
                CHECK(c->last > c->first);
                CHECK(c->last - c->first <= last_size);
                last_size = c->last - c->first;
                at = c->last;
            }
            CHECK(at == items);
            CHECK_FALSE(w.claim());
            if (items >= 100) CHECK(w.chunks() >= 8 * jobs);  // enough chunks to balance
        }
    }

    // Three workers: one slow. Each chunk is recorded by the worker that claimed it, each worker
    // claims in increasing order, and the slow one takes fewer; meanwhile() in the parent sees
    // every chunk as it is recorded.
    const std::size_t items = 300;
    SharedWork w(items, 3);
    std::vector<std::size_t> seen;
    run_in_processes(
        ctx, 3,
        [&](std::size_t k, TokenContext&) {
            std::string log;
            std::size_t prev = 0;
            bool any = false;
            while (auto c = w.claim()) {
                if (any && c->index <= prev) throw Error("claims out of order");
                prev = c->index;
                any = true;
                ::usleep(k == 0 ? 50000 : 1000);
                log += std::to_string(c->first) + "-" + std::to_string(c->last) + "\n";
                w.record(c->index, k, c->first, c->last - c->first);
            }
            kwtest::write_file(dir + "/chunks-" + std::to_string(k), log);
        },
        [&](const std::function<bool()>& running) {
            for (std::size_t i = 0; i < w.chunks(); ++i) {
                while (!w.recorded(i)) {
                    if (!running() && !w.recorded(i)) return;
                    ::usleep(500);
                }
                seen.push_back(i);
            }
        });
    REQUIRE(seen.size() == w.chunks());
    std::vector<std::size_t> by_worker(3, 0);
    std::size_t covered = 0;
    for (std::size_t i = 0; i < w.chunks(); ++i) {
        auto o = w.output(i);
        CHECK(o.offset == covered);  // recorded first item = the chunk's own first item
        covered += o.length;
        by_worker.at(o.child) += o.length;
    }
    CHECK(covered == items);
    // The slow worker did less than the other two did on average (they may start at different
    // times, so not each of them).
    CHECK(2 * by_worker[0] < by_worker[1] + by_worker[2]);

    // A worker that fails leaves chunks unrecorded: meanwhile() sees the workers end and
    // returns; the worker's error is thrown, and output() of a missing chunk throws.
    SharedWork broken(50, 2);
    bool gave_up = false;
    CHECK_THROWS_WITH(run_in_processes(
                          ctx, 2,
                          [&](std::size_t k, TokenContext&) {
                              // Worker 0 records its first chunk only once worker 1 has
                              // claimed one (and failed), so a chunk is surely left unrecorded.
                              // Worker 1 fails under StopOnError, so worker 0 claims nothing
                              // after its first chunk, if it got one (it waits 0.5 s more for
                              // the stop).
                              SharedWork::StopOnError stop_on_error(broken);
                              bool first = true;
                              while (auto c = broken.claim()) {
                                  if (k == 1) {
                                      kwtest::write_file(dir + "/claimed-1", "x");
                                      throw ConflictError("worker one failed");
                                  }
                                  for (int i = 0; first && i < 2000 && !std::filesystem::exists(dir + "/claimed-1"); ++i)
                                      ::usleep(5000);
                                  if (first) ::usleep(500000);
                                  first = false;
                                  broken.record(c->index, k, 0, 0);
                              }
                          },
                          [&](const std::function<bool()>& running) {
                              for (std::size_t i = 0; i < broken.chunks(); ++i)
                                  while (!broken.recorded(i)) {
                                      if (!running() && !broken.recorded(i)) {
                                          gave_up = true;
                                          return;
                                      }
                                      ::usleep(500);
                                  }
                          }),
                      Catch::Contains("worker one failed"));
    CHECK(gave_up);
    std::size_t missing = 0;
    for (std::size_t i = 0; i < broken.chunks(); ++i) missing += !broken.recorded(i);
    CHECK(broken.chunks() > 2);
    // At most worker 0's first chunk was done (none if worker 1 claimed first and stopped it).
    CHECK(broken.chunks() - missing <= 1);
    CHECK_FALSE(broken.claim());            // stopped
    for (std::size_t i = 0; i < broken.chunks(); ++i)
        if (!broken.recorded(i)) CHECK_THROWS_WITH(broken.output(i), Catch::Contains("no worker recorded"));

    // meanwhile() throws: every worker is still waited for, then its error.
    CHECK_THROWS_WITH(run_in_processes(
                          ctx, 2,
                          [&](std::size_t k, TokenContext&) {
                              ::usleep(100000);
                              kwtest::write_file(dir + "/late-" + std::to_string(k), "x");
                          },
                          [&](const std::function<bool()>&) { throw Error("copying failed"); }),
                      Catch::Contains("copying failed"));
    CHECK(kwtest::read_text(dir + "/late-0") == "x");
    CHECK(kwtest::read_text(dir + "/late-1") == "x");
}

// The token pipeline: one job and N give the same lines in item order; a worker in a child has a
// live session of its own and says it is forked; a worker's error is thrown with its exit code.
TEST_CASE("pipeline: one job and N merge the same lines in order", "[token]") {
    kwtest::SoftHsm hsm;
    TokenContext ctx = logged_in(hsm);
    const std::size_t items = 1000;
    auto lines_with = [&](std::size_t jobs) {
        keywarden::pipeline::Plan plan;
        plan.items = items;
        plan.jobs = jobs;
        plan.work_near = hsm.dir() + "/out";
        std::vector<std::string> merged;
        keywarden::pipeline::run(
            ctx, plan,
            [&](keywarden::pipeline::Worker& w) {
                if (w.forked() != (jobs > 1)) throw Error("forked() is wrong");
                if (w.forked() && (w.token().session == ctx.session || !w.token().session->live()))
                    throw Error("a forked worker has no session of its own");
                while (auto c = w.next())
                    for (std::size_t i = c->first; i < c->last; ++i) {
                        if (i % 7 == 0) {  // token work on the worker's own session
                            std::uint8_t b[4];
                            w.token().session->random(b);
                        }
                        w.emit("item " + std::to_string(i) + (i % 2 ? " odd" : " even"));
                    }
            },
            [&](std::string_view l) { merged.emplace_back(l); });
        return merged;
    };
    auto one = lines_with(1);
    REQUIRE(one.size() == items);
    CHECK(one.front() == "item 0 even");
    CHECK(one.back() == "item 999 odd");
    CHECK(lines_with(2) == one);
    CHECK(lines_with(3) == one);
    // No work directory is left beside the output path.
    for (const auto& e : std::filesystem::directory_iterator(hsm.dir()))
        CHECK_FALSE(e.path().filename().string().starts_with(".out."));
    CHECK(ctx.session->live());

    // A worker's error reaches the caller with its exit code, with one job and with N.
    for (std::size_t jobs : {1, 3}) {
        INFO("jobs " << jobs);
        keywarden::pipeline::Plan plan;
        plan.items = items;
        plan.jobs = jobs;
        plan.work_near = hsm.dir() + "/out";
        std::size_t merged = 0;
        auto r = kwtest::call([&] {
            keywarden::pipeline::run(
                ctx, plan,
                [&](keywarden::pipeline::Worker& w) {
                    while (auto c = w.next()) {
                        if (c->last > 500) throw IntegrityError("bad item");
                        for (std::size_t i = c->first; i < c->last; ++i) w.emit("x");
                    }
                },
                [&](std::string_view) { ++merged; });
        });
        CHECK(r.code == 4);
        CHECK_THAT(r.err, Catch::Contains("bad item"));
        CHECK(merged <= 500);
    }
}
