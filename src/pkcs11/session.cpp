// SPDX-License-Identifier: Apache-2.0
#include <algorithm>
#include <array>
#include <cstring>

#include "keywarden/pkcs11.hpp"

namespace keywarden::pkcs11 {

// ---- Template ------------------------------------------------------------------------------

Template::~Template() {
    for (auto& [p, n] : m_values) wipe(p.get(), n);
    wipe(m_arena, m_used);
}

void* Template::store(const void* p, std::size_t n) {
    if (m_attrs.capacity() == 0) m_attrs.reserve(12);
    // Keep CK_ULONG values aligned.
    std::size_t at = (m_used + alignof(CK_ULONG) - 1) & ~(alignof(CK_ULONG) - 1);
    if (at + n <= sizeof m_arena) {
        if (n) std::memcpy(m_arena + at, p, n);
        m_used = at + n;
        return m_arena + at;
    }
    auto buf = std::make_unique<std::uint8_t[]>(n == 0 ? 1 : n);
    if (n) std::memcpy(buf.get(), p, n);
    void* out = buf.get();
    m_values.emplace_back(std::move(buf), n);
    return out;
}

Template& Template::add_bool(CK_ATTRIBUTE_TYPE t, bool v) {
    CK_BBOOL b = v ? CK_TRUE : CK_FALSE;
    m_attrs.push_back({t, store(&b, sizeof b), sizeof b});
    return *this;
}

Template& Template::add_ulong(CK_ATTRIBUTE_TYPE t, CK_ULONG v) {
    m_attrs.push_back({t, store(&v, sizeof v), sizeof v});
    return *this;
}

Template& Template::add_bytes(CK_ATTRIBUTE_TYPE t, std::span<const std::uint8_t> v) {
    m_attrs.push_back({t, store(v.data(), v.size()), static_cast<CK_ULONG>(v.size())});
    return *this;
}

Template& Template::add_string(CK_ATTRIBUTE_TYPE t, std::string_view v) {
    m_attrs.push_back({t, store(v.data(), v.size()), static_cast<CK_ULONG>(v.size())});
    return *this;
}

// ---- SessionObject -------------------------------------------------------------------------

SessionObject& SessionObject::operator=(SessionObject&& o) noexcept {
    if (this != &o) {
        reset();
        m_session = std::move(o.m_session);
        m_handle = o.m_handle;
        o.m_handle = CK_INVALID_HANDLE;
    }
    return *this;
}

void SessionObject::reset() noexcept {
    // Some tokens ignore CKA_TOKEN=false and keep every object; destroy explicitly. After a
    // module restart the object is gone, and its handle may now be another object's.
    if (m_session && m_handle != CK_INVALID_HANDLE && m_session->live())
        try_call("C_DestroyObject", m_session->fn()->C_DestroyObject, m_session->handle(),
                 m_handle);
    m_handle = CK_INVALID_HANDLE;
}

CK_OBJECT_HANDLE SessionObject::release() noexcept {
    CK_OBJECT_HANDLE h = m_handle;
    m_handle = CK_INVALID_HANDLE;
    return h;
}

// ---- Session -------------------------------------------------------------------------------

std::shared_ptr<Session> Session::open(std::shared_ptr<Module> m, CK_SLOT_ID slot, bool rw) {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    CK_FLAGS flags = CKF_SERIAL_SESSION | (rw ? CKF_RW_SESSION : 0);
    KW_P11_CALL(m->fn(), C_OpenSession, slot, flags, static_cast<void*>(nullptr),
                static_cast<CK_NOTIFY>(nullptr), &h);
    std::uint64_t gen = m->generation();
    return std::shared_ptr<Session>(new Session(std::move(m), slot, h, gen));
}

Session::~Session() {
    // A session from before a module restart is gone already; its handle may now be another's.
    if (live()) try_call("C_CloseSession", fn()->C_CloseSession, m_handle);
}

void Session::throw_stale() const {
    throw Error("internal: a PKCS#11 session was used after the module was restarted");
}

void Session::login(const SecureBytes& pin) {
    CK_TOKEN_INFO ti{};
    get_token_info(fn(), m_slot, ti);
    check_login_allowed(ti.flags, trim_field(ti.label, sizeof ti.label));
    // One attempt only: a retry after CKR_PIN_INCORRECT would burn another try of the
    // token's counter (pkcs11-provider's session.c does the same).
    CK_RV rv = try_call("C_Login", fn()->C_Login, handle(), static_cast<CK_USER_TYPE>(CKU_USER),
                        const_cast<CK_UTF8CHAR*>(pin.data()), static_cast<CK_ULONG>(pin.size()));
    if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) return;
    throw Pkcs11Error("C_Login", rv);
}

