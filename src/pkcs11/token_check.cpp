// SPDX-License-Identifier: Apache-2.0
#include "keywarden/token_check.hpp"

#include <openssl/crypto.h>

#include <array>
#include <functional>

#include "keywarden/token_protector.hpp"

namespace keywarden::pkcs11 {

namespace {

// A throwaway secret key whose value can be read back to compare.
SessionObject make_secret(Session& s, CK_MECHANISM_TYPE gen, CK_KEY_TYPE type, CK_ULONG len,
                          bool wrapper) {
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, type);
    t.add_ulong(CKA_VALUE_LEN, len).add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
    t.add_bool(CKA_SENSITIVE, false).add_bool(CKA_EXTRACTABLE, true);
    if (wrapper) t.add_bool(CKA_WRAP, true).add_bool(CKA_UNWRAP, true);
    if (type == CKK_AES) t.add_bool(CKA_ENCRYPT, true).add_bool(CKA_DECRYPT, true);
    if (type == CKK_GENERIC_SECRET) t.add_bool(CKA_SIGN, true).add_bool(CKA_VERIFY, true);
    return s.generate_key(gen, t);
}

bool same_value(Session& s, CK_OBJECT_HANDLE a, CK_OBJECT_HANDLE b, std::size_t len) {
    SecureBytes va = s.get_secret(a, CKA_VALUE), vb = s.get_secret(b, CKA_VALUE);
    if (va.size() < len || vb.size() < len) return false;
    return CRYPTO_memcmp(va.data(), vb.data(), len) == 0;
}

// Wraps a fresh key of `target_len` bytes with `mech`, unwraps it, and compares the values.
void try_aes_wrap(Session& s, CK_MECHANISM_TYPE mech, CK_ULONG target_len) {
    auto kek = make_secret(s, CKM_AES_KEY_GEN, CKK_AES, 32, true);
    auto key = make_secret(s, CKM_GENERIC_SECRET_KEY_GEN, CKK_GENERIC_SECRET, target_len, false);
    CK_MECHANISM m{mech, nullptr, 0};
    auto blob = s.wrap_key(&m, kek.handle(), key.handle());
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
    t.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
    t.add_bool(CKA_SENSITIVE, false).add_bool(CKA_EXTRACTABLE, true);
    auto back = s.unwrap_key(&m, kek.handle(), blob, t);
    if (!same_value(s, key.handle(), back.handle(), target_len))
        throw Error("the unwrapped key differs from the original");
}

void try_gcm(Session& s) {
    auto key = make_secret(s, CKM_AES_KEY_GEN, CKK_AES, 32, false);
    std::array<std::uint8_t, 12> iv{};
    s.random(iv);
    std::array<std::uint8_t, 32> plain{};
    s.random(plain);
    // The 48-byte CK_GCM_PARAMS with ulIvBits; SoftHSM ignores ulIvBits but others need it.
    CK_GCM_PARAMS p{iv.data(), iv.size(), iv.size() * 8, nullptr, 0, 128};
    CK_MECHANISM m{CKM_AES_GCM, &p, sizeof p};
    auto ct = s.encrypt(&m, key.handle(), plain);
    auto back = s.decrypt(&m, key.handle(), ct);
    if (back.size() != plain.size() || CRYPTO_memcmp(back.data(), plain.data(), plain.size()) != 0)
        throw Error("decryption did not give the plaintext back");
}

void try_hmac(Session& s) {
    auto key = make_secret(s, CKM_GENERIC_SECRET_KEY_GEN, CKK_GENERIC_SECRET, 32, false);
    CK_MECHANISM m{CKM_SHA256_HMAC, nullptr, 0};
    const std::uint8_t msg[] = "keywarden token check";
    auto mac = s.sign(&m, key.handle(), msg);
    if (mac.size() != 32 || !s.verify(&m, key.handle(), msg, mac))
        throw Error("the MAC did not verify");
    mac[0] ^= 1;
    if (s.verify(&m, key.handle(), msg, mac)) throw Error("a changed MAC verified");
}

void try_rsa_oaep(Session& s) {
    Template pub, priv;
    pub.add_ulong(CKA_CLASS, CKO_PUBLIC_KEY).add_ulong(CKA_KEY_TYPE, CKK_RSA);
    pub.add_ulong(CKA_MODULUS_BITS, 2048).add_bool(CKA_TOKEN, false).add_bool(CKA_WRAP, true);
    pub.add_bool(CKA_ENCRYPT, true);
    const std::uint8_t e[] = {0x01, 0x00, 0x01};
    pub.add_bytes(CKA_PUBLIC_EXPONENT, e);
    priv.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY).add_ulong(CKA_KEY_TYPE, CKK_RSA);
    priv.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true).add_bool(CKA_SENSITIVE, true);
    priv.add_bool(CKA_UNWRAP, true).add_bool(CKA_DECRYPT, true);
    auto [hpub, hpriv] = s.generate_key_pair(CKM_RSA_PKCS_KEY_PAIR_GEN, pub, priv);
    auto key = make_secret(s, CKM_GENERIC_SECRET_KEY_GEN, CKK_GENERIC_SECRET, 32, false);
    // SoftHSM 2.6.1 accepts only SHA-1/MGF1-SHA1 and no label (see the notes).
    CK_RSA_PKCS_OAEP_PARAMS p{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 0};
    CK_MECHANISM m{CKM_RSA_PKCS_OAEP, &p, sizeof p};
    auto blob = s.wrap_key(&m, hpub.handle(), key.handle());
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
    t.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
    t.add_bool(CKA_SENSITIVE, false).add_bool(CKA_EXTRACTABLE, true);
    auto back = s.unwrap_key(&m, hpriv.handle(), blob, t);
    if (!same_value(s, key.handle(), back.handle(), 32))
        throw Error("the unwrapped key differs from the original");
}

