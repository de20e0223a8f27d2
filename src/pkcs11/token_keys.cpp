// SPDX-License-Identifier: Apache-2.0
// Token-side MAC, key backend and master keys.
#include <openssl/crypto.h>

#include <array>

#include "keywarden/token_protector.hpp"

namespace keywarden::pkcs11 {

std::vector<std::uint8_t> AesWrapProtector::key_check_value() {
    SecureBytes zeros(32, 0);
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
    t.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true).add_bool(CKA_SENSITIVE, false);
    t.add_bool(CKA_EXTRACTABLE, true).add_bytes(CKA_VALUE, zeros);
    TokenKey zero_key({KeyKind::generic_secret, 32}, m_session->create_object(t));
    auto h = sha256(protect(zero_key));
    h.resize(8);
    return h;
}

// ---- MAC ------------------------------------------------------------------------------------

std::vector<std::uint8_t> TokenMacKey::mac(std::span<const std::uint8_t> data) {
    CK_MECHANISM m{m_mech, nullptr, 0};
    return m_session->sign(&m, m_key, data);
}

bool TokenMacKey::verify(std::span<const std::uint8_t> data, std::span<const std::uint8_t> tag) {
    CK_MECHANISM m{m_mech, nullptr, 0};
    return m_session->verify(&m, m_key, data, tag);
}

namespace {
template <typename F>
void for_each_piece(const MacKey::Parts& parts, F f) {
    constexpr std::size_t kPiece = 1u << 20;
    for (auto p : parts)
        for (std::size_t off = 0; off < p.size(); off += kPiece)
            f(p.subspan(off, std::min(kPiece, p.size() - off)));
}
}  // namespace

namespace {
// Below this size one C_Sign on a copy is cheaper than several calls (each token-object use
// costs SoftHSM file checks).
constexpr std::size_t kStreamAbove = 64 * 1024;
std::size_t total(const MacKey::Parts& parts) {
    std::size_t n = 0;
    for (auto p : parts) n += p.size();
    return n;
}
}  // namespace

std::vector<std::uint8_t> TokenMacKey::mac_parts(const Parts& parts) {
    if (total(parts) < kStreamAbove) return MacKey::mac_parts(parts);
    CK_MECHANISM m{m_mech, nullptr, 0};
    Session& s = *m_session;
    KW_P11_CALL(s.fn(), C_SignInit, s.handle(), &m, m_key);
    for_each_piece(parts, [&](std::span<const std::uint8_t> piece) {
        KW_P11_CALL(s.fn(), C_SignUpdate, s.handle(), const_cast<CK_BYTE*>(piece.data()),
                    static_cast<CK_ULONG>(piece.size()));
    });
    std::vector<std::uint8_t> out(64);
    CK_ULONG n = out.size();
    KW_P11_CALL(s.fn(), C_SignFinal, s.handle(), out.data(), &n);
    out.resize(n);
    return out;
}

bool TokenMacKey::verify_parts(const Parts& parts, std::span<const std::uint8_t> tag) {
    if (total(parts) < kStreamAbove) return MacKey::verify_parts(parts, tag);
    CK_MECHANISM m{m_mech, nullptr, 0};
    Session& s = *m_session;
    KW_P11_CALL(s.fn(), C_VerifyInit, s.handle(), &m, m_key);
    for_each_piece(parts, [&](std::span<const std::uint8_t> piece) {
        KW_P11_CALL(s.fn(), C_VerifyUpdate, s.handle(), const_cast<CK_BYTE*>(piece.data()),
                    static_cast<CK_ULONG>(piece.size()));
    });
    CK_RV rv = KW_P11_TRY(s.fn(), C_VerifyFinal, s.handle(), const_cast<CK_BYTE*>(tag.data()),
                          static_cast<CK_ULONG>(tag.size()));
    if (rv == CKR_OK) return true;
    if (rv == CKR_SIGNATURE_INVALID || rv == CKR_SIGNATURE_LEN_RANGE) return false;
    throw Pkcs11Error("C_VerifyFinal", rv);
}

