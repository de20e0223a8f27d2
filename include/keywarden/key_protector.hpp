// SPDX-License-Identifier: Apache-2.0
// How store keys are protected at rest: one small interface with several implementations.
// The key store and the backups use only this interface; they never call C_WrapKey themselves.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "keywarden/secure_buffer.hpp"

namespace keywarden {

// The true type of a key, recorded in authenticated metadata: SoftHSM does not check key types
// on unwrap, so the type must never be inferred from a blob.
enum class KeyKind : std::uint8_t {
    aes = 1,             // AES-256 data keys
    generic_secret = 2,  // HMAC keys (CKK_GENERIC_SECRET, used with CKM_SHA256_HMAC)
    ec_p256_private = 3, // EC P-256 private keys
};
const char* key_kind_name(KeyKind k);

struct KeySpec {
    KeyKind kind;
    // The true length of the key value in bytes (32 for every kind keywarden makes today). The
    // length a token reports may include padding (SoftHSM's CKM_AES_KEY_WRAP_PAD).
    std::uint32_t length;
};

// What an unprotected key may be used for.
enum class Exposure {
    // Stays inside the token: CKA_SENSITIVE=true. Still CKA_EXTRACTABLE so that it can be wrapped
    // again under another key (backups) without ever reaching host memory.
    sensitive,
    // CKA_SENSITIVE=false, so value() can read it: only for `keywarden read`.
    readable,
};

// A key that exists for one operation: a token session object or, for unit tests, bytes in a
// wiping buffer. Destroying it destroys the session object.
class TransientKey {
public:
    virtual ~TransientKey() = default;
    virtual const KeySpec& spec() const = 0;
    // The key bytes: raw value for secret keys, the 32-byte private scalar for EC keys.
    // Throws unless the key was made readable.
    virtual SecureBytes value() const = 0;
};

class KeyProtector {
public:
    virtual ~KeyProtector() = default;
    // A stable name for the method, recorded in formats (e.g. "aes-key-wrap-pad").
    virtual std::string method() const = 0;
    // Wraps the key under this protector's key. The plaintext never reaches host memory when
    // both are token objects.
    virtual std::vector<std::uint8_t> protect(const TransientKey& key) = 0;
    // Unwraps a blob made by protect(). A blob that was changed or made under another key
    // throws IntegrityError.
    virtual std::unique_ptr<TransientKey> unprotect(std::span<const std::uint8_t> blob,
                                                    const KeySpec& spec, Exposure exposure) = 0;
};

// ---- software implementation, for unit tests ----------------------------------------------

class SoftwareKey : public TransientKey {
public:
    SoftwareKey(KeySpec spec, SecureBytes value) : m_spec(spec), m_value(std::move(value)) {}
    // Random bytes from OpenSSL's RAND_priv_bytes.
    static std::unique_ptr<SoftwareKey> generate(KeySpec spec);
    const KeySpec& spec() const override { return m_spec; }
    SecureBytes value() const override { return m_value; }

private:
    KeySpec m_spec;
    SecureBytes m_value;
};

// AES-256 key wrap with padding (RFC 5649, OpenSSL's EVP_aes_256_wrap_pad) under a key held in
// host memory. Only for tests and for tooling that has no token; it protects SoftwareKeys only.
class SoftwareKeyProtector : public KeyProtector {
public:
    explicit SoftwareKeyProtector(SecureBytes kek);  // 32 bytes
    std::string method() const override { return "software-aes-256-wrap-pad"; }
    std::vector<std::uint8_t> protect(const TransientKey& key) override;
    std::unique_ptr<TransientKey> unprotect(std::span<const std::uint8_t> blob,
                                            const KeySpec& spec, Exposure exposure) override;

private:
    SecureBytes m_kek;
};

// RFC 5649 with OpenSSL (EVP_aes_{128,192,256}_wrap_pad by KEK length). Empty result on unwrap
// failure.
std::vector<std::uint8_t> aes_wrap_pad(std::span<const std::uint8_t> kek,
                                       std::span<const std::uint8_t> key);
SecureBytes aes_unwrap_pad(std::span<const std::uint8_t> kek, std::span<const std::uint8_t> blob);

}  // namespace keywarden
