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
    // Identifies the protecting key without revealing it: the first 8 bytes of
    // SHA-256(protect(a 32-byte all-zero generic secret)). Key wrap is deterministic, so the
    // value is stable; it needs only the wrap permission, never encrypt or decrypt.
    virtual std::vector<std::uint8_t> key_check_value() = 0;
};

// HMAC-SHA256 under a key that may never leave the token (the master signature key).
class MacKey {
public:
    virtual ~MacKey() = default;
    virtual std::vector<std::uint8_t> mac(std::span<const std::uint8_t> data) = 0;
    // Constant-time where computed on the host; in the token it is C_Verify.
    virtual bool verify(std::span<const std::uint8_t> data, std::span<const std::uint8_t> tag) = 0;
    // First 8 bytes of HMAC-SHA256(key, 32 zero bytes).
    virtual std::vector<std::uint8_t> key_check_value() = 0;

    // The MAC of the concatenation of parts, without building it: a large input (the manifest
    // of a big store) is then never copied. The defaults concatenate; the token streams.
    using Parts = std::vector<std::span<const std::uint8_t>>;
    virtual std::vector<std::uint8_t> mac_parts(const Parts& parts);
    virtual bool verify_parts(const Parts& parts, std::span<const std::uint8_t> tag);

    // A MAC over pieces given one at a time, for input read from disk in pieces. The caller
    // compares the tag in constant time. The default collects the pieces; the token streams.
    class Stream {
    public:
        virtual ~Stream() = default;
        virtual void update(std::span<const std::uint8_t> piece) = 0;
        virtual std::vector<std::uint8_t> final() = 0;
    };
    virtual std::unique_ptr<Stream> stream();
};

// Where transient keys are made and checked: the token, or host memory for unit tests.
class KeyBackend {
public:
    virtual ~KeyBackend() = default;
    // A fresh key. For EC keys *public_point receives the 65-byte uncompressed point.
    virtual std::unique_ptr<TransientKey> generate(KeyKind kind,
                                                   std::vector<std::uint8_t>* public_point) = 0;
    // The key check value (8 bytes), computed without exposing the key:
    //   aes:             AES-256-ECB(key, 16 zero bytes), first 8 bytes
    //   generic-secret:  HMAC-SHA256(key, 32 zero bytes), first 8 bytes
    //   ec-p256-private: SHA-256(public point), first 8 bytes, after proving that the private key
    //                    matches public_point (an ECDSA signature checked against it)
    // Throws IntegrityError when an EC private key does not match its public point.
    virtual std::vector<std::uint8_t> check_value(const TransientKey& key,
                                                  std::span<const std::uint8_t> public_point) = 0;
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
    std::vector<std::uint8_t> key_check_value() override;

private:
    SecureBytes m_kek;
};

class SoftwareMacKey : public MacKey {
public:
    explicit SoftwareMacKey(SecureBytes key) : m_key(std::move(key)) {}
    std::vector<std::uint8_t> mac(std::span<const std::uint8_t> data) override;
    bool verify(std::span<const std::uint8_t> data, std::span<const std::uint8_t> tag) override;
    std::vector<std::uint8_t> key_check_value() override;

private:
    SecureBytes m_key;
};

class SoftwareKeyBackend : public KeyBackend {
public:
    std::unique_ptr<TransientKey> generate(KeyKind kind,
                                           std::vector<std::uint8_t>* public_point) override;
    std::vector<std::uint8_t> check_value(const TransientKey& key,
                                          std::span<const std::uint8_t> public_point) override;
};

// Host-side helpers with OpenSSL, shared by the software backend and the token checks.
std::vector<std::uint8_t> hmac_sha256(std::span<const std::uint8_t> key,
                                      std::span<const std::uint8_t> data);
std::vector<std::uint8_t> sha256(std::span<const std::uint8_t> data);
// The 65-byte uncompressed P-256 point of a 32-byte private scalar.
std::vector<std::uint8_t> p256_public_from_private(std::span<const std::uint8_t> scalar);
// Verifies a raw (r||s, 64 bytes) ECDSA P-256 signature over a 32-byte digest.
bool p256_verify_digest(std::span<const std::uint8_t> public_point,
                        std::span<const std::uint8_t> digest, std::span<const std::uint8_t> rs);
// PEM encodings for `keywarden read --format pem`.
std::string p256_public_pem(std::span<const std::uint8_t> public_point);
std::string p256_private_pem(std::span<const std::uint8_t> scalar);

// RFC 5649 with OpenSSL (EVP_aes_{128,192,256}_wrap_pad by KEK length). Empty result on unwrap
// failure.
std::vector<std::uint8_t> aes_wrap_pad(std::span<const std::uint8_t> kek,
                                       std::span<const std::uint8_t> key);
SecureBytes aes_unwrap_pad(std::span<const std::uint8_t> kek, std::span<const std::uint8_t> blob);

}  // namespace keywarden
