// SPDX-License-Identifier: Apache-2.0
#include <array>

#include "keywarden/token_protector.hpp"

namespace keywarden::pkcs11 {

namespace {
// DER OID of prime256v1, as CKA_EC_PARAMS.
constexpr std::array<std::uint8_t, 10> kP256Params = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                                      0xce, 0x3d, 0x03, 0x01, 0x07};
}  // namespace

SecureBytes TokenKey::value() const {
    SecureBytes v = m_obj.session().get_secret(m_obj.handle(), CKA_VALUE);
    if (m_spec.kind == KeyKind::ec_p256_private && v.size() < m_spec.length) {
        // CKA_VALUE of an EC key is a big-endian integer, and tokens drop its leading zero
        // bytes (about one P-256 key in 256): pad it back to the curve's length.
        SecureBytes padded(m_spec.length - v.size(), 0);
        padded.insert(padded.end(), v.begin(), v.end());
        return padded;
    }
    if (v.size() < m_spec.length)
        throw IntegrityError("the token returned a " + std::to_string(v.size()) +
                             "-byte key where the metadata records " +
                             std::to_string(m_spec.length));
    if (m_spec.kind == KeyKind::ec_p256_private && v.size() > m_spec.length) {
        // CKA_VALUE of an EC key is a big-endian integer: drop leading zeros, never real bytes.
        std::size_t extra = v.size() - m_spec.length;
        for (std::size_t i = 0; i < extra; ++i)
            if (v[i] != 0) throw IntegrityError("EC private value longer than its curve");
        return SecureBytes(v.begin() + static_cast<std::ptrdiff_t>(extra), v.end());
    }
    // Secret keys unwrapped with SoftHSM's WRAP_PAD may carry zero padding: cut to true length.
    v.resize(m_spec.length);
    return v;
}

void fill_key_template(Template& t, KeyKind kind, Exposure exposure) {
    bool sensitive = exposure == Exposure::sensitive;
    switch (kind) {
        case KeyKind::aes:
            t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_AES);
            t.add_bool(CKA_ENCRYPT, true).add_bool(CKA_DECRYPT, true);
            break;
        case KeyKind::generic_secret:
            t.add_ulong(CKA_CLASS, CKO_SECRET_KEY).add_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
            t.add_bool(CKA_SIGN, true).add_bool(CKA_VERIFY, true);
            break;
        case KeyKind::ec_p256_private:
            t.add_ulong(CKA_CLASS, CKO_PRIVATE_KEY).add_ulong(CKA_KEY_TYPE, CKK_EC);
            t.add_bool(CKA_SIGN, true).add_bool(CKA_DERIVE, true);
            break;
    }
    t.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
    t.add_bool(CKA_SENSITIVE, sensitive).add_bool(CKA_EXTRACTABLE, true);
}

std::unique_ptr<TokenKey> generate_session_key(const std::shared_ptr<Session>& s, KeyKind kind,
                                               std::vector<std::uint8_t>* public_point) {
    if (kind == KeyKind::ec_p256_private) {
        Template pub, priv;
        pub.add_ulong(CKA_CLASS, CKO_PUBLIC_KEY).add_ulong(CKA_KEY_TYPE, CKK_EC);
        pub.add_bytes(CKA_EC_PARAMS, kP256Params).add_bool(CKA_TOKEN, false);
        pub.add_bool(CKA_VERIFY, true);
        priv.add_bool(CKA_TOKEN, false).add_bool(CKA_PRIVATE, true);
        priv.add_bool(CKA_SENSITIVE, true).add_bool(CKA_EXTRACTABLE, true);
        priv.add_bool(CKA_SIGN, true).add_bool(CKA_DERIVE, true);
        auto [hpub, hpriv] = s->generate_key_pair(CKM_EC_KEY_PAIR_GEN, pub, priv);
        if (public_point) {
            // CKA_EC_POINT is DER: OCTET STRING (0x04, length 65) around the point. Some older
            // tokens return the bare point; accept both.
            auto p = s->get_bytes(hpub.handle(), CKA_EC_POINT);
            if (p.size() == 67 && p[0] == 0x04 && p[1] == 65) p.erase(p.begin(), p.begin() + 2);
            if (p.size() != 65 || p[0] != 0x04)
                throw Error("the token returned an unexpected EC point encoding");
            *public_point = std::move(p);
        }
        return std::make_unique<TokenKey>(KeySpec{kind, 32}, std::move(hpriv));
    }
    Template t;
    fill_key_template(t, kind, Exposure::sensitive);
    t.add_ulong(CKA_VALUE_LEN, 32);
    CK_MECHANISM_TYPE mech =
        kind == KeyKind::aes ? CKM_AES_KEY_GEN : CKM_GENERIC_SECRET_KEY_GEN;
    return std::make_unique<TokenKey>(KeySpec{kind, 32}, s->generate_key(mech, t));
}

