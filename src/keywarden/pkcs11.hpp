// SPDX-License-Identifier: Apache-2.0
// The thin RAII layer over raw PKCS#11. It knows nothing of key stores.
// Headers and module loading come from p11-kit; every call goes through call()/try_call().
#pragma once

// clang-format off
#include <p11-kit/p11-kit.h>  // must precede uri.h
#include <p11-kit/uri.h>
// clang-format on

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "keywarden/error.hpp"
#include "keywarden/secure_buffer.hpp"

// Missing from p11-kit 0.24's header (see shared/PKCS11-NOTES.md).
#ifndef CKM_AES_KEY_WRAP_KWP
#define CKM_AES_KEY_WRAP_KWP 0x0000210BUL
#endif

namespace keywarden::pkcs11 {

// "CKR_PIN_INCORRECT", or "CKR_0x..." for codes not in the table.
std::string rv_name(CK_RV rv);
// One line saying what the code means, and one saying what an operator can do about it.
std::string rv_description(CK_RV rv);
std::string rv_hint(CK_RV rv);
std::string mechanism_name(CK_MECHANISM_TYPE m);

// A failed PKCS#11 call. what() reads "C_Login: CKR_PIN_INCORRECT (0xA0): the PIN is
// incorrect"; hint() says what to do. Exit code 3 unless a caller maps it by context.
class Pkcs11Error : public Error {
public:
    Pkcs11Error(std::string function, CK_RV rv, std::string context = {});
    CK_RV rv() const noexcept { return m_rv; }
    const std::string& function() const noexcept { return m_function; }

private:
    std::string m_function;
    CK_RV m_rv;
};

// The choke point. Every call is recorded in a small per-process trace (function and return
// code only, never arguments), which tests print when they fail, and echoed at -vv.
// `function` must outlive the trace (a string literal): only the pointer is kept.
void record_call(const char* function, CK_RV rv) noexcept;
std::vector<std::string> call_trace();
void clear_call_trace() noexcept;
void set_trace_echo(bool on) noexcept;

template <typename F, typename... A>
CK_RV try_call(const char* name, F fn, A... args) {
    CK_RV rv = fn(args...);
    record_call(name, rv);
    return rv;
}

template <typename F, typename... A>
void call(const char* name, F fn, A... args) {
    CK_RV rv = try_call(name, fn, args...);
    if (rv != CKR_OK) throw Pkcs11Error(name, rv);
}

#define KW_P11_CALL(fl, fn, ...) ::keywarden::pkcs11::call(#fn, (fl)->fn, __VA_ARGS__)
#define KW_P11_TRY(fl, fn, ...) ::keywarden::pkcs11::try_call(#fn, (fl)->fn, __VA_ARGS__)

// Trims the blank padding of CK_UTF8CHAR fixed-size fields.
std::string trim_field(const CK_UTF8CHAR* field, std::size_t size);

// A loaded and initialised module. C_Finalize and the unload happen in the noexcept destructor.
class Module {
public:
    // spec is a file path (contains '/' or ends in ".so") or the name p11-kit registers the
    // module under (e.g. "softhsm2"). init_args, if given, is passed as
    // CK_C_INITIALIZE_ARGS.pReserved, which some modules require (p11-kit: x-init-reserved).
    static std::shared_ptr<Module> load(const std::string& spec,
                                        const std::optional<std::string>& init_args = {});
    ~Module();
    Module(const Module&) = delete;
    Module& operator=(const Module&) = delete;

