// SPDX-License-Identifier: Apache-2.0
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <nlohmann/json.hpp>

#include <cstring>

#include "keywarden/bundle.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/strict_json.hpp"
#include "util/bytes.hpp"

namespace keywarden::backup {

using nlohmann::json;

namespace {

using util::append;

// Finds "name" : "value" in a JSON object's text and returns the value's position, for the two
// key values only; everything else is read by the JSON parser from a copy with them blanked.
std::pair<std::size_t, std::size_t> find_string_field(const SecureBytes& text, std::string_view name) {
    std::string_view t(reinterpret_cast<const char*>(text.data()), text.size());
    std::string quoted = "\"" + std::string(name) + "\"";
    std::size_t at = t.find(quoted);
    if (at == std::string_view::npos || t.find(quoted, at + 1) != std::string_view::npos)
        throw FormatError("the secret file must have exactly one \"" + std::string(name) + "\" field",
                          "is this a keywarden secret file (--key-bundle-secret)?");
    std::size_t p = at + quoted.size();
    while (p < t.size() && (t[p] == ' ' || t[p] == '\n' || t[p] == '\t' || t[p] == '\r')) ++p;
    if (p >= t.size() || t[p] != ':') throw FormatError("secret file: malformed " + std::string(name));
    ++p;
    while (p < t.size() && (t[p] == ' ' || t[p] == '\n' || t[p] == '\t' || t[p] == '\r')) ++p;
    if (p >= t.size() || t[p] != '"') throw FormatError("secret file: " + std::string(name) + " is not a string");
    std::size_t start = ++p;
    while (p < t.size() && t[p] != '"') {
        char c = t[p];
        bool b64 = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                   c == '+' || c == '/' || c == '=';
        if (!b64) throw FormatError("secret file: " + std::string(name) + " is not base64");
        ++p;
    }
    if (p >= t.size()) throw FormatError("secret file: unterminated " + std::string(name));
    return {start, p - start};
}

json json_of_meta(const EntryMeta& m) {
    return {{"key_id", m.key_id},
            {"version", m.version},
            {"state", keystore::key_state_name(m.state)},
            {"created", m.created},
            {"valid_from", m.valid_from},
            {"valid_until", m.valid_until ? json(*m.valid_until) : json(nullptr)},
            {"current", m.current},
            {"key_type", key_kind_name(m.key_type)},
            {"key_length", m.key_length},
            {"kcv", to_hex(m.kcv)},
            {"public", m.public_key.empty() ? json(nullptr) : json(to_base64(m.public_key))},
            {"wrapped", m.wrapped}};
}

// json_of_meta(m).dump(), byte for byte (keys in the order of nlohmann's std::map), without
// building the tree: it is made once per entry.
std::string meta_text_impl(const EntryMeta& m) {
    std::string o;
    o.reserve(320);
    o += "{\"created\":";
    o += std::to_string(m.created);
    o += m.current ? ",\"current\":true,\"kcv\":" : ",\"current\":false,\"kcv\":";
    append_json_string(o, to_hex(m.kcv));
    o += ",\"key_id\":";
    append_json_string(o, m.key_id);
    o += ",\"key_length\":";
    o += std::to_string(m.key_length);
    o += ",\"key_type\":";
    append_json_string(o, key_kind_name(m.key_type));
    o += ",\"public\":";
    if (m.public_key.empty()) o += "null";
    else append_json_string(o, to_base64(m.public_key));
    o += ",\"state\":";
    append_json_string(o, keystore::key_state_name(m.state));
    o += ",\"valid_from\":";
    o += std::to_string(m.valid_from);
    o += ",\"valid_until\":";
    o += m.valid_until ? std::to_string(*m.valid_until) : std::string("null");
    o += ",\"version\":";
    o += std::to_string(m.version);
    o += m.wrapped ? ",\"wrapped\":true}" : ",\"wrapped\":false}";
    return o;
}

// Reads exactly what meta_text writes (StrictJson); anything else gives nullopt and is left to
// the JSON parser.
std::optional<EntryMeta> meta_from_text_impl(std::string_view t) {
    StrictJson s(t);
    EntryMeta m;
    if (!s.lit("{\"created\":")) return std::nullopt;
    auto created = s.num<std::int64_t>();
    if (!created || !s.lit(",\"current\":")) return std::nullopt;
    auto current = s.boolean();
    if (!current || !s.lit(",\"kcv\":")) return std::nullopt;
    auto kcv = s.str();
    if (!kcv || !s.lit(",\"key_id\":")) return std::nullopt;
    auto key_id = s.str();
    if (!key_id || !s.lit(",\"key_length\":")) return std::nullopt;
    auto key_length = s.num<std::uint32_t>();
    if (!key_length || !s.lit(",\"key_type\":")) return std::nullopt;
    auto key_type = s.str();
    if (!key_type || !s.lit(",\"public\":")) return std::nullopt;
    std::optional<std::string_view> pub;
    if (!s.null_or_str(pub) || !s.lit(",\"state\":")) return std::nullopt;
    auto state = s.str();
    if (!state || !s.lit(",\"valid_from\":")) return std::nullopt;
    auto valid_from = s.num<std::int64_t>();
    if (!valid_from || !s.lit(",\"valid_until\":")) return std::nullopt;
    if (!s.null_or_num(m.valid_until) || !s.lit(",\"version\":")) return std::nullopt;
    auto version = s.num<std::uint32_t>();
    if (!version || !s.lit(",\"wrapped\":")) return std::nullopt;
    auto wrapped = s.boolean();
    if (!wrapped || !s.lit("}") || !s.at_end()) return std::nullopt;
    // The values, checked as the JSON path checks them (its errors are the ones reported).
    auto st = keystore::key_state_from_name(std::string(*state));
    auto kcv_bytes = from_hex(std::string(*kcv));
    if (!st || !kcv_bytes) return std::nullopt;
    bool known = false;
    for (KeyKind k : {KeyKind::aes, KeyKind::generic_secret, KeyKind::ec_p256_private})
        if (*key_type == key_kind_name(k)) {
            m.key_type = k;
            known = true;
        }
    if (!known) return std::nullopt;
    if (pub) {
        auto p = from_base64(std::string(*pub));
        if (!p) return std::nullopt;
        m.public_key = std::move(*p);
    }
    m.key_id = std::string(*key_id);
    m.version = *version;
    m.state = *st;
    m.created = *created;
    m.valid_from = *valid_from;
    m.current = *current;
    m.key_length = *key_length;
    m.kcv = std::move(*kcv_bytes);
    m.wrapped = *wrapped;
    return m;
}

Bytes hex_field(const json& j, const char* what) {
    auto v = from_hex(j.get<std::string>());
    if (!v) throw FormatError(std::string(what) + " is not hex");
    return *v;
}

}  // namespace

SecureBytes encode_secret_file(const SecretFile& s) {
    SecureBytes out;
    SecureBytes enc = base64_secret(s.encryption), sig = base64_secret(s.signature);
    append(out, "{\n  \"format\": " + std::to_string(s.format) + ",\n");
    append(out, "  \"bundle_id\": \"" + s.bundle_id + "\",\n");
    append(out, "  \"encryption\": \"");
    out.insert(out.end(), enc.begin(), enc.end());
    append(out, "\",\n  \"signature\": \"");
    out.insert(out.end(), sig.begin(), sig.end());
    append(out, "\",\n  \"wrap_method\": \"" + s.wrap_method + "\",\n");
    append(out, "  \"wrap_mechanism\": \"" + s.wrap_mechanism + "\",\n");
    append(out, "  \"kcv_encryption\": \"" + to_hex(s.kcv_encryption) + "\",\n");
    append(out, "  \"kcv_signature\": \"" + to_hex(s.kcv_signature) + "\"\n}\n");
    return out;
}

SecretFile parse_secret_file(const SecureBytes& text) {
    SecretFile s;
    auto [eo, en] = find_string_field(text, "encryption");
    auto [so, sn] = find_string_field(text, "signature");
    auto enc = secret_from_base64({reinterpret_cast<const char*>(text.data()) + eo, en});
    auto sig = secret_from_base64({reinterpret_cast<const char*>(text.data()) + so, sn});
    if (!enc || !sig) throw FormatError("secret file: a key is not valid base64");
    s.encryption = std::move(*enc);
    s.signature = std::move(*sig);
    if (s.encryption.size() != 32 || s.signature.size() != 32)
        throw FormatError("secret file: the backup keys must be 32 bytes each");
    // The rest goes through the JSON parser with the key values blanked out: copied around them,
    // so that no key character is ever in this plain string.
    std::string blanked(text.size(), 'A');
    for (std::size_t i = 0; i < text.size(); ++i)
        if ((i < eo || i >= eo + en) && (i < so || i >= so + sn)) blanked[i] = static_cast<char>(text[i]);
    try {
        json j = json::parse(blanked);
        s.format = j.at("format").get<int>();
        if (s.format != kSecretFormat)
            throw FormatError("secret file format " + std::to_string(s.format) +
                                  " is not supported (this keywarden reads " +
                                  std::to_string(kSecretFormat) + ")",
                              s.format > kSecretFormat ? "upgrade keywarden" : "");
        s.bundle_id = j.at("bundle_id").get<std::string>();
        s.wrap_method = j.at("wrap_method").get<std::string>();
        s.wrap_mechanism = j.at("wrap_mechanism").get<std::string>();
        s.kcv_encryption = hex_field(j.at("kcv_encryption"), "kcv");
        s.kcv_signature = hex_field(j.at("kcv_signature"), "kcv");
    } catch (const json::exception& e) {
        throw FormatError(std::string("the secret file is not a keywarden secret file: ") + e.what());
    }
    return s;
}

std::string encode_header(const BundleHeader& h) {
    return json{{"format", h.format},
                {"bundle_id", h.bundle_id},
                {"created", h.created},
                {"wrap_method", h.wrap_method},
                {"wrap_mechanism", h.wrap_mechanism},
                {"metadata_cipher", "aes-256-ctr"},
                {"mac", "hmac-sha256"},
                {"entries", h.entries},
                {"rings", h.rings},
                {"private_keys", h.private_keys},
                {"kcv", {{"encryption", to_hex(h.kcv_encryption)}, {"signature", to_hex(h.kcv_signature)}}}}
        .dump();
}

BundleHeader parse_header(std::string_view line) {
    try {
        json j = json::parse(line);
        BundleHeader h;
        h.format = j.at("format").get<int>();
        if (h.format != kBundleFormat)
            throw FormatError("bundle format " + std::to_string(h.format) + " is not supported",
                              h.format > kBundleFormat ? "upgrade keywarden" : "");
        h.bundle_id = j.at("bundle_id").get<std::string>();
        h.created = j.at("created").get<std::int64_t>();
        h.wrap_method = j.at("wrap_method").get<std::string>();
        h.wrap_mechanism = j.at("wrap_mechanism").get<std::string>();
        if (j.at("metadata_cipher") != "aes-256-ctr" || j.at("mac") != "hmac-sha256")
            throw FormatError("bundle uses an unknown cipher or MAC");
        h.entries = j.at("entries").get<std::uint64_t>();
        h.rings = j.at("rings").get<std::uint64_t>();
        h.private_keys = j.at("private_keys").get<bool>();
        h.kcv_encryption = hex_field(j.at("kcv").at("encryption"), "kcv");
        h.kcv_signature = hex_field(j.at("kcv").at("signature"), "kcv");
        return h;
    } catch (const json::exception& e) {
        throw FormatError(std::string("bundle header is malformed: ") + e.what());
    }
}

std::string encode_entry(const EntryLine& e) {
    return to_base64(e.sealed_meta) + " " + (e.wrapped.empty() ? std::string("-") : to_base64(e.wrapped));
}

EntryLine parse_entry(std::string_view line) {
    auto sp = line.find(' ');
    if (sp == std::string_view::npos || line.find(' ', sp + 1) != std::string_view::npos)
        throw FormatError("bundle entry is malformed");
    EntryLine e;
    auto meta = from_base64(line.substr(0, sp));
    if (!meta || meta->size() < 17) throw FormatError("bundle entry metadata is malformed");
    e.sealed_meta = std::move(*meta);
    auto w = line.substr(sp + 1);
    if (w != "-") {
        auto wrapped = from_base64(w);
        if (!wrapped || wrapped->empty()) throw FormatError("bundle entry key is malformed");
        e.wrapped = std::move(*wrapped);
    }
    return e;
}

namespace {
// HMAC-SHA256(key, label) in a wiping buffer: a key derived from another.
SecureBytes derive(const SecureBytes& key, std::string_view label) {
    auto k = hmac_sha256(key, std::span<const std::uint8_t>(
                                  reinterpret_cast<const std::uint8_t*>(label.data()), label.size()));
    SecureBytes out(k.begin(), k.end());
    wipe(k.data(), k.size());
    return out;
}
}  // namespace

SecureBytes metadata_key(const SecureBytes& signature_key) { return derive(signature_key, kMetadataKeyLabel); }

SecretFile v1_backup_secret(const SecureBytes& backup_key) {
    if (backup_key.size() != 32) throw UsageError("a v1 backup key is 32 bytes");
    SecretFile s;
    s.v1_backup = true;
    s.encryption = derive(backup_key, kV1EncryptionLabel);
    s.signature = derive(backup_key, kV1SignatureLabel);
    s.kcv_encryption = encryption_kcv(s.encryption);
    s.kcv_signature = signature_kcv(s.signature);
    return s;
}

namespace detail {
std::string meta_text(const EntryMeta& m) { return meta_text_impl(m); }
std::string meta_json(const EntryMeta& m) { return json_of_meta(m).dump(); }
std::optional<EntryMeta> meta_from_text(std::string_view plain) { return meta_from_text_impl(plain); }
}  // namespace detail

MetaCipher::MetaCipher(const SecureBytes& meta_key) {
    if (meta_key.size() != 32) throw Error("internal: a metadata key is 32 bytes");
    // Fetched once per process: EVP_aes_256_ctr() would fetch the implementation at every init.
    // A failed fetch is not kept: the next MetaCipher tries again. (The context holds its own
    // reference to the cipher.)
    static EVP_CIPHER* const cached = EVP_CIPHER_fetch(nullptr, "AES-256-CTR", nullptr);
    EVP_CIPHER* retry = cached ? nullptr : EVP_CIPHER_fetch(nullptr, "AES-256-CTR", nullptr);
    m_ctx = EVP_CIPHER_CTX_new();
    // The context keeps the key schedule until it is freed (OpenSSL wipes it then): for the life
    // of one bundle reader or export, like the metadata key it comes from.
    bool ok = (cached || retry) && m_ctx &&
              EVP_EncryptInit_ex(m_ctx, cached ? cached : retry, nullptr, meta_key.data(), nullptr) == 1;
    EVP_CIPHER_free(retry);
    if (!ok) {
        EVP_CIPHER_CTX_free(m_ctx);
        throw OpenSslError("AES-256-CTR");
    }
}

MetaCipher::~MetaCipher() { EVP_CIPHER_CTX_free(m_ctx); }

void MetaCipher::apply(std::span<const std::uint8_t> iv, std::span<const std::uint8_t> in, std::uint8_t* out) {
    int n = 0;
    if (iv.size() != 16 || EVP_EncryptInit_ex(m_ctx, nullptr, nullptr, nullptr, iv.data()) != 1 ||
        EVP_EncryptUpdate(m_ctx, out, &n, in.data(), static_cast<int>(in.size())) != 1 ||
        static_cast<std::size_t>(n) != in.size())
        throw OpenSslError("AES-256-CTR");
}

void MetaCipher::random_iv(std::uint8_t* iv16) {
    if (m_iv_pos + 16 > m_ivs.size()) {
        // Filled aside and taken only when RAND_bytes succeeded: never zero IVs after a failure.
        std::vector<std::uint8_t> fresh(64 * 16);
        if (RAND_bytes(fresh.data(), static_cast<int>(fresh.size())) != 1) throw OpenSslError("RAND_bytes");
        m_ivs = std::move(fresh);
        m_iv_pos = 0;
    }
    std::memcpy(iv16, m_ivs.data() + m_iv_pos, 16);
    m_iv_pos += 16;
}

Bytes seal_metadata(MetaCipher& cipher, const EntryMeta& m) {
    std::string plain = meta_text_impl(m);
    Bytes out(16 + plain.size());
    cipher.random_iv(out.data());
    cipher.apply(std::span(out).first(16),
                 std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(plain.data()), plain.size()),
                 out.data() + 16);
    return out;
}