std::unique_ptr<MacKey::Stream> TokenMacKey::stream() {
    struct Signing : Stream {
        std::shared_ptr<Session> s;
        bool done = false;
        ~Signing() override {
            if (done || !s->live()) return;
            // A C_SignFinal with a buffer ends the operation, whatever it returns.
            std::uint8_t out[64];
            CK_ULONG n = sizeof out;
            KW_P11_TRY(s->fn(), C_SignFinal, s->handle(), out, &n);
        }
        void update(std::span<const std::uint8_t> piece) override {
            for_each_piece({piece}, [&](std::span<const std::uint8_t> p) {
                KW_P11_CALL(s->fn(), C_SignUpdate, s->handle(), const_cast<CK_BYTE*>(p.data()),
                            static_cast<CK_ULONG>(p.size()));
            });
        }
        std::vector<std::uint8_t> final() override {
            done = true;
            std::vector<std::uint8_t> out(64);
            CK_ULONG n = out.size();
            KW_P11_CALL(s->fn(), C_SignFinal, s->handle(), out.data(), &n);
            out.resize(n);
            return out;
        }
    };
    CK_MECHANISM m{m_mech, nullptr, 0};
    KW_P11_CALL(m_session->fn(), C_SignInit, m_session->handle(), &m, m_key);
    auto st = std::make_unique<Signing>();
    st->s = m_session;
    return st;
}

std::vector<std::uint8_t> TokenMacKey::key_check_value() {
    std::vector<std::uint8_t> zeros(32, 0);
    auto h = mac(zeros);
    h.resize(8);
    return h;
}

// ---- backend --------------------------------------------------------------------------------

std::unique_ptr<TransientKey> TokenKeyBackend::generate(KeyKind kind,
                                                        std::vector<std::uint8_t>* public_point) {
    return generate_session_key(m_session, kind, public_point);
}

std::vector<std::uint8_t> TokenKeyBackend::check_value(const TransientKey& key,
                                                       std::span<const std::uint8_t> public_point) {
    const auto* tk = dynamic_cast<const TokenKey*>(&key);
    if (!tk) throw Error("the token key backend can only check keys held in the token");
    Session& s = tk->object().session();
    CK_OBJECT_HANDLE h = tk->object().handle();
    std::vector<std::uint8_t> out;
    switch (key.spec().kind) {
        case KeyKind::aes: {
            std::array<std::uint8_t, 16> zeros{};
            CK_MECHANISM m{CKM_AES_ECB, nullptr, 0};
            out = s.encrypt(&m, h, zeros);
            break;
        }
        case KeyKind::generic_secret: {
            std::array<std::uint8_t, 32> zeros{};
            CK_MECHANISM m{CKM_SHA256_HMAC, nullptr, 0};
            out = s.sign(&m, h, zeros);
            break;
        }
        case KeyKind::ec_p256_private: {
            // Proves the private key in the token belongs to the recorded public point.
            static const std::uint8_t kMsg[] = "keywarden key check";
            auto digest = sha256(kMsg);
            CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
            auto rs = s.sign(&m, h, digest);
            if (!p256_verify_digest(public_point, digest, rs))
                throw IntegrityError("the private key does not match its recorded public key");
            out = sha256(public_point);
            break;
        }
    }
    if (out.size() < 8) throw Error("key check value too short");
    out.resize(8);
    return out;
}

// ---- master keys ----------------------------------------------------------------------------

