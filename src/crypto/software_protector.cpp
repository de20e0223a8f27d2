// SPDX-License-Identifier: Apache-2.0
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "keywarden/error.hpp"
#include "keywarden/key_protector.hpp"

namespace keywarden {

const char* key_kind_name(KeyKind k) {
    switch (k) {
        case KeyKind::aes: return "aes";
        case KeyKind::generic_secret: return "generic-secret";
        case KeyKind::ec_p256_private: return "ec-p256-private";
    }
    return "unknown";
}

std::unique_ptr<SoftwareKey> SoftwareKey::generate(KeySpec spec) {
    SecureBytes v(spec.length);
    if (RAND_priv_bytes(v.data(), static_cast<int>(v.size())) != 1)
        throw OpenSslError("RAND_priv_bytes");
    return std::make_unique<SoftwareKey>(spec, std::move(v));
}

namespace {

struct CipherCtx {
    EVP_CIPHER_CTX* p = EVP_CIPHER_CTX_new();
    ~CipherCtx() { EVP_CIPHER_CTX_free(p); }
};

// One EVP pass of AES-256 wrap-pad; returns false on a failed unwrap (integrity).
template <typename Out>
bool wrap_pass(bool encrypt, std::span<const std::uint8_t> kek, std::span<const std::uint8_t> in,
               Out& out) {
    const EVP_CIPHER* cipher = kek.size() == 32   ? EVP_aes_256_wrap_pad()
                               : kek.size() == 24 ? EVP_aes_192_wrap_pad()
                               : kek.size() == 16 ? EVP_aes_128_wrap_pad()
                                                  : nullptr;
    if (!cipher) throw Error("AES key wrap needs a 16-, 24- or 32-byte key");
    CipherCtx ctx;
    if (!ctx.p) throw OpenSslError("EVP_CIPHER_CTX_new");
    EVP_CIPHER_CTX_set_flags(ctx.p, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    if (EVP_CipherInit_ex(ctx.p, cipher, nullptr, kek.data(), nullptr,
                          encrypt ? 1 : 0) != 1)
        throw OpenSslError("EVP_CipherInit_ex");
    out.resize(in.size() + 16);
    int n = 0;
    if (EVP_CipherUpdate(ctx.p, out.data(), &n, in.data(), static_cast<int>(in.size())) != 1 ||
        n < 0) {
        if (encrypt) throw OpenSslError("EVP_CipherUpdate");
        out.clear();
        return false;
    }
    out.resize(static_cast<std::size_t>(n));
    return true;
}

}  // namespace

std::vector<std::uint8_t> aes_wrap_pad(std::span<const std::uint8_t> kek,
                                       std::span<const std::uint8_t> key) {
    std::vector<std::uint8_t> out;
    wrap_pass(true, kek, key, out);
    return out;
}

SecureBytes aes_unwrap_pad(std::span<const std::uint8_t> kek, std::span<const std::uint8_t> blob) {
    SecureBytes out;
    if (blob.size() < 16 || blob.size() % 8 != 0) return out;
    if (!wrap_pass(false, kek, blob, out)) out.clear();
    return out;
}

SoftwareKeyProtector::SoftwareKeyProtector(SecureBytes kek) : m_kek(std::move(kek)) {
    if (m_kek.size() != 32) throw Error("the software key protector needs a 32-byte key");
}

std::vector<std::uint8_t> SoftwareKeyProtector::protect(const TransientKey& key) {
    const auto* sk = dynamic_cast<const SoftwareKey*>(&key);
    if (!sk) throw Error("the software key protector can only wrap software keys");
    SecureBytes v = sk->value();
    return aes_wrap_pad(m_kek, v);
}

std::unique_ptr<TransientKey> SoftwareKeyProtector::unprotect(std::span<const std::uint8_t> blob,
                                                              const KeySpec& spec, Exposure) {
    SecureBytes v = aes_unwrap_pad(m_kek, blob);
    if (v.empty())
        throw IntegrityError("unwrap failed: the wrapped key was changed or wrapped under another key");
    if (v.size() != spec.length)
        throw IntegrityError("unwrapped key has " + std::to_string(v.size()) +
                             " bytes where the metadata records " + std::to_string(spec.length));
    return std::make_unique<SoftwareKey>(spec, std::move(v));
}

std::vector<std::uint8_t> SoftwareKeyProtector::key_check_value() {
    std::vector<std::uint8_t> zeros(32, 0);
    auto h = sha256(aes_wrap_pad(m_kek, zeros));
    h.resize(8);
    return h;
}

namespace {
std::vector<std::uint8_t> concat(const MacKey::Parts& parts) {
    std::vector<std::uint8_t> all;
    for (auto p : parts) all.insert(all.end(), p.begin(), p.end());
    return all;
}
}  // namespace

std::vector<std::uint8_t> MacKey::mac_parts(const Parts& parts) { return mac(concat(parts)); }

bool MacKey::verify_parts(const Parts& parts, std::span<const std::uint8_t> tag) {
    return verify(concat(parts), tag);
}

std::unique_ptr<MacKey::Stream> MacKey::stream() {
    struct Collect : Stream {
        explicit Collect(MacKey& k) : key(k) {}
        MacKey& key;
        std::vector<std::uint8_t> all;
        void update(std::span<const std::uint8_t> piece) override { all.insert(all.end(), piece.begin(), piece.end()); }
        std::vector<std::uint8_t> final() override { return key.mac(all); }
    };
    return std::make_unique<Collect>(*this);
}

std::vector<std::uint8_t> SoftwareMacKey::mac(std::span<const std::uint8_t> data) {
    return hmac_sha256(m_key, data);
}

bool SoftwareMacKey::verify(std::span<const std::uint8_t> data, std::span<const std::uint8_t> tag) {
    auto want = hmac_sha256(m_key, data);
    return tag.size() == want.size() && CRYPTO_memcmp(tag.data(), want.data(), want.size()) == 0;
}

std::vector<std::uint8_t> SoftwareMacKey::key_check_value() {
    std::vector<std::uint8_t> zeros(32, 0);
    auto h = hmac_sha256(m_key, zeros);
    h.resize(8);
    return h;
}

std::unique_ptr<TransientKey> SoftwareKeyBackend::generate(KeyKind kind,
                                                           std::vector<std::uint8_t>* public_point) {
    auto k = SoftwareKey::generate({kind, 32});
    if (kind == KeyKind::ec_p256_private) {
        // A random 32-byte value is a valid P-256 scalar except with negligible probability;
        // p256_public_from_private fails loudly on the rare invalid one.
        auto pub = p256_public_from_private(k->value());
        if (public_point) *public_point = std::move(pub);
    }
    return k;
}

std::vector<std::uint8_t> SoftwareKeyBackend::check_value(
    const TransientKey& key, std::span<const std::uint8_t> public_point) {
    SecureBytes v = key.value();
    std::vector<std::uint8_t> out;
    switch (key.spec().kind) {
        case KeyKind::aes: {
            std::vector<std::uint8_t> zeros(16, 0);
            out.resize(32);
            int n = 0;
            EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
            bool ok = ctx && EVP_EncryptInit_ex(ctx, EVP_aes_256_ecb(), nullptr, v.data(), nullptr) == 1 &&
                      EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 &&
                      EVP_EncryptUpdate(ctx, out.data(), &n, zeros.data(), 16) == 1;
            EVP_CIPHER_CTX_free(ctx);
            if (!ok) throw OpenSslError("EVP_EncryptUpdate");
            break;
        }
        case KeyKind::generic_secret: {
            std::vector<std::uint8_t> zeros(32, 0);
            out = hmac_sha256(v, zeros);
            break;
        }
        case KeyKind::ec_p256_private: {
            auto derived = p256_public_from_private(v);
            if (derived.size() != public_point.size() ||
                CRYPTO_memcmp(derived.data(), public_point.data(), derived.size()) != 0)
                throw IntegrityError("the private key does not match its recorded public key");
            out = sha256(public_point);
            break;
        }
    }
    out.resize(8);
    return out;
}

}  // namespace keywarden