EntryMeta open_metadata(MetaCipher& cipher, std::span<const std::uint8_t> sealed) {
    if (sealed.size() < 17) throw FormatError("bundle entry metadata is too short");
    std::string plain(sealed.size() - 16, '\0');
    cipher.apply(sealed.first(16), sealed.subspan(16), reinterpret_cast<std::uint8_t*>(plain.data()));
    if (auto fast = meta_from_text_impl(plain)) return std::move(*fast);
    try {
        json j = json::parse(plain);
        EntryMeta m;
        m.key_id = j.at("key_id").get<std::string>();
        m.version = j.at("version").get<std::uint32_t>();
        auto st = keystore::key_state_from_name(j.at("state").get<std::string>());
        if (!st) throw FormatError("unknown key state in bundle");
        m.state = *st;
        m.created = j.at("created").get<std::int64_t>();
        m.valid_from = j.at("valid_from").get<std::int64_t>();
        if (!j.at("valid_until").is_null()) m.valid_until = j.at("valid_until").get<std::int64_t>();
        m.current = j.at("current").get<bool>();
        std::string kt = j.at("key_type").get<std::string>();
        bool known = false;
        for (KeyKind k : {KeyKind::aes, KeyKind::generic_secret, KeyKind::ec_p256_private})
            if (kt == key_kind_name(k)) {
                m.key_type = k;
                known = true;
            }
        if (!known) throw FormatError("unknown key type in bundle: " + kt);
        m.key_length = j.at("key_length").get<std::uint32_t>();
        m.kcv = hex_field(j.at("kcv"), "kcv");
        if (!j.at("public").is_null()) {
            auto p = from_base64(j.at("public").get<std::string>());
            if (!p) throw FormatError("bad public key in bundle");
            m.public_key = *p;
        }
        m.wrapped = j.at("wrapped").get<bool>();
        return m;
    } catch (const json::exception& e) {
        // Reachable only after the whole-file MAC verified, or while scanning before it does.
        throw IntegrityError(std::string("bundle entry metadata does not decrypt: ") + e.what());
    }
}