const std::vector<CK_MECHANISM_TYPE>& Session::mechanisms() {
    if (!m_mechanisms) {
        CK_ULONG n = 0;
        KW_P11_CALL(fn(), C_GetMechanismList, m_slot, static_cast<CK_MECHANISM_TYPE*>(nullptr),
                    &n);
        std::vector<CK_MECHANISM_TYPE> v(n);
        KW_P11_CALL(fn(), C_GetMechanismList, m_slot, v.data(), &n);
        v.resize(n);
        m_mechanisms = std::move(v);
    }
    return *m_mechanisms;
}

bool Session::has_mechanism(CK_MECHANISM_TYPE m) {
    const auto& v = mechanisms();
    return std::find(v.begin(), v.end(), m) != v.end();
}

namespace {
// Closes a search even when C_FindObjects throws.
class FindGuard {
public:
    FindGuard(Session& s, CK_ATTRIBUTE* t, CK_ULONG n) : m_s(s), m_handle(s.handle()) {
        KW_P11_CALL(s.fn(), C_FindObjectsInit, m_handle, t, n);
    }
    // Never throws: a session that went stale meanwhile (a token restart) has no search to end.
    ~FindGuard() {
        if (m_s.live()) try_call("C_FindObjectsFinal", m_s.fn()->C_FindObjectsFinal, m_handle);
    }
    FindGuard(const FindGuard&) = delete;
    FindGuard& operator=(const FindGuard&) = delete;

private:
    Session& m_s;
    CK_SESSION_HANDLE m_handle;
};
}  // namespace

std::vector<CK_OBJECT_HANDLE> Session::find(CK_ATTRIBUTE* templ, CK_ULONG count, std::size_t max) {
    FindGuard guard(*this, templ, count);
    std::vector<CK_OBJECT_HANDLE> out;
    CK_OBJECT_HANDLE batch[16];
    while (out.size() < max) {
        CK_ULONG got = 0;
        KW_P11_CALL(fn(), C_FindObjects, handle(), batch, static_cast<CK_ULONG>(16), &got);
        if (got == 0) break;
        out.insert(out.end(), batch, batch + got);
    }
    if (out.size() > max) out.resize(max);
    return out;
}

std::vector<std::uint8_t> Session::get_bytes(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t) {
    CK_ATTRIBUTE a{t, nullptr, 0};
    KW_P11_CALL(fn(), C_GetAttributeValue, handle(), o, &a, static_cast<CK_ULONG>(1));
    std::vector<std::uint8_t> v(a.ulValueLen);
    a.pValue = v.data();
    KW_P11_CALL(fn(), C_GetAttributeValue, handle(), o, &a, static_cast<CK_ULONG>(1));
    v.resize(a.ulValueLen);
    return v;
}

SecureBytes Session::get_secret(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t) {
    CK_ATTRIBUTE a{t, nullptr, 0};
    KW_P11_CALL(fn(), C_GetAttributeValue, handle(), o, &a, static_cast<CK_ULONG>(1));
    SecureBytes v(a.ulValueLen);
    a.pValue = v.data();
    KW_P11_CALL(fn(), C_GetAttributeValue, handle(), o, &a, static_cast<CK_ULONG>(1));
    v.resize(a.ulValueLen);
    return v;
}

