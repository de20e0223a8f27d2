// SPDX-License-Identifier: Apache-2.0
// Key protection with a token AES key (AES key wrap), and the token-side TransientKey.
#pragma once

#include "keywarden/key_protector.hpp"
#include "keywarden/pkcs11.hpp"

namespace keywarden::pkcs11 {

// A key living in the token as a session object, destroyed with this object.
class TokenKey : public TransientKey {
public:
    TokenKey(KeySpec spec, SessionObject obj) : m_spec(spec), m_obj(std::move(obj)) {}
    const KeySpec& spec() const override { return m_spec; }
    // C_GetAttributeValue(CKA_VALUE), cut to the true length. Needs CKA_SENSITIVE=false.
    SecureBytes value() const override;
    const SessionObject& object() const { return m_obj; }

private:
    KeySpec m_spec;
    SessionObject m_obj;
};

// The unwrap template for a key kind: CKA_CLASS and CKA_KEY_TYPE (which C_UnwrapKey needs), a
// session object (CKA_TOKEN=false), CKA_PRIVATE, and CKA_SENSITIVE set explicitly because
// SoftHSM defaults unwrapped keys to SENSITIVE=false.
void fill_key_template(Template& t, KeyKind kind, Exposure exposure);

// Generates a key of the given kind in the token as a session object (C_GenerateKey or
// C_GenerateKeyPair), sensitive and extractable so it can be wrapped. For EC keys the public
// half is returned in *public_der as the token gives CKA_EC_POINT (a DER OCTET STRING holding
// the uncompressed point).
std::unique_ptr<TokenKey> generate_session_key(const std::shared_ptr<Session>& s, KeyKind kind,
                                               std::vector<std::uint8_t>* public_der = nullptr);

// Wraps with a token AES key using CKM_AES_KEY_WRAP_KWP, CKM_AES_KEY_WRAP_PAD or
// CKM_AES_KEY_WRAP (RFC 3394, key lengths that are multiples of 8 only).
class AesWrapProtector : public KeyProtector {
public:
    AesWrapProtector(std::shared_ptr<Session> s, CK_OBJECT_HANDLE kek, CK_MECHANISM_TYPE mech);

    // The first wrap mechanism the token lists, in this order: KWP (the one RFC 5649 name all
    // tokens agree on), WRAP_PAD (RFC 5649 on SoftHSM, but RFC 3394 over PKCS#7 on some
    // tokens: the exact mechanism is recorded), plain WRAP. nullopt if none is listed.
    static std::optional<CK_MECHANISM_TYPE> choose_mechanism(Session& s);
    static std::string method_name(CK_MECHANISM_TYPE mech);

    std::string method() const override { return method_name(m_mech); }
    CK_MECHANISM_TYPE mechanism() const { return m_mech; }
    // C_WrapKey. The key must be a TokenKey in this protector's session.
    std::vector<std::uint8_t> protect(const TransientKey& key) override;
    // C_UnwrapKey into a session object. CKR_GENERAL_ERROR (SoftHSM's answer to a corrupted
    // blob), CKR_WRAPPED_KEY_INVALID and friends become IntegrityError.
    std::unique_ptr<TransientKey> unprotect(std::span<const std::uint8_t> blob, const KeySpec& spec,
                                            Exposure exposure) override;

private:
    std::shared_ptr<Session> m_session;
    CK_OBJECT_HANDLE m_kek;
    CK_MECHANISM_TYPE m_mech;
};

}  // namespace keywarden::pkcs11