Bytes encryption_kcv(const SecureBytes& key) {
    SecureBytes zeros(32, 0);
    auto h = sha256(aes_wrap_pad(key, zeros));
    h.resize(8);
    return h;
}

Bytes signature_kcv(const SecureBytes& key) {
    Bytes zeros(32, 0);
    auto h = hmac_sha256(key, zeros);
    h.resize(8);
    return h;
}

HmacStream::HmacStream(std::span<const std::uint8_t> key) {
    EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
    EVP_MAC_CTX* ctx = mac ? EVP_MAC_CTX_new(mac) : nullptr;
    EVP_MAC_free(mac);
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    if (!ctx || EVP_MAC_init(ctx, key.data(), key.size(), params) != 1) {
        EVP_MAC_CTX_free(ctx);
        throw OpenSslError("EVP_MAC_init");
    }
    m_ctx = ctx;
}

HmacStream::~HmacStream() { EVP_MAC_CTX_free(static_cast<EVP_MAC_CTX*>(m_ctx)); }

void HmacStream::update(std::span<const std::uint8_t> data) {
    if (EVP_MAC_update(static_cast<EVP_MAC_CTX*>(m_ctx), data.data(), data.size()) != 1)
        throw OpenSslError("EVP_MAC_update");
}

Bytes HmacStream::final() {
    Bytes out(32);
    std::size_t n = 0;
    if (EVP_MAC_final(static_cast<EVP_MAC_CTX*>(m_ctx), out.data(), &n, out.size()) != 1)
        throw OpenSslError("EVP_MAC_final");
    out.resize(n);
    return out;
}

}  // namespace keywarden::backup
