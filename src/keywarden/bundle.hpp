// SPDX-License-Identifier: Apache-2.0
// The key bundle format (docs/bundle-format.md): pure format code, no token, no files.
//
// A bundle is text, one record per line, so that it can be taken apart with standard tools and
// decrypted with the openssl command line:
//   line 1      "keywarden-bundle 1"
//   line 2      header JSON (in the clear: format, wrap mechanism, entry count, key check values)
//   line 3..    one entry per key version: base64(IV || AES-256-CTR(metadata JSON)) SP
//               base64(wrapped key) or "-"
//   last line   "mac " + hex(HMAC-SHA256(signature key, every byte before this line))
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keywarden/keystore.hpp"
#include "keywarden/secure_buffer.hpp"

struct evp_cipher_ctx_st;  // OpenSSL's EVP_CIPHER_CTX, declared here without <openssl/evp.h>

namespace keywarden::backup {

using keystore::Bytes;

constexpr std::string_view kMagicLine = "keywarden-bundle 1";
// A key store v1 backup (`keywarden backup`) is a bundle with this first line, opened by keys
// derived from the one backup key (v1_backup_secret).
constexpr std::string_view kV1MagicLine = "keywarden-v1-backup 1";
constexpr std::string_view kV1EncryptionLabel = "keywarden v1 backup encryption key";
constexpr std::string_view kV1SignatureLabel = "keywarden v1 backup signature key";
constexpr int kBundleFormat = 1;
constexpr int kSecretFormat = 1;
// The label whose HMAC under the signature key gives the metadata encryption key.
constexpr std::string_view kMetadataKeyLabel = "keywarden bundle v1 metadata key";

struct BundleHeader {
    int format = kBundleFormat;
    std::string bundle_id;        // 32 hex characters, also in the secret file
    std::int64_t created = 0;     // Unix seconds
    std::string wrap_method;      // "aes-key-wrap-pad" (RFC 5649) ...
    std::string wrap_mechanism;   // "CKM_AES_KEY_WRAP_PAD" ...
    std::uint64_t entries = 0;
    std::uint64_t rings = 0;
    bool private_keys = false;
    Bytes kcv_encryption, kcv_signature;  // of the backup keys
};

// What an entry says about one key version. Encrypted in the bundle.
struct EntryMeta {
    std::string key_id;
    std::uint32_t version = 0;
    keystore::KeyState state = keystore::KeyState::active;
    std::int64_t created = 0, valid_from = 0;
    std::optional<std::int64_t> valid_until;
    bool current = false;
    KeyKind key_type = KeyKind::aes;  // true type and length: SoftHSM checks neither
    std::uint32_t key_length = 32;
    Bytes kcv;
    Bytes public_key;
    bool wrapped = false;  // whether the entry carries the wrapped private/secret key
};

struct SecretFile {
    // true: derived from a v1 backup key; it opens files with kV1MagicLine, and has no bundle id
    // or wrap method of its own to compare with the header (its check values still must match).
    bool v1_backup = false;
    int format = kSecretFormat;
    std::string bundle_id;
    SecureBytes encryption, signature;  // the backup keys' values
    std::string wrap_method, wrap_mechanism;
    Bytes kcv_encryption, kcv_signature;
};

// The secret file is JSON in Acra's shape plus fields keywarden needs. Key values never pass
// through std::string: the text is built and parsed in wiping buffers.
SecureBytes encode_secret_file(const SecretFile& s);
// The backup keys of a v1 backup, from its one 32-byte backup key:
//   encryption = HMAC-SHA256(backup key, kV1EncryptionLabel)
//   signature  = HMAC-SHA256(backup key, kV1SignatureLabel)
SecretFile v1_backup_secret(const SecureBytes& backup_key);
SecretFile parse_secret_file(const SecureBytes& text);  // throws FormatError

std::string encode_header(const BundleHeader& h);  // one line, no newline
BundleHeader parse_header(std::string_view line);  // throws FormatError

struct EntryLine {
    Bytes sealed_meta;  // IV (16) || ciphertext
    Bytes wrapped;      // empty for "-"
};
std::string encode_entry(const EntryLine& e);
EntryLine parse_entry(std::string_view line);

SecureBytes metadata_key(const SecureBytes& signature_key);

// AES-256-CTR under a metadata key, for many entries: the cipher and key schedule are set up once
// (OpenSSL wipes the context when it is freed), and the random IVs are drawn in batches. For one
// thread at a time.
class MetaCipher {
public:
    explicit MetaCipher(const SecureBytes& meta_key);
    ~MetaCipher();
    MetaCipher(const MetaCipher&) = delete;
    MetaCipher& operator=(const MetaCipher&) = delete;
    // out[0..in.size()) = in XOR the key stream from the 16-byte initial counter block iv.
    void apply(std::span<const std::uint8_t> iv, std::span<const std::uint8_t> in, std::uint8_t* out);
    void random_iv(std::uint8_t* iv16);

private:
    ::evp_cipher_ctx_st* m_ctx = nullptr;  // OpenSSL's EVP_CIPHER_CTX
    std::vector<std::uint8_t> m_ivs;  // random bytes not yet used (IVs are not secret)
    std::size_t m_iv_pos = 0;
};

Bytes seal_metadata(MetaCipher& cipher, const EntryMeta& m);
EntryMeta open_metadata(MetaCipher& cipher, std::span<const std::uint8_t> sealed);

namespace detail {
// The metadata plaintext as written (the same bytes as meta_json(m)), the JSON tree's dump it
// must equal, and the strict reader of the written form (nullopt: left to the JSON parser).
std::string meta_text(const EntryMeta& m);
std::string meta_json(const EntryMeta& m);
std::optional<EntryMeta> meta_from_text(std::string_view plain);
}  // namespace detail

// Key check values of the backup keys, computed on the host from the secret file. They match
// the token-side definitions (KeyProtector / MacKey::key_check_value) for RFC 5649 wrapping.
Bytes encryption_kcv(const SecureBytes& key);
Bytes signature_kcv(const SecureBytes& key);

// Streaming HMAC-SHA256 (EVP_MAC) on the host.
class HmacStream {
public:
    explicit HmacStream(std::span<const std::uint8_t> key);
    ~HmacStream();
    HmacStream(const HmacStream&) = delete;
    HmacStream& operator=(const HmacStream&) = delete;
    void update(std::span<const std::uint8_t> data);
    void update(std::string_view s) {
        update({reinterpret_cast<const std::uint8_t*>(s.data()), s.size()});
    }
    Bytes final();

private:
    void* m_ctx;
};

}  // namespace keywarden::backup