    CK_FUNCTION_LIST* fn() const noexcept { return m_fn; }
    const std::string& path() const noexcept { return m_path; }
    CK_INFO info() const;  // C_GetInfo
    // C_GetSlotList
    std::vector<CK_SLOT_ID> slots(bool token_present) const;
    // C_Finalize and C_Initialize again with the same arguments: every session, login and
    // session object of this process is gone afterwards. Used in a child process after fork()
    // (a forked PKCS#11 library must not be used as inherited), and to make SoftHSM free the
    // destroyed session objects it keeps until C_Finalize (see restart_token).
    void restart();
    // Counts restarts: a Session opened before the last restart is dead (Session::live).
    std::uint64_t generation() const noexcept { return m_generation; }

private:
    Module(CK_FUNCTION_LIST* fn, std::string path, std::optional<std::string> init_args);
    CK_FUNCTION_LIST* m_fn;
    std::string m_path;
    std::optional<std::string> m_init_args;  // pReserved must outlive C_Initialize
    std::uint64_t m_generation = 0;
};

// Names of modules p11-kit has registered (for error hints).
std::vector<std::string> registered_module_names();

struct TokenInfo {
    CK_SLOT_ID slot = 0;
    std::string slot_description;
    bool token_present = false;
    bool initialized = false;
    std::string label, manufacturer, model, serial;
    CK_FLAGS slot_flags = 0;
    CK_FLAGS flags = 0;
    // Free and total sessions; nullopt where the token reports CK_UNAVAILABLE_INFORMATION.
    std::optional<CK_ULONG> sessions_total, sessions_free, rw_sessions_total, rw_sessions_free;
    CK_TOKEN_INFO raw{};  // for URI matching
    CK_SLOT_INFO raw_slot{};
};

// C_GetSlotList + C_GetSlotInfo + C_GetTokenInfo for every slot.
std::vector<TokenInfo> list_tokens(const Module& m);
// C_GetTokenInfo, asked again on CKR_GENERAL_ERROR (a SoftHSM race with other processes).
void get_token_info(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, CK_TOKEN_INFO& out);
TokenInfo token_info(const Module& m, CK_SLOT_ID slot);
// Names of the set CKF_* token flags, e.g. {"LOGIN_REQUIRED", "USER_PIN_INITIALIZED"}.
std::vector<std::string> token_flag_names(CK_FLAGS flags);

// A parsed RFC 7512 URI (p11-kit). Move-only owner of the P11KitUri.
class Uri {
public:
    // Throws UsageError naming the p11-kit parse error. A "pin-value" attribute is refused:
    // a PIN never comes from the command line.
    static Uri parse(const std::string& text);
    Uri(Uri&&) noexcept;
    Uri& operator=(Uri&&) noexcept;
    ~Uri();
    bool matches_token(const CK_TOKEN_INFO& info) const;
    // The object part as a C_FindObjectsInit template (points into the Uri).
    std::span<CK_ATTRIBUTE> object_attributes() const;
    std::optional<std::string> pin_source() const;
    std::optional<std::string> module_path() const;
    std::optional<std::string> module_name() const;

private:
    explicit Uri(P11KitUri* u) : m_uri(u) {}
    P11KitUri* m_uri;
};

// Selects one initialised token. spec is a pkcs11: URI, "label:X", "serial:X", or a bare
// string matched against label and serial. An empty spec selects the only initialised token.
// Zero or several matches throw a TokenError that lists the tokens present. Never a slot index.
TokenInfo select_token(const std::vector<TokenInfo>& tokens, const std::string& spec);
std::string describe_tokens(const std::vector<TokenInfo>& tokens);

// Throws TokenError when the flags say a login must not be attempted: CKF_USER_PIN_LOCKED,
// CKF_USER_PIN_FINAL_TRY (one more wrong PIN would lock it), CKF_USER_PIN_TO_BE_CHANGED.
void check_login_allowed(CK_FLAGS token_flags, const std::string& token_label);

class Session;

// A session object destroyed (C_DestroyObject) when this goes out of scope: temporary keys.
class SessionObject {
public:
    SessionObject() = default;
    SessionObject(std::shared_ptr<Session> s, CK_OBJECT_HANDLE h) : m_session(std::move(s)), m_handle(h) {}
    SessionObject(SessionObject&& o) noexcept { *this = std::move(o); }
    SessionObject& operator=(SessionObject&& o) noexcept;
    SessionObject(const SessionObject&) = delete;
    SessionObject& operator=(const SessionObject&) = delete;
    ~SessionObject() { reset(); }
    void reset() noexcept;
    CK_OBJECT_HANDLE handle() const noexcept { return m_handle; }
    Session& session() const noexcept { return *m_session; }
    const std::shared_ptr<Session>& session_ptr() const noexcept { return m_session; }
    explicit operator bool() const noexcept { return m_handle != CK_INVALID_HANDLE; }
    // Keeps the object (e.g. a token object that should persist).
    CK_OBJECT_HANDLE release() noexcept;

private:
    std::shared_ptr<Session> m_session;
    CK_OBJECT_HANDLE m_handle = CK_INVALID_HANDLE;
};

// An attribute template whose values sit at stable addresses, each in its exact CK_* type.
// Values are wiped when the template is destroyed (a template may carry CKA_VALUE).
class Template {
public:
    Template() = default;
    Template(const Template&) = delete;
    Template& operator=(const Template&) = delete;
    ~Template();

    Template& add_bool(CK_ATTRIBUTE_TYPE t, bool v);
    Template& add_ulong(CK_ATTRIBUTE_TYPE t, CK_ULONG v);
    Template& add_bytes(CK_ATTRIBUTE_TYPE t, std::span<const std::uint8_t> v);
    Template& add_string(CK_ATTRIBUTE_TYPE t, std::string_view v);

