// SPDX-License-Identifier: Apache-2.0
// Token enumeration, RFC 7512 URIs and token selection.
#include <cstring>
#include <ctime>

#include "keywarden/pkcs11.hpp"

namespace keywarden::pkcs11 {

namespace {
std::optional<CK_ULONG> known(CK_ULONG v) {
    if (v == CK_UNAVAILABLE_INFORMATION) return std::nullopt;
    return v;
}
}  // namespace

void get_token_info(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, CK_TOKEN_INFO& out) {
    // SoftHSM 2.6.1 workaround: while another process logs in or changes objects, SoftHSM may
    // be re-reading the token's files and answer CKR_GENERAL_ERROR (seen with two processes
    // generating keys at once). C_GetTokenInfo changes nothing, so asking again is safe; the
    // same is never done for C_Login.
    CK_RV rv = CKR_OK;
    for (int attempt = 0; attempt < 8; ++attempt) {
        rv = try_call("C_GetTokenInfo", fn->C_GetTokenInfo, slot, &out);
        if (rv != CKR_GENERAL_ERROR) break;
        struct timespec ts {0, 25'000'000L * (attempt + 1)};
        nanosleep(&ts, nullptr);
    }
    if (rv != CKR_OK) throw Pkcs11Error("C_GetTokenInfo", rv);
}

TokenInfo token_info(const Module& m, CK_SLOT_ID slot) {
    TokenInfo t;
    t.slot = slot;
    KW_P11_CALL(m.fn(), C_GetSlotInfo, slot, &t.raw_slot);
    t.slot_description =
        trim_field(t.raw_slot.slotDescription, sizeof t.raw_slot.slotDescription);
    t.slot_flags = t.raw_slot.flags;
    t.token_present = (t.raw_slot.flags & CKF_TOKEN_PRESENT) != 0;
    if (!t.token_present) return t;
    get_token_info(m.fn(), slot, t.raw);
    t.label = trim_field(t.raw.label, sizeof t.raw.label);
    t.manufacturer = trim_field(t.raw.manufacturerID, sizeof t.raw.manufacturerID);
    t.model = trim_field(t.raw.model, sizeof t.raw.model);
    t.serial = trim_field(t.raw.serialNumber, sizeof t.raw.serialNumber);
    t.flags = t.raw.flags;
    t.initialized = (t.raw.flags & CKF_TOKEN_INITIALIZED) != 0;
    t.sessions_total = known(t.raw.ulMaxSessionCount);
    t.rw_sessions_total = known(t.raw.ulMaxRwSessionCount);
    // CK_EFFECTIVELY_INFINITE (0) as a maximum means no limit: report no free count then.
    if (t.raw.ulMaxSessionCount != CK_EFFECTIVELY_INFINITE && t.sessions_total &&
        known(t.raw.ulSessionCount))
        t.sessions_free = *t.sessions_total - t.raw.ulSessionCount;
    if (t.raw.ulMaxRwSessionCount != CK_EFFECTIVELY_INFINITE && t.rw_sessions_total &&
        known(t.raw.ulRwSessionCount))
        t.rw_sessions_free = *t.rw_sessions_total - t.raw.ulRwSessionCount;
    return t;
}

std::vector<TokenInfo> list_tokens(const Module& m) {
    std::vector<TokenInfo> out;
    for (CK_SLOT_ID s : m.slots(false)) out.push_back(token_info(m, s));
    return out;
}

// ---- URIs ----------------------------------------------------------------------------------

Uri Uri::parse(const std::string& text) {
    P11KitUri* u = p11_kit_uri_new();
    if (!u) throw std::bad_alloc();
    int rc = p11_kit_uri_parse(text.c_str(), P11_KIT_URI_FOR_ANY, u);
    if (rc != P11_KIT_URI_OK) {
        p11_kit_uri_free(u);
        throw UsageError("cannot parse PKCS#11 URI: " + std::string(p11_kit_uri_message(rc)),
                         "a URI looks like pkcs11:token=NAME;object=LABEL;type=secret-key "
                         "(RFC 7512)");
    }
    Uri uri(u);
    if (p11_kit_uri_get_pin_value(u) != nullptr)
        throw UsageError("the URI carries a pin-value; keywarden never takes a PIN from the "
                         "command line",
                         "use pin-source=file:/path in the URI, or --pin-source env:VAR");
    return uri;
}

Uri::Uri(Uri&& o) noexcept : m_uri(o.m_uri) { o.m_uri = nullptr; }
Uri& Uri::operator=(Uri&& o) noexcept {
    std::swap(m_uri, o.m_uri);
    return *this;
}
Uri::~Uri() {
    if (m_uri) p11_kit_uri_free(m_uri);
}

bool Uri::matches_token(const CK_TOKEN_INFO& info) const {
    return p11_kit_uri_match_token_info(m_uri, const_cast<CK_TOKEN_INFO*>(&info)) == 1;
}

std::span<CK_ATTRIBUTE> Uri::object_attributes() const {
    CK_ULONG n = 0;
    CK_ATTRIBUTE* a = p11_kit_uri_get_attributes(m_uri, &n);
    return {a, static_cast<std::size_t>(n)};
}

namespace {
std::optional<std::string> opt(const char* s) {
    if (!s) return std::nullopt;
    return std::string(s);
}
}  // namespace

std::optional<std::string> Uri::pin_source() const { return opt(p11_kit_uri_get_pin_source(m_uri)); }
std::optional<std::string> Uri::module_path() const { return opt(p11_kit_uri_get_module_path(m_uri)); }
std::optional<std::string> Uri::module_name() const { return opt(p11_kit_uri_get_module_name(m_uri)); }

// ---- selection -----------------------------------------------------------------------------

std::string describe_tokens(const std::vector<TokenInfo>& tokens) {
    std::string out;
    for (const auto& t : tokens) {
        if (!t.token_present || !t.initialized) continue;
        out += "  label '" + t.label + "', serial " + t.serial + ", model " + t.model + "\n";
    }
    if (out.empty()) return "  (no initialised token)\n";
    return out;
}

TokenInfo select_token(const std::vector<TokenInfo>& tokens, const std::string& spec) {
    std::vector<const TokenInfo*> matches;
    std::optional<Uri> uri;
    enum class By { any, uri, label, serial, both } by = By::any;
    std::string value = spec;
    if (spec.starts_with("pkcs11:")) {
        uri.emplace(Uri::parse(spec));
        by = By::uri;
    } else if (spec.starts_with("label:")) {
        by = By::label;
        value = spec.substr(6);
    } else if (spec.starts_with("serial:")) {
        by = By::serial;
        value = spec.substr(7);
    } else if (!spec.empty()) {
        by = By::both;
    }
    for (const auto& t : tokens) {
        if (!t.token_present || !t.initialized) continue;
        bool ok = false;
        switch (by) {
            case By::any: ok = true; break;
            case By::uri: ok = uri->matches_token(t.raw); break;
            case By::label: ok = t.label == value; break;
            case By::serial: ok = t.serial == value; break;
            case By::both: ok = t.label == value || t.serial == value; break;
        }
        if (ok) matches.push_back(&t);
    }
    if (matches.size() == 1) return *matches.front();
    std::string present = "tokens present:\n" + describe_tokens(tokens);
    if (matches.empty()) {
        if (spec.empty())
            throw TokenError("no initialised token found", present +
                                 "initialise one (e.g. softhsm2-util --init-token --free "
                                 "--label NAME) or check --module");
        throw TokenError("no token matches '" + spec + "'",
                         present + "select one with --token label:NAME, serial:NUMBER or a "
                                   "pkcs11: URI");
    }
    throw TokenError(
        spec.empty() ? "more than one token found and none was selected"
                     : "more than one token matches '" + spec + "'",
        present + "keywarden does not guess: select one with --token serial:NUMBER or a "
                  "pkcs11: URI naming the serial");
}

void check_login_allowed(CK_FLAGS flags, const std::string& label) {
    if (flags & CKF_USER_PIN_LOCKED)
        throw TokenError("the user PIN of token '" + label + "' is locked (CKF_USER_PIN_LOCKED)",
                         "the security officer must reset it with the token's own tool "
                         "(e.g. pkcs11-tool --init-pin --login --login-type so)");
    if (flags & CKF_USER_PIN_FINAL_TRY)
        throw TokenError("token '" + label +
                             "' reports that one more wrong PIN locks it "
                             "(CKF_USER_PIN_FINAL_TRY); keywarden will not risk the last try",
                         "log in once with the token's own tool to confirm the PIN, which "
                         "resets the counter, then run keywarden again");
    if (flags & CKF_USER_PIN_TO_BE_CHANGED)
        throw TokenError("token '" + label + "' requires the user PIN to be changed "
                                             "(CKF_USER_PIN_TO_BE_CHANGED)",
                         "change it with the token's own tool (e.g. pkcs11-tool "
                         "--change-pin), then run keywarden again");
}

}  // namespace keywarden::pkcs11