AesWrapProtector::AesWrapProtector(std::shared_ptr<Session> s, CK_OBJECT_HANDLE kek,
                                   CK_MECHANISM_TYPE mech)
    : m_session(std::move(s)), m_kek(kek), m_mech(mech) {}

std::optional<CK_MECHANISM_TYPE> AesWrapProtector::choose_mechanism(Session& s) {
    for (CK_MECHANISM_TYPE m : {CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD, CKM_AES_KEY_WRAP})
        if (s.has_mechanism(m)) return m;
    return std::nullopt;
}

std::string AesWrapProtector::method_name(CK_MECHANISM_TYPE mech) {
    switch (mech) {
        case CKM_AES_KEY_WRAP_KWP: return "aes-key-wrap-kwp";
        case CKM_AES_KEY_WRAP_PAD: return "aes-key-wrap-pad";
        case CKM_AES_KEY_WRAP: return "aes-key-wrap";
        default: return "aes-wrap-" + mechanism_name(mech);
    }
}

std::vector<std::uint8_t> AesWrapProtector::protect(const TransientKey& key) {
    const auto* tk = dynamic_cast<const TokenKey*>(&key);
    if (!tk) throw Error("the token key protector can only wrap keys held in the token");
    if (tk->object().session().module() != m_session->module() ||
        tk->object().session().slot() != m_session->slot())
        throw Error("the key to wrap lives on another token than the wrapping key");
    CK_MECHANISM mech{m_mech, nullptr, 0};
    return m_session->wrap_key(&mech, m_kek, tk->object().handle());
}

std::unique_ptr<TransientKey> AesWrapProtector::unprotect(std::span<const std::uint8_t> blob,
                                                          const KeySpec& spec, Exposure exposure) {
    Template t;
    fill_key_template(t, spec.kind, exposure);
    CK_MECHANISM mech{m_mech, nullptr, 0};
    try {
        return std::make_unique<TokenKey>(spec, m_session->unwrap_key(&mech, m_kek, blob, t));
    } catch (const Pkcs11Error& e) {
        switch (e.rv()) {
            // Tokens disagree on how to say "this blob does not unwrap": SoftHSM answers
            // CKR_GENERAL_ERROR for a corrupted blob. Map them all by context.
            case CKR_GENERAL_ERROR:
            case CKR_FUNCTION_FAILED:
            case CKR_WRAPPED_KEY_INVALID:
            case CKR_WRAPPED_KEY_LEN_RANGE:
            case CKR_ENCRYPTED_DATA_INVALID:
            case CKR_ENCRYPTED_DATA_LEN_RANGE:
            case CKR_DATA_LEN_RANGE:
                throw IntegrityError(std::string("unwrap failed: ") + e.what(),
                                     "the wrapped key was changed, or was wrapped under "
                                     "another master key");
            default: throw;
        }
    }
}

}  // namespace keywarden::pkcs11
