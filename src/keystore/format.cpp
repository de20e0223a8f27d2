// SPDX-License-Identifier: Apache-2.0
#include <openssl/evp.h>

#include <algorithm>
#include <cstring>

#include "detail/format.hpp"
#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/strict_json.hpp"

namespace keywarden::keystore::detail {

using nlohmann::json;

Bytes mac_input(std::string_view domain, std::string_view binding,
                std::span<const std::uint8_t> signed_part) {
    Bytes out;
    out.reserve(domain.size() + binding.size() + 2 + signed_part.size());
    out.insert(out.end(), domain.begin(), domain.end());
    out.push_back(0);
    out.insert(out.end(), binding.begin(), binding.end());
    out.push_back(0);
    out.insert(out.end(), signed_part.begin(), signed_part.end());
    return out;
}

MacKey::Parts mac_parts_of(std::string_view domain, std::string_view binding,
                           std::span<const std::uint8_t> signed_part) {
    static const std::uint8_t zero = 0;
    auto bytes = [](std::string_view s) {
        return std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
    };
    return {bytes(domain), {&zero, 1}, bytes(binding), {&zero, 1}, signed_part};
}

Bytes frame_header(const char* magic, std::uint16_t format, std::uint32_t body_length) {
    Bytes out(magic, magic + 8);
    put_u16(out, format);
    put_u32(out, body_length);
    return out;
}

Bytes frame(const char* magic, std::uint16_t format, const std::string& body) {
    Bytes out = frame_header(magic, format, static_cast<std::uint32_t>(body.size()));
    out.insert(out.end(), body.begin(), body.end());
    return out;
}

std::uint32_t check_header(const std::uint8_t* h, const char* magic, std::uint16_t format, const std::string& what) {
    if (std::memcmp(h, magic, 8) != 0)
        throw FormatError(what + " is not a keywarden " +
                          (std::strcmp(magic, kRingMagic) == 0 ? "key ring" : "manifest") +
                          " file (bad magic)");
    std::uint16_t f = get_u16(h + 8);
    if (f != format)
        throw FormatError(what + " has format version " + std::to_string(f) +
                              ", this keywarden reads version " + std::to_string(format),
                          f > format ? "upgrade keywarden" : "");
    return get_u32(h + 10);
}

std::size_t check_frame(std::span<const std::uint8_t> file, const char* magic,
                        std::uint16_t format, const std::string& what) {
    if (file.size() < kHeaderSize + kMacSize)
        throw IntegrityError(what + " is truncated (" + std::to_string(file.size()) + " bytes)");
    std::uint32_t n = check_header(file.data(), magic, format, what);
    if (static_cast<std::uint64_t>(n) + kHeaderSize + kMacSize != file.size())
        throw IntegrityError(what + " has a length that does not match its header (truncated or "
                                    "extended)");
    return kHeaderSize + n;
}

json parse_body(std::span<const std::uint8_t> file, const std::string& what) {
    std::uint32_t n = get_u32(file.data() + 10);
    try {
        return json::parse(file.begin() + kHeaderSize, file.begin() + kHeaderSize + n);
    } catch (const json::exception& e) {
        // Only reachable with a valid MAC, i.e. a file keywarden itself wrote wrongly.
        throw FormatError(what + ": authenticated body is not valid JSON: " + e.what());
    }
}

namespace {

json opt_int(const std::optional<std::int64_t>& v) { return v ? json(*v) : json(nullptr); }

std::optional<std::int64_t> get_opt_int(const json& j) {
    if (j.is_null()) return std::nullopt;
    return j.get<std::int64_t>();
}

Bytes unb64(const json& j, const std::string& what) {
    auto v = from_base64(j.get<std::string>());
    if (!v) throw FormatError(what + ": bad base64");
    return *v;
}

}  // namespace

json ring_to_json(const KeyRing& r, const std::string& store_id) {
    json versions = json::array();
    for (const auto& v : r.versions) {
        json jv = {{"version", v.version},
                   {"state", key_state_name(v.state)},
                   {"created", v.created},
                   {"valid_from", v.valid_from},
                   {"valid_until", opt_int(v.valid_until)},
                   {"key_type", key_kind_name(v.key_type)},
                   {"key_length", v.key_length},
                   {"protection", v.protection},
                   {"wrapped", v.wrapped.empty() ? json(nullptr) : json(to_base64(v.wrapped))},
                   {"kcv", to_hex(v.kcv)}};
        if (!v.public_key.empty()) jv["public"] = to_base64(v.public_key);
        versions.push_back(std::move(jv));
    }
    return {{"format", kRingFormat},
            {"store_id", store_id},
            {"key_id", r.id.str()},
            {"kind", ring_kind_name(r.id.kind)},
            {"client_id", r.id.client_id.empty() ? json(nullptr) : json(r.id.client_id)},
            {"current", r.current ? json(*r.current) : json(nullptr)},
            {"versions", std::move(versions)}};
}

// The same bytes as ring_to_json(r, store_id).dump(), written directly: import seals one ring per
// key on its token thread, and building a JSON tree for each costs more than the text.
std::string ring_body(const KeyRing& r, const std::string& store_id) {
    std::string out;
    auto q = [&out](std::string_view t) { append_json_string(out, t); };
    out.reserve(256 + r.versions.size() * 320);
    out += "{\"client_id\":";
    if (r.id.client_id.empty()) out += "null";
    else q(r.id.client_id);
    out += ",\"current\":" + (r.current ? std::to_string(*r.current) : std::string("null"));
    out += ",\"format\":" + std::to_string(kRingFormat);
    out += ",\"key_id\":";
    q(r.id.str());
    out += ",\"kind\":";
    q(ring_kind_name(r.id.kind));
    out += ",\"store_id\":";
    q(store_id);
    out += ",\"versions\":[";
    bool first = true;
    for (const auto& v : r.versions) {
        if (!first) out += ',';
        first = false;
        out += "{\"created\":" + std::to_string(v.created);
        out += ",\"kcv\":\"" + to_hex(v.kcv) + "\"";
        out += ",\"key_length\":" + std::to_string(v.key_length);
        out += ",\"key_type\":";
        q(key_kind_name(v.key_type));
        out += ",\"protection\":";
        q(v.protection);
        if (!v.public_key.empty()) out += ",\"public\":\"" + to_base64(v.public_key) + "\"";
        out += ",\"state\":";
        q(key_state_name(v.state));
        out += ",\"valid_from\":" + std::to_string(v.valid_from);
        out += ",\"valid_until\":" + (v.valid_until ? std::to_string(*v.valid_until) : std::string("null"));
        out += ",\"version\":" + std::to_string(v.version);
        out += ",\"wrapped\":" + (v.wrapped.empty() ? std::string("null") : "\"" + to_base64(v.wrapped) + "\"");
        out += '}';
    }
    out += "]}";
    return out;
}

KeyRing ring_from_json(const json& j, const std::string& store_id) {
    try {
        if (j.at("store_id") != store_id)
            throw IntegrityError("key ring belongs to another store");
        KeyRing r;
        r.id = KeyId::parse(j.at("key_id").get<std::string>());
        auto kind = ring_kind_from_name(j.at("kind").get<std::string>());
        if (!kind || *kind != r.id.kind)
            throw IntegrityError("key ring kind does not match its key id");
        if (!j.at("current").is_null()) r.current = j.at("current").get<std::uint32_t>();
        for (const auto& jv : j.at("versions")) {
            KeyVersion v;
            v.version = jv.at("version").get<std::uint32_t>();
            auto st = key_state_from_name(jv.at("state").get<std::string>());
            if (!st) throw FormatError("unknown key state");
            v.state = *st;
            v.created = jv.at("created").get<std::int64_t>();
            v.valid_from = jv.at("valid_from").get<std::int64_t>();
            v.valid_until = get_opt_int(jv.at("valid_until"));
            std::string kt = jv.at("key_type").get<std::string>();
            v.key_type = key_kind_of(r.id.kind);
            if (kt != key_kind_name(v.key_type))
                throw IntegrityError("key type " + kt + " does not match the ring's kind");
            v.key_length = jv.at("key_length").get<std::uint32_t>();
            v.protection = jv.at("protection").get<std::string>();
            if (!jv.at("wrapped").is_null()) v.wrapped = unb64(jv.at("wrapped"), "wrapped key");
            auto kcv = from_hex(jv.at("kcv").get<std::string>());
            if (!kcv) throw FormatError("bad key check value");
            v.kcv = *kcv;
            if (jv.contains("public")) v.public_key = unb64(jv.at("public"), "public key");
            r.versions.push_back(std::move(v));
        }
        return r;
    } catch (const json::exception& e) {
        throw FormatError(std::string("key ring: missing or mistyped field: ") + e.what());
    }
}

namespace {
// Base64 text into `out`; false if it is not base64.
bool base64_into(std::string_view text, Bytes& out) {
    auto b = from_base64(std::string(text));
    if (!b) return false;
    out = std::move(*b);
    return true;
}
}  // namespace

std::optional<KeyRing> ring_from_text(std::string_view body, const std::string& store_id) {
    StrictJson s(body);
    KeyRing r;
    // client_id is not read from the file (as in ring_from_json).
    std::optional<std::string_view> client_id;
    if (!s.lit("{\"client_id\":") || !s.null_or_str(client_id) || !s.lit(",\"current\":") ||
        !s.null_or_num(r.current))
        return std::nullopt;
    if (!s.lit(",\"format\":" + std::to_string(kRingFormat) + ",\"key_id\":")) return std::nullopt;
    auto key_id = s.str();
    if (!key_id || !s.lit(",\"kind\":")) return std::nullopt;
    auto kind_name = s.str();
    if (!kind_name || !s.lit(",\"store_id\":")) return std::nullopt;
    auto sid = s.str();
    if (!sid || *sid != store_id || !s.lit(",\"versions\":[")) return std::nullopt;
    try {
        r.id = KeyId::parse(std::string(*key_id));
    } catch (const Error&) {
        return std::nullopt;
    }
    auto kind = ring_kind_from_name(std::string(*kind_name));
    if (!kind || *kind != r.id.kind) return std::nullopt;
    const KeyKind key_type = key_kind_of(r.id.kind);
    for (bool first = true; !s.lit("]}"); first = false) {
        if (!first && !s.lit(",")) return std::nullopt;
        KeyVersion v;
        if (!s.lit("{\"created\":")) return std::nullopt;
        auto created = s.num<std::int64_t>();
        if (!created || !s.lit(",\"kcv\":")) return std::nullopt;
        auto kcv = s.str();
        if (!kcv || !s.lit(",\"key_length\":")) return std::nullopt;
        auto key_length = s.num<std::uint32_t>();
        if (!key_length || !s.lit(",\"key_type\":")) return std::nullopt;
        auto kt = s.str();
        if (!kt || *kt != key_kind_name(key_type) || !s.lit(",\"protection\":")) return std::nullopt;
        auto protection = s.str();
        if (!protection) return std::nullopt;
        if (s.lit(",\"public\":")) {
            auto pub = s.str();
            if (!pub || !base64_into(*pub, v.public_key)) return std::nullopt;
        }
        if (!s.lit(",\"state\":")) return std::nullopt;
        auto state = s.str();
        if (!state || !s.lit(",\"valid_from\":")) return std::nullopt;
        auto valid_from = s.num<std::int64_t>();
        if (!valid_from || !s.lit(",\"valid_until\":")) return std::nullopt;
        if (!s.null_or_num(v.valid_until) || !s.lit(",\"version\":")) return std::nullopt;
        auto version = s.num<std::uint32_t>();
        if (!version || !s.lit(",\"wrapped\":")) return std::nullopt;
        std::optional<std::string_view> wrapped;
        if (!s.null_or_str(wrapped) || (wrapped && !base64_into(*wrapped, v.wrapped)) || !s.lit("}"))
            return std::nullopt;
        auto st = key_state_from_name(std::string(*state));
        auto kcv_bytes = from_hex(std::string(*kcv));
        if (!st || !kcv_bytes) return std::nullopt;
        v.version = *version;
        v.state = *st;
        v.created = *created;
        v.valid_from = *valid_from;
        v.key_type = key_type;
        v.key_length = *key_length;
        v.protection = std::string(*protection);
        v.kcv = std::move(*kcv_bytes);
        r.versions.push_back(std::move(v));
    }
    if (!s.at_end()) return std::nullopt;
    return r;
}

KeyRing ring_from_body(std::span<const std::uint8_t> file, const std::string& store_id, const std::string& what) {
    std::uint32_t n = get_u32(file.data() + 10);
    std::string_view body(reinterpret_cast<const char*>(file.data()) + kHeaderSize, n);
    if (auto r = ring_from_text(body, store_id)) return std::move(*r);
    return ring_from_json(parse_body(file, what), store_id);
}

RingSummary summarize(const KeyRing& r) {
    RingSummary s{r.id.str(), r.id.kind, r.id.client_id, {}, {}};
    for (const auto& v : r.versions)
        s.versions.push_back({v.version, v.state, v.created, v.valid_from, v.valid_until,
                              r.current && *r.current == v.version});
    return s;
}

bool same_summary(const RingSummary& a, const RingSummary& b) {
    if (a.key_id != b.key_id || a.kind != b.kind || a.client_id != b.client_id ||
        a.versions.size() != b.versions.size())
        return false;
    for (std::size_t i = 0; i < a.versions.size(); ++i) {
        const auto &x = a.versions[i], &y = b.versions[i];
        if (x.version != y.version || x.state != y.state || x.created != y.created ||
            x.valid_from != y.valid_from || x.valid_until != y.valid_until ||
            x.current != y.current)
            return false;
    }
    return true;
}

namespace {
std::string quoted(const std::string& s) {
    std::string out;
    append_json_string(out, s);
    return out;
}
std::string opt_text(const std::optional<std::int64_t>& v) { return v ? std::to_string(*v) : "null"; }

ManifestEntry entry_from_json(const std::string& id, const json& e) {
    ManifestEntry me;
    KeyId kid = KeyId::parse(id);
    me.file = e.at("file").get<std::string>();
    if (me.file != kid.file()) throw IntegrityError("manifest names a wrong file for " + id);
    me.sha256 = e.at("sha256").get<std::string>();
    me.summary.key_id = id;
    me.summary.kind = kid.kind;
    me.summary.client_id = kid.client_id;
    for (const auto& v : e.at("versions")) {
        auto st = key_state_from_name(v.at("state").get<std::string>());
        if (!st) throw FormatError("unknown key state in manifest");
        me.summary.versions.push_back({v.at("version").get<std::uint32_t>(), *st,
                                       v.at("created").get<std::int64_t>(),
                                       v.at("valid_from").get<std::int64_t>(),
                                       get_opt_int(v.at("valid_until")), v.at("current").get<bool>()});
    }
    return me;
}
}  // namespace

// A manifest member's value in exactly manifest_member's form, without a JSON tree; nullopt for
// anything else (left to entry_from_json, which gives the errors).
std::optional<ManifestEntry> entry_from_text(const std::string& id, std::string_view text) {
    StrictJson s(text);
    ManifestEntry me;
    KeyId kid;
    try {
        kid = KeyId::parse(id);
    } catch (const Error&) {
        return std::nullopt;
    }
    if (!s.lit("{\"file\":")) return std::nullopt;
    auto file = s.str();
    if (!file || *file != kid.file() || !s.lit(",\"kind\":")) return std::nullopt;
    // The kind written is the key id's: anything else is not the written form.
    auto kind = s.str();
    if (!kind || *kind != ring_kind_name(kid.kind) || !s.lit(",\"sha256\":")) return std::nullopt;
    auto sha = s.str();
    if (!sha || !s.lit(",\"versions\":[")) return std::nullopt;
    me.file = std::string(*file);
    me.sha256 = std::string(*sha);
    me.summary.key_id = id;
    me.summary.kind = kid.kind;
    me.summary.client_id = kid.client_id;
    for (bool first = true; !s.lit("]}"); first = false) {
        if (!first && !s.lit(",")) return std::nullopt;
        if (!s.lit("{\"created\":")) return std::nullopt;
        auto created = s.num<std::int64_t>();
        if (!created || !s.lit(",\"current\":")) return std::nullopt;
        auto current = s.boolean();
        if (!current || !s.lit(",\"state\":")) return std::nullopt;
        auto state = s.str();
        if (!state || !s.lit(",\"valid_from\":")) return std::nullopt;
        auto valid_from = s.num<std::int64_t>();
        if (!valid_from || !s.lit(",\"valid_until\":")) return std::nullopt;
        std::optional<std::int64_t> valid_until;
        if (!s.null_or_num(valid_until) || !s.lit(",\"version\":")) return std::nullopt;
        auto version = s.num<std::uint32_t>();
        if (!version || !s.lit("}")) return std::nullopt;
        auto st = key_state_from_name(std::string(*state));
        if (!st) return std::nullopt;
        me.summary.versions.push_back({*version, *st, *created, *valid_from, valid_until, *current});
    }
    if (!s.at_end()) return std::nullopt;
    return me;
}
std::string manifest_prefix(const ManifestData& m) {
    return "{\"format\":" + std::to_string(kManifestFormat) + ",\"generation\":" + std::to_string(m.generation) +
           ",\"meta_sha256\":" + quoted(m.meta_sha256) + ",\"rings\":{";
}

std::string manifest_suffix(const ManifestData& m) { return "},\"store_id\":" + quoted(m.store_id) + "}"; }

std::string manifest_member(const std::string& id, const ManifestEntry& e) {
    std::string out = quoted(id) + ":{\"file\":" + quoted(e.file) + ",\"kind\":" +
                      quoted(ring_kind_name(e.summary.kind)) + ",\"sha256\":" + quoted(e.sha256) + ",\"versions\":[";
    bool first = true;
    for (const auto& v : e.summary.versions) {
        if (!first) out += ',';
        first = false;
        out += "{\"created\":" + std::to_string(v.created) + ",\"current\":" + (v.current ? "true" : "false") +
               ",\"state\":" + quoted(key_state_name(v.state)) + ",\"valid_from\":" + std::to_string(v.valid_from) +
               ",\"valid_until\":" + opt_text(v.valid_until) + ",\"version\":" + std::to_string(v.version) + "}";
    }
    out += "]}";
    return out;
}

std::string manifest_body(const ManifestData& m) {
    std::string out;
    out.reserve(128 + m.rings.size() * 300);
    out += manifest_prefix(m);
    bool first = true;
    for (const auto& [id, e] : m.rings) {
        if (!first) out += ',';
        first = false;
        out += manifest_member(id, e);
    }
    out += manifest_suffix(m);
    return out;
}

// Through the streaming scanner, so a loaded manifest takes the same text fast path (and the
// same checks, such as the rings' order) as a streamed one: with 20,000 rings the JSON parser
// took most of a `read`'s time. No MAC here: the caller checked the frame and the tag. No
// SHA-256 and no limit on a member's size either (in_memory).
ManifestData parse_manifest_body(std::span<const std::uint8_t> file) {
    ManifestScanner scan(std::make_unique<Storage::MemoryReader>(file), nullptr, {}, {}, true);
    std::map<std::string, ManifestEntry> rings;
    try {
        while (auto e = scan.next()) rings.emplace_hint(rings.end(), std::move(e->first), std::move(e->second));
    } catch (const IntegrityError& e) {
        // The frame's length and the MAC were checked before: a body that ends early was
        // written so, which is a format error, not a truncated file.
        throw FormatError(std::string("manifest: the signed body ends early (") + e.what() + ")");
    }
    ManifestData m = scan.top();  // store_id, generation, meta_sha256
    m.rings = std::move(rings);
    return m;
}

// ---- the manifest, streamed ------------------------------------------------------------------

struct ManifestScanner::Hash {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    ~Hash() { EVP_MD_CTX_free(ctx); }
};

ManifestScanner::ManifestScanner(std::unique_ptr<Storage::Reader> in, MacKey::Stream* mac, std::string_view domain,
                                 const std::string& binding, bool in_memory)
    : m_in(std::move(in)), m_mac(mac), m_hash(std::make_unique<Hash>()), m_buf(256 * 1024), m_in_memory(in_memory) {
    if (!m_in_memory && (!m_hash->ctx || EVP_DigestInit_ex(m_hash->ctx, EVP_sha256(), nullptr) != 1))
        throw Error("SHA-256 is not available");
    if (m_mac) {
        static const std::uint8_t zero = 0;
        m_mac->update({reinterpret_cast<const std::uint8_t*>(domain.data()), domain.size()});
        m_mac->update({&zero, 1});
        m_mac->update({reinterpret_cast<const std::uint8_t*>(binding.data()), binding.size()});
        m_mac->update({&zero, 1});
    }
    // The header: magic, format, body length (section 7.1).
    std::uint8_t h[kHeaderSize];
    for (std::size_t i = 0; i < kHeaderSize; ++i) {
        int c = get();
        if (c < 0) throw IntegrityError("manifest is truncated");
        h[i] = static_cast<std::uint8_t>(c);
    }
    m_signed_end = kHeaderSize + std::uint64_t{check_header(h, kManifestMagic, kManifestFormat, "manifest")};
}

ManifestScanner::~ManifestScanner() = default;

// More of the file into the buffer (keeping what is not consumed). Every byte read goes into
// the SHA-256; the MAC gets the signed part as it is consumed (feed_mac).
void ManifestScanner::feed_mac() {
    if (!m_mac) return;
    std::uint64_t upto = m_file_off + m_pos;
    if (m_signed_end) upto = std::min(upto, m_signed_end);
    if (upto <= m_mac_done) return;
    m_mac->update({m_buf.data() + (m_mac_done - m_file_off), static_cast<std::size_t>(upto - m_mac_done)});
    m_mac_done = upto;
}

std::size_t ManifestScanner::fill() {
    feed_mac();  // before the consumed bytes leave the buffer
    if (m_pos > 0) {
        std::memmove(m_buf.data(), m_buf.data() + m_pos, m_len - m_pos);
        m_file_off += m_pos;
        m_len -= m_pos;
        m_pos = 0;
    }
    std::size_t got = m_in->read(m_buf.data() + m_len, m_buf.size() - m_len);
    if (got == 0) return 0;
    if (!m_in_memory && EVP_DigestUpdate(m_hash->ctx, m_buf.data() + m_len, got) != 1) throw Error("SHA-256 failed");
    m_len += got;
    return got;
}

bool ManifestScanner::drain() {
    if (m_signed_end == 0) return false;  // the header itself was bad
    for (;;) {
        std::uint64_t have = m_file_off + m_len;
        m_pos = static_cast<std::size_t>(std::min(have, m_signed_end) - m_file_off);
        if (have > m_signed_end + kMacSize) break;  // longer than the header says: enough seen
        if (fill() == 0) break;
    }
    feed_mac();
    if (m_file_off + m_len != m_signed_end + kMacSize) return false;
    m_tag.assign(m_buf.data() + (m_signed_end - m_file_off), m_buf.data() + m_len);
    return true;
}

// The next byte of the signed part (the header, then the body), or -1 at its end.
int ManifestScanner::peek() {
    if (m_signed_end && m_file_off + m_pos >= m_signed_end) return -1;
    if (m_pos == m_len) fill();
    if (m_pos == m_len) return -1;
    return m_buf[m_pos];
}

int ManifestScanner::get() {
    int c = peek();
    if (c >= 0) ++m_pos;
    return c;
}

void ManifestScanner::skip_ws() {
    for (int c = peek(); c == ' ' || c == '\n' || c == '\r' || c == '\t'; c = peek()) ++m_pos;
}

void ManifestScanner::expect(char want) {
    skip_ws();
    int c = get();
    if (c < 0) throw IntegrityError("manifest is truncated");
    if (c != want) throw FormatError(std::string("manifest: expected '") + want + "' in the body");
}

// The raw text of one JSON value (string, object, array or literal), for json::parse.
std::string ManifestScanner::value_text() {
    skip_ws();
    std::string out;
    int depth = 0, first = -1;
    bool in_string = false, escaped = false;
    for (;;) {
        if (peek() < 0) throw IntegrityError("manifest is truncated");  // fills the buffer
        std::size_t end = m_len;
        if (m_signed_end) end = static_cast<std::size_t>(std::min<std::uint64_t>(end, m_signed_end - m_file_off));
        std::size_t i = m_pos;
        bool done = false;
        for (; i < end && !done; ++i) {
            int c = m_buf[i];
            if (first < 0) {
                first = c;
            } else if (!in_string && depth == 0 && first != '"' && first != '{' && first != '[' &&
                       (c == ',' || c == '}' || c == ']' || c == ' ' || c == '\n')) {
                done = true;  // the end of a number or literal; c is not part of it
                break;
            }
            if (in_string) {
                if (escaped) escaped = false;
                else if (c == '\\') escaped = true;
                else if (c == '"') {
                    in_string = false;
                    done = depth == 0;
                }
            } else if (c == '"') {
                in_string = true;
            } else if (c == '{' || c == '[') {
                ++depth;
            } else if (c == '}' || c == ']') {
                if (--depth < 0) throw FormatError("manifest: unbalanced JSON in the body");
                done = depth == 0;
            }
        }
        out.append(reinterpret_cast<const char*>(m_buf.data()) + m_pos, i - m_pos);
        m_pos = i;
        // A real member is a few hundred bytes per version; a damaged file must not make the
        // scanner hold it whole.
        if (!m_in_memory && out.size() > kMaxValue) throw FormatError("manifest: a member is too large");
        if (done) return out;
    }
}

std::string ManifestScanner::key() {
    std::string text = value_text();
    if (text.empty() || text.front() != '"') throw FormatError("manifest: expected a member name in the body");
    std::string k;
    if (auto plain = StrictJson(text).str(); plain && plain->size() + 2 == text.size()) k = std::string(*plain);
    else k = json::parse(text).get<std::string>();
    expect(':');
    return k;
}

namespace {
// The manifest body's top-level fields besides "rings"; bit i of ManifestScanner::m_seen is
// kTopFields[i].
constexpr const char* kTopFields[] = {"format", "generation", "store_id", "meta_sha256"};
}  // namespace

void ManifestScanner::top_member(const std::string& name) {
    json v = json::parse(value_text());
    if (name == "store_id") m_top.store_id = v.get<std::string>();
    else if (name == "generation") m_top.generation = v.get<std::uint64_t>();
    else if (name == "meta_sha256") m_top.meta_sha256 = v.get<std::string>();
    else if (name == "format" && v.get<int>() != kManifestFormat) throw FormatError("manifest body has another format");
    for (unsigned i = 0; i < std::size(kTopFields); ++i)
        if (name == kTopFields[i]) m_seen |= 1u << i;
}

// After the rings: the remaining top-level members, the end of the body, the tag, the end.
void ManifestScanner::finish() {
    for (;;) {
        skip_ws();
        int c = get();
        if (c == '}') break;
        if (c < 0) throw IntegrityError("manifest is truncated");
        if (c != ',') throw FormatError("manifest: bad body");
        std::string name = key();
        if (name == "rings") throw FormatError("manifest: two ring lists");
        top_member(name);
    }
    skip_ws();
    if (peek() >= 0) throw FormatError("manifest: data after the body");
    feed_mac();
    // The tag, then nothing.
    m_pos = static_cast<std::size_t>(m_signed_end - m_file_off);
    while (m_len - m_pos < kMacSize + 1) {
        std::size_t before = m_len;
        fill();
        if (m_len == before) break;
    }
    if (m_pos > m_len || m_len - m_pos < kMacSize) throw IntegrityError("manifest is truncated");
    if (m_len - m_pos > kMacSize)
        throw IntegrityError("manifest has a length that does not match its header (truncated or extended)");
    m_tag.assign(m_buf.data() + m_pos, m_buf.data() + m_len);
    m_pos = m_len;
    if (!m_in_memory) {
        m_sha.resize(32);
        unsigned int n = 0;
        if (EVP_DigestFinal_ex(m_hash->ctx, m_sha.data(), &n) != 1 || n != 32) throw Error("SHA-256 failed");
    }
    for (unsigned i = 0; i < std::size(kTopFields); ++i)
        if (!(m_seen & (1u << i))) throw FormatError(std::string("manifest: missing field: ") + kTopFields[i]);
    if (m_top.store_id.empty() || m_top.meta_sha256.empty())
        throw FormatError("manifest: missing or mistyped field: store_id or meta_sha256");
    m_state = 2;
}

std::optional<std::pair<std::string, ManifestEntry>> ManifestScanner::next() { return read_next(true); }

std::optional<std::string> ManifestScanner::skip_next() {
    auto e = read_next(false);
    if (!e) return std::nullopt;
    return std::move(e->first);
}

std::optional<std::pair<std::string, ManifestEntry>> ManifestScanner::read_next(bool parse_entry) {
    try {
        if (m_state == 0) {
            // The members before "rings" (as written: format, generation, meta_sha256; any order
            // is read, and finish() checks that all four top-level fields came).
            expect('{');
            for (bool first = true;; first = false) {
                if (!first) expect(',');
                std::string name = key();
                if (name == "rings") break;
                top_member(name);
            }
            expect('{');
            skip_ws();
            if (peek() == '}') {
                ++m_pos;
                finish();
                return std::nullopt;
            }
            m_state = 1;
        }
        if (m_state == 2) return std::nullopt;
        std::string id = key();
        if (!m_last_id.empty() && !(m_last_id < id))
            throw FormatError("manifest: the rings are not in key id order (" + id + ")");
        m_last_id = id;
        std::string text = value_text();
        ManifestEntry entry;
        if (parse_entry) {
            auto fast = entry_from_text(id, text);
            entry = fast ? std::move(*fast) : entry_from_json(id, json::parse(text));
        }
        skip_ws();
        int c = get();
        if (c == '}') finish();
        else if (c < 0) throw IntegrityError("manifest is truncated");
        else if (c != ',') throw FormatError("manifest: bad body");
        return std::make_pair(std::move(id), std::move(entry));
    } catch (const json::exception& e) {
        throw FormatError(std::string("manifest: missing or mistyped field: ") + e.what());
    }
}

json meta_to_json(const StoreMeta& m) {
    auto key = [](const MasterKeyRecord& k) {
        return json{{"label", k.label}, {"id", to_hex(k.id)}, {"kcv", to_hex(k.kcv)}};
    };
    return {{"format", m.format},
            {"store_version", m.store_version},
            {"store_id", m.store_id},
            {"created", m.created},
            {"token", {{"serial", m.token_serial}, {"label", m.token_label}, {"model", m.token_model}}},
            {"protection", m.protection},
            {"master_keys", {{"encryption", key(m.encryption)}, {"signature", key(m.signature)}}}};
}

StoreMeta meta_from_json(const json& j) {
    try {
        StoreMeta m;
        m.format = j.at("format").get<int>();
        if (m.format != 1)
            throw FormatError("store.json has format " + std::to_string(m.format) +
                                  "; this keywarden reads format 1",
                              "upgrade keywarden");
        m.store_version = j.value("store_version", 2);
        m.store_id = j.at("store_id").get<std::string>();
        if (m.store_id.size() != 32 || !from_hex(m.store_id))
            throw FormatError("store.json has a malformed store id");
        m.created = j.at("created").get<std::int64_t>();
        m.token_serial = j.at("token").at("serial").get<std::string>();
        m.token_label = j.at("token").at("label").get<std::string>();
        m.token_model = j.at("token").at("model").get<std::string>();
        m.protection = j.at("protection").get<std::string>();
        auto key = [](const json& k) {
            MasterKeyRecord r;
            r.label = k.at("label").get<std::string>();
            auto id = from_hex(k.at("id").get<std::string>());
            auto kcv = from_hex(k.at("kcv").get<std::string>());
            if (!id || !kcv) throw FormatError("store.json: bad master key id or check value");
            r.id = *id;
            r.kcv = *kcv;
            return r;
        };
        m.encryption = key(j.at("master_keys").at("encryption"));
        m.signature = key(j.at("master_keys").at("signature"));
        return m;
    } catch (const json::exception& e) {
        throw FormatError(std::string("store.json: missing or mistyped field: ") + e.what());
    }
}

}  // namespace keywarden::keystore::detail

namespace keywarden {

void append_json_string(std::string& out, std::string_view v) {
    if (!append_plain_json_string(out, v)) out += nlohmann::json(std::string(v)).dump();
}

}  // namespace keywarden
