// SPDX-License-Identifier: Apache-2.0
#include <openssl/err.h>
#include <openssl/evp.h>

#include <catch2/catch.hpp>

#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/key_protector.hpp"
#include "keywarden/secure_buffer.hpp"

using namespace keywarden;

TEST_CASE("secure buffers come from the locked heap and hold their bytes", "[unit]") {
    REQUIRE(init_secure_heap());
    CHECK(secure_heap_active());
    SecureBytes b(100, 0xAB);
    CHECK(CRYPTO_secure_allocated(b.data()) == 1);
    CHECK(b[99] == 0xAB);
    b.resize(5000, 0x01);  // reallocation stays on the secure heap
    CHECK(CRYPTO_secure_allocated(b.data()) == 1);
    CHECK(b[4999] == 0x01);
    CHECK(as_string_view(SecureBytes{'a', 'b'}) == "ab");
}

TEST_CASE("OpenSslError drains the error queue", "[unit]") {
    ERR_put_error(ERR_LIB_EVP, 0, ERR_R_MALLOC_FAILURE, __FILE__, __LINE__);
    OpenSslError e("EVP_Test");
    CHECK(std::string(e.what()).starts_with("EVP_Test failed: "));
    CHECK(ERR_peek_error() == 0);
    OpenSslError empty("EVP_Other");
    CHECK(std::string(empty.what()) == "EVP_Other failed");
}

TEST_CASE("software key protector round trip and refusals", "[unit]") {
    SecureBytes kek(32, 0x11), other(32, 0x22);
    SoftwareKeyProtector p(kek);
    for (KeyKind kind : {KeyKind::aes, KeyKind::generic_secret, KeyKind::ec_p256_private}) {
        INFO(key_kind_name(kind));
        auto k = SoftwareKey::generate({kind, 32});
        auto blob = p.protect(*k);
        CHECK(blob.size() == 40);
        auto back = p.unprotect(blob, {kind, 32}, Exposure::readable);
        CHECK(back->value() == k->value());

        SECTION("every single-byte flip is refused") {
            for (std::size_t i = 0; i < blob.size(); ++i) {
                auto bad = blob;
                bad[i] ^= 0x01;
                CHECK_THROWS_AS(p.unprotect(bad, {kind, 32}, Exposure::readable), IntegrityError);
            }
        }
        SECTION("another key is refused") {
            SoftwareKeyProtector q(other);
            CHECK_THROWS_AS(q.unprotect(blob, {kind, 32}, Exposure::readable), IntegrityError);
        }
        SECTION("a wrong recorded length is refused") {
            CHECK_THROWS_AS(p.unprotect(blob, {kind, 31}, Exposure::readable), IntegrityError);
        }
        SECTION("truncated blobs are refused") {
            for (std::size_t n : {0u, 8u, 16u, 32u}) {
                std::vector<std::uint8_t> cut(blob.begin(), blob.begin() + n);
                CHECK_THROWS_AS(p.unprotect(cut, {kind, 32}, Exposure::readable), IntegrityError);
            }
        }
    }
    CHECK_THROWS_AS(SoftwareKeyProtector(SecureBytes(16, 1)), Error);
}

namespace {
std::vector<std::uint8_t> unhex(const std::string& h) {
    std::vector<std::uint8_t> v;
    for (std::size_t i = 0; i + 1 < h.size(); i += 2)
        v.push_back(static_cast<std::uint8_t>(std::stoi(h.substr(i, 2), nullptr, 16)));
    return v;
}
}  // namespace

TEST_CASE("aes_wrap_pad matches the RFC 5649 section 6 vectors", "[unit]") {
    auto kek = unhex("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8");
    struct Row {
        const char* key;
        const char* wrapped;
    };
    const Row rows[] = {
        {"c37b7e6492584340bed12207808941155068f738",
         "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a"},
        {"466f7250617369", "afbeb0f07dfbf5419200f2ccb50bb24f"},
    };
    for (const auto& r : rows) {
        INFO(r.key);
        CHECK(aes_wrap_pad(kek, unhex(r.key)) == unhex(r.wrapped));
        auto back = aes_unwrap_pad(kek, unhex(r.wrapped));
        CHECK(std::vector<std::uint8_t>(back.begin(), back.end()) == unhex(r.key));
    }
}

TEST_CASE("from_base64 decodes what OpenSSL encodes and refuses everything else", "[unit]") {
    // Every length from 0 to 100 bytes, random content: OpenSSL's encoder, our decoder (both the
    // plain and the secret variant).
    std::vector<std::uint8_t> data(100);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::uint8_t>(i * 37 + 11);
    for (std::size_t len = 0; len <= data.size(); ++len) {
        std::string enc(4 * ((len + 2) / 3) + 1, '\0');
        int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(enc.data()), data.data(), static_cast<int>(len));
        enc.resize(static_cast<std::size_t>(n));
        CAPTURE(len, enc);
        CHECK(to_base64(std::span(data).first(len)) == enc);
        auto back = from_base64(enc);
        REQUIRE(back);
        CHECK(*back == std::vector<std::uint8_t>(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(len)));
        auto secret = secret_from_base64(enc);
        REQUIRE(secret);
        CHECK(std::equal(secret->begin(), secret->end(), data.begin(), data.begin() + static_cast<std::ptrdiff_t>(len)));
    }
    CHECK(*from_base64("/+9Q") == std::vector<std::uint8_t>{0xff, 0xef, 0x50});
    // Pad bits left over are ignored, as OpenSSL's decoder does ("QR==" and "QQ==" are both "A").
    CHECK(*from_base64("QR==") == std::vector<std::uint8_t>{'A'});
    const std::vector<std::string> bad = {"A", "AB", "ABC", "ABCDE", "AB=C", "A===", "====", "=AAA", "AA=A",
                                          "AAA=AAAA", "AB CD", "AB\nC", "AB-_", "ABC\x80", "ABC.", "AB==AB==",
                                          std::string("ABCD\0EFG", 8)};
    for (const auto& s : bad) {
        CAPTURE(s);
        CHECK_FALSE(from_base64(s));
        CHECK_FALSE(secret_from_base64(s));
    }
    CHECK(from_base64("")->empty());
}

TEST_CASE("sha256 gives the FIPS 180-2 digests", "[unit]") {
    std::string abc = "abc";
    CHECK(to_hex(sha256(std::span(reinterpret_cast<const std::uint8_t*>(abc.data()), abc.size()))) ==
          "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    CHECK(to_hex(sha256({})) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}
