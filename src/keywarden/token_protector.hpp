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
// half is returned in *public_point as the 65-byte uncompressed point (the DER OCTET STRING
// around CKA_EC_POINT removed).
std::unique_ptr<TokenKey> generate_session_key(const std::shared_ptr<Session>& s, KeyKind kind,
                                               std::vector<std::uint8_t>* public_point = nullptr);

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
    // Wraps an all-zero 32-byte session key (C_CreateObject, C_WrapKey, C_DestroyObject).
    std::vector<std::uint8_t> key_check_value() override;

private:
    std::shared_ptr<Session> m_session;
    CK_OBJECT_HANDLE m_kek;
    CK_MECHANISM_TYPE m_mech;
};

// HMAC-SHA256 in the token (CKM_SHA256_HMAC, C_Sign / C_Verify); or, for the one master key of
// a v1 store, AES-CMAC (CKM_AES_CMAC, 16-byte tags).
class TokenMacKey : public MacKey {
public:
    TokenMacKey(std::shared_ptr<Session> s, CK_OBJECT_HANDLE key, CK_MECHANISM_TYPE mech = CKM_SHA256_HMAC)
        : m_session(std::move(s)), m_key(key), m_mech(mech) {}
    std::vector<std::uint8_t> mac(std::span<const std::uint8_t> data) override;
    bool verify(std::span<const std::uint8_t> data, std::span<const std::uint8_t> tag) override;
    std::vector<std::uint8_t> key_check_value() override;
    // C_SignInit / C_SignUpdate per part (in 1 MiB pieces) / C_SignFinal; likewise C_Verify*.
    std::vector<std::uint8_t> mac_parts(const Parts& parts) override;
    bool verify_parts(const Parts& parts, std::span<const std::uint8_t> tag) override;
    // C_SignInit now, C_SignUpdate per piece, C_SignFinal. Abandoned, it ends the operation.
    std::unique_ptr<Stream> stream() override;

private:
    std::shared_ptr<Session> m_session;
    CK_OBJECT_HANDLE m_key;
    CK_MECHANISM_TYPE m_mech;
};

// Keys generated and checked in the token: nothing is exposed to host memory.
class TokenKeyBackend : public KeyBackend {
public:
    explicit TokenKeyBackend(std::shared_ptr<Session> s) : m_session(std::move(s)) {}
    std::unique_ptr<TransientKey> generate(KeyKind kind,
                                           std::vector<std::uint8_t>* public_point) override;
    // aes: C_Encrypt(CKM_AES_ECB); generic: C_Sign(CKM_SHA256_HMAC); EC: C_Sign(CKM_ECDSA)
    // checked with OpenSSL against the public point.
    std::vector<std::uint8_t> check_value(const TransientKey& key,
                                          std::span<const std::uint8_t> public_point) override;

private:
    std::shared_ptr<Session> m_session;
};

// ---- master keys: persistent, non-extractable token objects -------------------------------

// single: the one master key of a v1 store, AES-256 with CKA_WRAP/CKA_UNWRAP for the keys and
// CKA_SIGN/CKA_VERIFY for AES-CMAC over each key file's metadata; never encrypt or decrypt.
enum class MasterRole { encryption, signature, single };

struct MasterKeyInfo {
    CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
    std::string label;
    std::vector<std::uint8_t> id;  // CKA_ID
    bool extractable = false;
    bool sensitive = true;
};

// C_GenerateKey with CKA_TOKEN=true, CKA_PRIVATE, CKA_SENSITIVE, CKA_EXTRACTABLE=false and
// CKA_ID `id` (a random 16 bytes when empty). Encryption: AES-256 with CKA_WRAP/CKA_UNWRAP only (no encrypt or
// decrypt, so a wrapped key can never be decrypted out). Signature: a 32-byte generic secret
// with CKA_SIGN/CKA_VERIFY only.
MasterKeyInfo generate_master_key(Session& s, MasterRole role, const std::string& label,
                                  std::span<const std::uint8_t> id = {});

// Finds exactly one secret key by CKA_LABEL and CKA_ID. nullopt if there is none; a
// TokenError if there are several.
std::optional<MasterKeyInfo> find_master_key(Session& s, const std::string& label,
                                             std::span<const std::uint8_t> id);
// Finds exactly one secret key named by a pkcs11: URI (object=, id=, type=secret-key).
MasterKeyInfo find_key_by_uri(Session& s, const std::string& uri);
// Reads label, id, CKA_EXTRACTABLE, CKA_SENSITIVE, and checks the key type fits the role.
MasterKeyInfo describe_master_key(Session& s, CK_OBJECT_HANDLE h, MasterRole role);
// Deletes a persistent object (used to undo a failed init).
void destroy_object(Session& s, CK_OBJECT_HANDLE h) noexcept;

}  // namespace keywarden::pkcs11