    CK_ATTRIBUTE* data() noexcept { return m_attrs.data(); }
    CK_ULONG size() const noexcept { return static_cast<CK_ULONG>(m_attrs.size()); }

private:
    void* store(const void* p, std::size_t n);
    std::vector<CK_ATTRIBUTE> m_attrs;
    // Small values live in an arena inside the object (a Template is neither copied nor moved,
    // so their addresses are stable); larger ones get their own heap block. Templates are built
    // once or twice per key in bulk operations, so this saves many small allocations.
    alignas(CK_ULONG) std::uint8_t m_arena[256];
    std::size_t m_used = 0;
    std::vector<std::pair<std::unique_ptr<std::uint8_t[]>, std::size_t>> m_values;
};

// An open session. Holds the module by shared_ptr; closes itself in a noexcept destructor.
// Never logs out: C_Logout would destroy every private session object (see the notes).
class Session : public std::enable_shared_from_this<Session> {
public:
    static std::shared_ptr<Session> open(std::shared_ptr<Module> m, CK_SLOT_ID slot, bool rw = true);
    ~Session();
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    CK_FUNCTION_LIST* fn() const noexcept { return m_module->fn(); }
    // The handle; throws if the module was restarted since the session was opened (the handle
    // may then name another session).
    CK_SESSION_HANDLE handle() const {
        if (!live()) throw_stale();
        return m_handle;
    }
    // False once the module has been restarted: the session is gone, and closing it or
    // destroying its objects would hit whatever now has their handles; both are skipped.
    bool live() const noexcept { return m_generation == m_module->generation(); }
    CK_SLOT_ID slot() const noexcept { return m_slot; }
    const std::shared_ptr<Module>& module() const noexcept { return m_module; }

    // Checks the token's PIN flags, then C_Login(CKU_USER) once. CKR_USER_ALREADY_LOGGED_IN
    // counts as success. CKR_PIN_INCORRECT is never retried.
    void login(const SecureBytes& pin);

    // C_GetMechanismList, cached.
    const std::vector<CK_MECHANISM_TYPE>& mechanisms();
    bool has_mechanism(CK_MECHANISM_TYPE m);

    // C_FindObjectsInit/C_FindObjects/C_FindObjectsFinal (the Final is in a guard).
    std::vector<CK_OBJECT_HANDLE> find(CK_ATTRIBUTE* templ, CK_ULONG count, std::size_t max = 64);
    std::vector<CK_OBJECT_HANDLE> find(Template& t, std::size_t max = 64) {
        return find(t.data(), t.size(), max);
    }

    // C_GetAttributeValue helpers.
    std::vector<std::uint8_t> get_bytes(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t);
    SecureBytes get_secret(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t);
    std::optional<CK_ULONG> get_ulong(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t);
    std::optional<bool> get_bool(CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t);

    // C_GenerateKey into a session object that is destroyed with the returned guard.
    SessionObject generate_key(CK_MECHANISM_TYPE mech, Template& t);
    // C_GenerateKeyPair; both halves are guarded.
    std::pair<SessionObject, SessionObject> generate_key_pair(CK_MECHANISM_TYPE mech,
                                                              Template& pub, Template& priv);
    // C_CreateObject
    SessionObject create_object(Template& t);

    // C_WrapKey in one call with a 4 KiB buffer. A larger blob (CKR_BUFFER_TOO_SMALL) gets a
    // second call with the length the token reported, or a size query's if it reported none,
    // plus room to spare, because some tokens under-report: the real call's length counts.
    std::vector<std::uint8_t> wrap_key(CK_MECHANISM* mech, CK_OBJECT_HANDLE wrapping,
                                       CK_OBJECT_HANDLE key);
    // C_UnwrapKey into a session object. On failure any half-built object is not our handle,
    // so callers use session objects (CKA_TOKEN=false) for temporaries.
    SessionObject unwrap_key(CK_MECHANISM* mech, CK_OBJECT_HANDLE unwrapping,
                             std::span<const std::uint8_t> blob, Template& t);

    // Single-part C_Encrypt / C_Decrypt / C_Sign / C_Verify.
    std::vector<std::uint8_t> encrypt(CK_MECHANISM* mech, CK_OBJECT_HANDLE key,
                                      std::span<const std::uint8_t> in);
    SecureBytes decrypt(CK_MECHANISM* mech, CK_OBJECT_HANDLE key, std::span<const std::uint8_t> in);
    std::vector<std::uint8_t> sign(CK_MECHANISM* mech, CK_OBJECT_HANDLE key,
                                   std::span<const std::uint8_t> in);
    // Returns false on CKR_SIGNATURE_INVALID / CKR_SIGNATURE_LEN_RANGE; throws on other errors.
    bool verify(CK_MECHANISM* mech, CK_OBJECT_HANDLE key, std::span<const std::uint8_t> in,
                std::span<const std::uint8_t> sig);

    // C_GenerateRandom
    void random(std::span<std::uint8_t> out);

private:
    Session(std::shared_ptr<Module> m, CK_SLOT_ID slot, CK_SESSION_HANDLE h, std::uint64_t generation)
        : m_module(std::move(m)), m_slot(slot), m_handle(h), m_generation(generation) {}
    [[noreturn]] void throw_stale() const;
    std::shared_ptr<Module> m_module;
    CK_SLOT_ID m_slot;
    CK_SESSION_HANDLE m_handle;
    std::uint64_t m_generation;
    std::optional<std::vector<CK_MECHANISM_TYPE>> m_mechanisms;
};

}  // namespace keywarden::pkcs11