void try_ecdh(Session& s) {
    const std::uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    auto make_pair = [&] {
        Template pub, priv;
        pub.add_ulong(CKA_CLASS, CKO_PUBLIC_KEY).add_ulong(CKA_KEY_TYPE, CKK_EC);
        pub.add_bytes(CKA_EC_PARAMS, p256).add_bool(CKA_TOKEN, false);
        priv.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY).add_ulong(CKA_KEY_TYPE, CKK_EC);
        priv.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
        priv.add_bool(CKA_SENSITIVE, true).add_bool(CKA_DERIVE, true);
        return s.generate_key_pair(CKM_EC_KEY_PAIR_GEN, pub, priv);
    };
    auto a = make_pair();
    auto b = make_pair();
    auto derive = [&](const SessionObject& priv, const SessionObject& peer_pub) {
        // CKA_EC_POINT is a DER OCTET STRING; CKM_ECDH1_DERIVE wants the raw point.
        auto point = s.get_bytes(peer_pub.handle(), CKA_EC_POINT);
        if (point.size() == 67 && point[0] == 0x04 && point[1] == 65)
            point.erase(point.begin(), point.begin() + 2);
        CK_ECDH1_DERIVE_PARAMS p{CKD_NULL, 0, nullptr, static_cast<CK_ULONG>(point.size()),
                                 point.data()};
        CK_MECHANISM m{CKM_ECDH1_DERIVE, &p, sizeof p};
        Template t;
        t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
        t.add_ulong(CKA_VALUE_LEN, 32).add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
        t.add_bool(CKA_SENSITIVE, false).add_bool(CKA_EXTRACTABLE, true);
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        KW_P11_CALL(s.fn(), C_DeriveKey, s.handle(), &m, priv.handle(), t.data(), t.size(), &h);
        return SessionObject(s.shared_from_this(), h);
    };
    auto k1 = derive(a.second, b.first);
    auto k2 = derive(b.second, a.first);
    if (!same_value(s, k1.handle(), k2.handle(), 32))
        throw Error("the two sides derived different secrets");
}

}  // namespace

TokenCheckReport check_token(const std::shared_ptr<Session>& sp) {
    Session& s = *sp;
    struct Probe {
        const char* name;
        CK_MECHANISM_TYPE mech;
        std::function<void()> run;
    };
    const Probe probes[] = {
        {"aes-key-wrap", CKM_AES_KEY_WRAP, [&] { try_aes_wrap(s, CKM_AES_KEY_WRAP, 32); }},
        // 20 bytes is not a multiple of 8: it shows whether padding really works.
        {"aes-key-wrap-pad", CKM_AES_KEY_WRAP_PAD,
         [&] { try_aes_wrap(s, CKM_AES_KEY_WRAP_PAD, 20); }},
        {"aes-key-wrap-kwp", CKM_AES_KEY_WRAP_KWP,
         [&] { try_aes_wrap(s, CKM_AES_KEY_WRAP_KWP, 20); }},
        {"aes-gcm", CKM_AES_GCM, [&] { try_gcm(s); }},
        {"hmac-sha256", CKM_SHA256_HMAC, [&] { try_hmac(s); }},
        {"rsa-oaep", CKM_RSA_PKCS_OAEP, [&] { try_rsa_oaep(s); }},
        {"ecdh", CKM_ECDH1_DERIVE, [&] { try_ecdh(s); }},
    };
    TokenCheckReport r;
    for (const auto& p : probes) {
        MethodCheck c;
        c.name = p.name;
        c.mechanism = mechanism_name(p.mech);
        c.listed = s.has_mechanism(p.mech);
        if (!c.listed) {
            c.detail = "not in the token's mechanism list";
        } else {
            try {
                p.run();
                c.works = true;
            } catch (const std::exception& e) {
                c.detail = e.what();
            }
        }
        r.methods.push_back(std::move(c));
    }
    auto works = [&](const char* n) {
        for (const auto& c : r.methods)
            if (c.name == n) return c.works;
        return false;
    };
    // The same order as AesWrapProtector::choose_mechanism, then the methods for tokens without
    // AES key wrap (later issues).
    if (works("aes-key-wrap-kwp") || works("aes-key-wrap-pad")) {
        r.chosen = works("aes-key-wrap-kwp") ? "aes-key-wrap-kwp" : "aes-key-wrap-pad";
        r.chosen_implemented = true;
        r.chosen_reason = "AES key wrap with padding wraps every key kind, private keys included";
    } else if (works("aes-key-wrap")) {
        r.chosen = "aes-key-wrap";
        r.chosen_implemented = true;
        r.chosen_reason = "RFC 3394 key wrap; wraps secret keys whose length is a multiple of 8";
    } else if (works("aes-gcm")) {
        r.chosen = "aes-gcm-encrypt";
        r.chosen_reason = "no AES key wrap; keys would be encrypted under a token AES key";
    } else if (works("rsa-oaep")) {
        r.chosen = "rsa-oaep-envelope";
        r.chosen_reason = "no AES in the token; keys would be enveloped under a token RSA key";
    } else if (works("ecdh")) {
        r.chosen = "ecdh-envelope";
        r.chosen_reason = "no AES or RSA-OAEP; keys would be enveloped under a token EC key";
    } else {
        r.chosen_reason = "no method keywarden knows works on this token";
    }
    return r;
}

}  // namespace keywarden::pkcs11