std::optional<CK_ULONG> Session::get_ulong(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t) {
    CK_ULONG v = 0;
    CK_ATTRIBUTE a{t, &v, sizeof v};
    CK_RV rv = KW_P11_TRY(fn(), C_GetAttributeValue, handle(), o, &a, static_cast<CK_ULONG>(1));
    if (rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_SENSITIVE) return std::nullopt;
    if (rv != CKR_OK) throw Pkcs11Error("C_GetAttributeValue", rv);
    return v;
}

std::optional<bool> Session::get_bool(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t) {
    CK_BBOOL v = CK_FALSE;
    CK_ATTRIBUTE a{t, &v, sizeof v};
    CK_RV rv = KW_P11_TRY(fn(), C_GetAttributeValue, handle(), o, &a, static_cast<CK_ULONG>(1));
    if (rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_SENSITIVE) return std::nullopt;
    if (rv != CKR_OK) throw Pkcs11Error("C_GetAttributeValue", rv);
    return v == CK_TRUE;
}

SessionObject Session::generate_key(CK_MECHANISM_TYPE mech, Template& t) {
    CK_MECHANISM m{mech, nullptr, 0};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    KW_P11_CALL(fn(), C_GenerateKey, handle(), &m, t.data(), t.size(), &h);
    return SessionObject(shared_from_this(), h);
}

std::pair<SessionObject, SessionObject> Session::generate_key_pair(CK_MECHANISM_TYPE mech,
                                                                   Template& pub, Template& priv) {
    CK_MECHANISM m{mech, nullptr, 0};
    CK_OBJECT_HANDLE hpub = CK_INVALID_HANDLE, hpriv = CK_INVALID_HANDLE;
    KW_P11_CALL(fn(), C_GenerateKeyPair, handle(), &m, pub.data(), pub.size(), priv.data(),
                priv.size(), &hpub, &hpriv);
    return {SessionObject(shared_from_this(), hpub), SessionObject(shared_from_this(), hpriv)};
}

SessionObject Session::create_object(Template& t) {
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    KW_P11_CALL(fn(), C_CreateObject, handle(), t.data(), t.size(), &h);
    return SessionObject(shared_from_this(), h);
}

std::vector<std::uint8_t> Session::wrap_key(CK_MECHANISM* mech, CK_OBJECT_HANDLE wrapping,
                                            CK_OBJECT_HANDLE key) {
    // One call with a buffer that fits every key this project wraps (an RSA-4096 private key
    // in PKCS#8 under AES key wrap with padding is about 2.4 KiB). A size query first would
    // double the work on SoftHSM, which wraps the key to learn the size. The blob is
    // ciphertext, not a secret; it is copied out at its own size so that callers who keep many
    // blobs do not keep 4 KiB for each.
    constexpr CK_ULONG kMaxBlob = 1u << 20;  // no key wraps to more; a larger answer is a bad token
    auto misreport = [](const std::string& what) {
        return TokenError("the token's C_WrapKey " + what,
                          "this token misreports C_WrapKey's output length; report the token model");
    };
    auto overran = [&](CK_ULONG written, std::size_t buffer) {
        return misreport("reported " + std::to_string(written) + " bytes written into a buffer of " +
                         std::to_string(buffer));
    };
    std::array<std::uint8_t, 4096> first;
    CK_ULONG got = first.size();
    CK_RV rv = KW_P11_TRY(fn(), C_WrapKey, handle(), mech, wrapping, key, first.data(), &got);
    if (rv == CKR_OK && got <= first.size()) return {first.begin(), first.begin() + got};
    if (rv != CKR_OK && rv != CKR_BUFFER_TOO_SMALL) throw Pkcs11Error("C_WrapKey", rv);
    if (rv == CKR_OK) throw overran(got, first.size());
    // Larger than expected. The token says how large (PKCS#11 5.2); a token that does not
    // (or gives an impossible length) is asked with a size query. Either way the buffer gets
    // room to spare, since some tokens under-report, and the length of the real call counts.
    CK_ULONG n = got;
    if (n <= first.size() || n > kMaxBlob) {
        n = 0;
        KW_P11_CALL(fn(), C_WrapKey, handle(), mech, wrapping, key, static_cast<CK_BYTE*>(nullptr), &n);
        if (n <= first.size())
            throw misreport("answered a size query with " + std::to_string(n) + " bytes after saying " +
                            std::to_string(first.size()) + " were too few");
    }
    if (n > kMaxBlob) throw misreport("asked for " + std::to_string(n) + " bytes for one wrapped key");
    std::vector<std::uint8_t> out(n + 64);
    got = out.size();
    rv = KW_P11_TRY(fn(), C_WrapKey, handle(), mech, wrapping, key, out.data(), &got);
    if (rv == CKR_BUFFER_TOO_SMALL)
        throw misreport("asked for " + std::to_string(n) + " bytes, then found " + std::to_string(out.size()) +
                        " too few");
    if (rv != CKR_OK) throw Pkcs11Error("C_WrapKey", rv);
    if (got > out.size()) throw overran(got, out.size());
    out.resize(got);
    return out;
}