MasterKeyInfo generate_master_key(Session& s, MasterRole role, const std::string& label,
                                  std::span<const std::uint8_t> id) {
    MasterKeyInfo info;
    info.label = label;
    info.id.assign(id.begin(), id.end());
    if (info.id.empty()) {
        info.id.resize(16);
        s.random(info.id);
    }
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY);
    t.add_bool(CKA_TOKEN, true).add_bool(CKA_PRIVATE, true).add_bool(CKA_SENSITIVE, true);
    t.add_bool(CKA_EXTRACTABLE, false).add_bool(CKA_MODIFIABLE, false);
    t.add_string(CKA_LABEL, label).add_bytes(CKA_ID, info.id);
    t.add_ulong(CKA_VALUE_LEN, 32);
    CK_MECHANISM_TYPE gen;
    if (role == MasterRole::encryption || role == MasterRole::single) {
        t.add_ulong(CKA_KEY_TYPE, CKK_AES);
        t.add_bool(CKA_WRAP, true).add_bool(CKA_UNWRAP, true);
        t.add_bool(CKA_ENCRYPT, false).add_bool(CKA_DECRYPT, false);
        bool sign = role == MasterRole::single;
        t.add_bool(CKA_SIGN, sign).add_bool(CKA_VERIFY, sign);
        gen = CKM_AES_KEY_GEN;
    } else {
        t.add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
        t.add_bool(CKA_SIGN, true).add_bool(CKA_VERIFY, true);
        t.add_bool(CKA_WRAP, false).add_bool(CKA_UNWRAP, false);
        gen = CKM_GENERIC_SECRET_KEY_GEN;
    }
    SessionObject obj = s.generate_key(gen, t);
    info.handle = obj.release();  // a token object: it must outlive this process
    return info;
}

MasterKeyInfo describe_master_key(Session& s, CK_OBJECT_HANDLE h, MasterRole role) {
    MasterKeyInfo info;
    info.handle = h;
    auto label = s.get_bytes(h, CKA_LABEL);
    info.label.assign(label.begin(), label.end());
    info.id = s.get_bytes(h, CKA_ID);
    info.extractable = s.get_bool(h, CKA_EXTRACTABLE).value_or(true);
    info.sensitive = s.get_bool(h, CKA_SENSITIVE).value_or(false);
    auto cls = s.get_ulong(h, CKA_CLASS);
    auto type = s.get_ulong(h, CKA_KEY_TYPE);
    bool ok = cls && *cls == CKO_SECRET_KEY && type &&
              (role != MasterRole::signature ? *type == CKK_AES
                                              : (*type == CKK_GENERIC_SECRET ||
                                                 *type == CKK_SHA256_HMAC));
    if (!ok)
        throw TokenError("key '" + info.label + "' is not " +
                             (role != MasterRole::signature ? "an AES secret key"
                                                             : "a generic-secret HMAC key"),
                         "name a key of the right type");
    return info;
}

std::optional<MasterKeyInfo> find_master_key(Session& s, const std::string& label,
                                             std::span<const std::uint8_t> id) {
    Template t;
    t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_string(CKA_LABEL, label).add_bytes(CKA_ID, id);
    auto found = s.find(t, 4);
    if (found.empty()) return std::nullopt;
    if (found.size() > 1)
        throw TokenError("several keys on the token have label '" + label + "' and the same id",
                         "remove the duplicates with the token's own tool");
    MasterKeyInfo info;
    info.handle = found.front();
    info.label = label;
    info.id.assign(id.begin(), id.end());
    return info;
}

MasterKeyInfo find_key_by_uri(Session& s, const std::string& uri_text) {
    Uri uri = Uri::parse(uri_text);
    auto attrs = uri.object_attributes();
    if (attrs.empty())
        throw UsageError("the URI names no object: " + uri_text,
                         "add object=LABEL or id=%XX... (RFC 7512), e.g. "
                         "pkcs11:token=T;object=master-enc;type=secret-key");
    auto found = s.find(attrs.data(), static_cast<CK_ULONG>(attrs.size()), 4);
    if (found.empty())
        throw TokenError("no key on the token matches " + uri_text,
                         "check the object label and id with 'pkcs11-tool --list-objects'");
    if (found.size() > 1)
        throw TokenError("several objects match " + uri_text, "add id=... to the URI");
    MasterKeyInfo info;
    info.handle = found.front();
    return info;
}

void destroy_object(Session& s, CK_OBJECT_HANDLE h) noexcept {
    if (!s.live()) return;  // after a module restart the handle may be another object's
    try_call("C_DestroyObject", s.fn()->C_DestroyObject, s.handle(), h);
}

}  // namespace keywarden::pkcs11
