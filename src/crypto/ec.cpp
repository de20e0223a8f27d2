// SPDX-License-Identifier: Apache-2.0
// OpenSSL helpers: SHA-256, HMAC, and P-256 conversions for public points and PEM output.
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>

#include <memory>

#include "keywarden/error.hpp"
#include "keywarden/key_protector.hpp"

namespace keywarden {

namespace {

template <typename T, void (*F)(T*)>
struct Deleter {
    void operator()(T* p) const { F(p); }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, Deleter<EVP_PKEY_CTX, EVP_PKEY_CTX_free>>;
using BnPtr = std::unique_ptr<BIGNUM, Deleter<BIGNUM, BN_clear_free>>;
using BioPtr = std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>>;
using ParamBldPtr = std::unique_ptr<OSSL_PARAM_BLD, Deleter<OSSL_PARAM_BLD, OSSL_PARAM_BLD_free>>;
using ParamPtr = std::unique_ptr<OSSL_PARAM, Deleter<OSSL_PARAM, OSSL_PARAM_free>>;
using GroupPtr = std::unique_ptr<EC_GROUP, Deleter<EC_GROUP, EC_GROUP_free>>;
using PointPtr = std::unique_ptr<EC_POINT, Deleter<EC_POINT, EC_POINT_free>>;
using SigPtr = std::unique_ptr<ECDSA_SIG, Deleter<ECDSA_SIG, ECDSA_SIG_free>>;

// An EVP_PKEY from a public point and, optionally, the private scalar.
PkeyPtr make_p256(std::span<const std::uint8_t> point, std::span<const std::uint8_t> scalar) {
    ParamBldPtr bld(OSSL_PARAM_BLD_new());
    if (!bld) throw OpenSslError("OSSL_PARAM_BLD_new");
    BnPtr priv;
    if (!OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) ||
        !OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                          point.size()))
        throw OpenSslError("OSSL_PARAM_BLD_push");
    if (!scalar.empty()) {
        priv.reset(BN_secure_new());
        if (!priv || !BN_bin2bn(scalar.data(), static_cast<int>(scalar.size()), priv.get()) ||
            !OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, priv.get()))
            throw OpenSslError("BN_bin2bn");
    }
    ParamPtr params(OSSL_PARAM_BLD_to_param(bld.get()));
    PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    EVP_PKEY* raw = nullptr;
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw,
                          scalar.empty() ? EVP_PKEY_PUBLIC_KEY : EVP_PKEY_KEYPAIR,
                          params.get()) != 1)
        throw OpenSslError("EVP_PKEY_fromdata");
    return PkeyPtr(raw);
}

std::string bio_string(BIO* b) {
    char* data = nullptr;
    long n = BIO_get_mem_data(b, &data);
    return std::string(data, static_cast<std::size_t>(n));
}

}  // namespace

std::vector<std::uint8_t> sha256(std::span<const std::uint8_t> data) {
    std::vector<std::uint8_t> out(32);
    unsigned int n = 0;
    if (EVP_Digest(data.data(), data.size(), out.data(), &n, EVP_sha256(), nullptr) != 1)
        throw OpenSslError("EVP_Digest");
    return out;
}

std::vector<std::uint8_t> hmac_sha256(std::span<const std::uint8_t> key,
                                      std::span<const std::uint8_t> data) {
    std::vector<std::uint8_t> out(32);
    unsigned int n = 0;
    if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), data.data(), data.size(),
              out.data(), &n))
        throw OpenSslError("HMAC");
    return out;
}

std::vector<std::uint8_t> p256_public_from_private(std::span<const std::uint8_t> scalar) {
    GroupPtr group(EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1));
    BnPtr d(BN_secure_new());
    if (!group || !d || !BN_bin2bn(scalar.data(), static_cast<int>(scalar.size()), d.get()))
        throw OpenSslError("EC_GROUP_new_by_curve_name");
    PointPtr pt(EC_POINT_new(group.get()));
    if (!pt || EC_POINT_mul(group.get(), pt.get(), d.get(), nullptr, nullptr, nullptr) != 1)
        throw OpenSslError("EC_POINT_mul");
    std::vector<std::uint8_t> out(65);
    if (EC_POINT_point2oct(group.get(), pt.get(), POINT_CONVERSION_UNCOMPRESSED, out.data(),
                           out.size(), nullptr) != 65)
        throw OpenSslError("EC_POINT_point2oct");
    return out;
}

bool p256_verify_digest(std::span<const std::uint8_t> public_point,
                        std::span<const std::uint8_t> digest, std::span<const std::uint8_t> rs) {
    if (rs.size() != 64 || digest.size() != 32) return false;
    auto pkey = make_p256(public_point, {});
    SigPtr sig(ECDSA_SIG_new());
    BIGNUM* r = BN_bin2bn(rs.data(), 32, nullptr);
    BIGNUM* s = BN_bin2bn(rs.data() + 32, 32, nullptr);
    if (!sig || !r || !s || ECDSA_SIG_set0(sig.get(), r, s) != 1) {
        BN_free(r);
        BN_free(s);
        throw OpenSslError("ECDSA_SIG_set0");
    }
    unsigned char* der = nullptr;
    int der_len = i2d_ECDSA_SIG(sig.get(), &der);
    if (der_len <= 0) throw OpenSslError("i2d_ECDSA_SIG");
    std::unique_ptr<unsigned char, void (*)(unsigned char*)> der_guard(
        der, [](unsigned char* p) { OPENSSL_free(p); });
    PkeyCtxPtr ctx(EVP_PKEY_CTX_new(pkey.get(), nullptr));
    if (!ctx || EVP_PKEY_verify_init(ctx.get()) != 1) throw OpenSslError("EVP_PKEY_verify_init");
    return EVP_PKEY_verify(ctx.get(), der, static_cast<std::size_t>(der_len), digest.data(),
                           digest.size()) == 1;
}

std::string p256_public_pem(std::span<const std::uint8_t> public_point) {
    auto pkey = make_p256(public_point, {});
    BioPtr b(BIO_new(BIO_s_mem()));
    if (!b || PEM_write_bio_PUBKEY(b.get(), pkey.get()) != 1)
        throw OpenSslError("PEM_write_bio_PUBKEY");
    return bio_string(b.get());
}

std::string p256_private_pem(std::span<const std::uint8_t> scalar) {
    auto point = p256_public_from_private(scalar);
    auto pkey = make_p256(point, scalar);
    BioPtr b(BIO_new(BIO_s_secmem()));
    if (!b || PEM_write_bio_PrivateKey(b.get(), pkey.get(), nullptr, nullptr, 0, nullptr,
                                       nullptr) != 1)
        throw OpenSslError("PEM_write_bio_PrivateKey");
    return bio_string(b.get());
}

}  // namespace keywarden