SessionObject Session::unwrap_key(CK_MECHANISM* mech, CK_OBJECT_HANDLE unwrapping,
                                  std::span<const std::uint8_t> blob, Template& t) {
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    KW_P11_CALL(fn(), C_UnwrapKey, handle(), mech, unwrapping, const_cast<CK_BYTE*>(blob.data()),
                static_cast<CK_ULONG>(blob.size()), t.data(), t.size(), &h);
    return SessionObject(shared_from_this(), h);
}

std::vector<std::uint8_t> Session::encrypt(CK_MECHANISM* mech, CK_OBJECT_HANDLE key,
                                           std::span<const std::uint8_t> in) {
    KW_P11_CALL(fn(), C_EncryptInit, handle(), mech, key);
    std::vector<std::uint8_t> out(in.size() + 256);
    CK_ULONG got = out.size();
    KW_P11_CALL(fn(), C_Encrypt, handle(), const_cast<CK_BYTE*>(in.data()),
                static_cast<CK_ULONG>(in.size()), out.data(), &got);
    out.resize(got);
    return out;
}

SecureBytes Session::decrypt(CK_MECHANISM* mech, CK_OBJECT_HANDLE key,
                             std::span<const std::uint8_t> in) {
    KW_P11_CALL(fn(), C_DecryptInit, handle(), mech, key);
    SecureBytes out(in.size() + 256);
    CK_ULONG got = out.size();
    KW_P11_CALL(fn(), C_Decrypt, handle(), const_cast<CK_BYTE*>(in.data()),
                static_cast<CK_ULONG>(in.size()), out.data(), &got);
    out.resize(got);
    return out;
}

std::vector<std::uint8_t> Session::sign(CK_MECHANISM* mech, CK_OBJECT_HANDLE key,
                                        std::span<const std::uint8_t> in) {
    KW_P11_CALL(fn(), C_SignInit, handle(), mech, key);
    std::vector<std::uint8_t> out(1024);
    CK_ULONG got = out.size();
    KW_P11_CALL(fn(), C_Sign, handle(), const_cast<CK_BYTE*>(in.data()),
                static_cast<CK_ULONG>(in.size()), out.data(), &got);
    out.resize(got);
    return out;
}

bool Session::verify(CK_MECHANISM* mech, CK_OBJECT_HANDLE key, std::span<const std::uint8_t> in,
                     std::span<const std::uint8_t> sig) {
    KW_P11_CALL(fn(), C_VerifyInit, handle(), mech, key);
    CK_RV rv = KW_P11_TRY(fn(), C_Verify, handle(), const_cast<CK_BYTE*>(in.data()),
                          static_cast<CK_ULONG>(in.size()), const_cast<CK_BYTE*>(sig.data()),
                          static_cast<CK_ULONG>(sig.size()));
    if (rv == CKR_OK) return true;
    if (rv == CKR_SIGNATURE_INVALID || rv == CKR_SIGNATURE_LEN_RANGE) return false;
    throw Pkcs11Error("C_Verify", rv);
}

void Session::random(std::span<std::uint8_t> out) {
    KW_P11_CALL(fn(), C_GenerateRandom, handle(), out.data(), static_cast<CK_ULONG>(out.size()));
}

}  // namespace keywarden::pkcs11
