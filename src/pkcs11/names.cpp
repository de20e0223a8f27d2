// SPDX-License-Identifier: Apache-2.0
// Names, meanings and operator hints for PKCS#11 return codes, mechanisms and flags.
#include <array>
#include <cstdio>

#include "keywarden/pkcs11.hpp"

namespace keywarden::pkcs11 {

namespace {

struct RvEntry {
    CK_RV rv;
    const char* name;
    const char* description;
    const char* hint;
};

#define RV(code, desc, hint) {code, #code, desc, hint}

constexpr RvEntry kRv[] = {
    RV(CKR_OK, "success", ""),
    RV(CKR_CANCEL, "the operation was cancelled", ""),
    RV(CKR_HOST_MEMORY, "the module ran out of host memory", "free memory and try again"),
    RV(CKR_SLOT_ID_INVALID, "the slot does not exist",
       "tokens can move between slots; select the token by URI, label or serial"),
    RV(CKR_GENERAL_ERROR, "the module reported a general error",
       "on SoftHSM this is also what a corrupted wrapped key or a wrong GCM tag gives; run "
       "with -v and check the token's log"),
    RV(CKR_FUNCTION_FAILED, "the function failed", "run with -v and check the token's log"),
    RV(CKR_ARGUMENTS_BAD, "the module rejected the arguments",
       "some modules need an init-args string: pass --module-init-args"),
    RV(CKR_NO_EVENT, "no slot event", ""),
    RV(CKR_NEED_TO_CREATE_THREADS, "the module needs to create threads", ""),
    RV(CKR_CANT_LOCK, "the module cannot use the requested locking", ""),
    RV(CKR_ATTRIBUTE_READ_ONLY, "an attribute in the template is read-only for this operation",
       "this token refuses an attribute keywarden sets; report the token model"),
    RV(CKR_ATTRIBUTE_SENSITIVE, "the attribute is sensitive and cannot be read",
       "the key is marked sensitive or non-extractable"),
    RV(CKR_ATTRIBUTE_TYPE_INVALID, "the token does not know an attribute in the template", ""),
    RV(CKR_ATTRIBUTE_VALUE_INVALID, "an attribute value in the template is invalid", ""),
    RV(CKR_ACTION_PROHIBITED, "the object's attributes forbid this action",
       "for example CKA_COPYABLE=false forbids a copy"),
    RV(CKR_DATA_INVALID, "the input data is invalid", ""),
    RV(CKR_DATA_LEN_RANGE, "the input data has a length the mechanism does not accept", ""),
    RV(CKR_DEVICE_ERROR, "the device reported an error", "check the token's connection"),
    RV(CKR_DEVICE_MEMORY, "the token is out of memory",
       "delete unused objects on the token; some HSMs keep every object, even session ones"),
    RV(CKR_DEVICE_REMOVED, "the token was removed", "insert the token and try again"),
    RV(CKR_ENCRYPTED_DATA_INVALID, "the encrypted data is invalid",
       "the data is corrupted or was made with another key"),
    RV(CKR_ENCRYPTED_DATA_LEN_RANGE, "the encrypted data has an invalid length",
       "the data is truncated or corrupted"),
    RV(CKR_FUNCTION_CANCELED, "the function was cancelled", ""),
    RV(CKR_FUNCTION_NOT_PARALLEL, "the function cannot run in parallel", ""),
    RV(CKR_FUNCTION_NOT_SUPPORTED, "the module does not support this function",
       "run 'keywarden token check' to see what this token supports"),
    RV(CKR_KEY_HANDLE_INVALID, "the key handle is invalid", ""),
    RV(CKR_KEY_SIZE_RANGE, "the key size is outside the range the mechanism accepts", ""),
    RV(CKR_KEY_TYPE_INCONSISTENT, "the key type does not fit the mechanism",
       "the key named is not the kind this operation needs"),
    RV(CKR_KEY_NOT_NEEDED, "no key is needed", ""),
    RV(CKR_KEY_CHANGED, "the key changed", ""),
    RV(CKR_KEY_NEEDED, "a key is needed", ""),
    RV(CKR_KEY_INDIGESTIBLE, "the key cannot be digested", ""),
    RV(CKR_KEY_FUNCTION_NOT_PERMITTED, "the key's attributes do not allow this operation",
       "the key lacks CKA_WRAP/CKA_UNWRAP/CKA_SIGN or similar; check how it was created"),
    RV(CKR_KEY_NOT_WRAPPABLE, "the key cannot be wrapped with this mechanism", ""),
    RV(CKR_KEY_UNEXTRACTABLE, "the key is not extractable",
       "keys created with CKA_EXTRACTABLE=false cannot be wrapped or read"),
    RV(CKR_MECHANISM_INVALID, "the token does not support this mechanism",
       "run 'keywarden token check' to see which methods work on this token"),
    RV(CKR_MECHANISM_PARAM_INVALID, "the mechanism parameters are invalid", ""),
    RV(CKR_OBJECT_HANDLE_INVALID, "the object handle is invalid", ""),
    RV(CKR_OPERATION_ACTIVE, "another operation is active in this session", ""),
    RV(CKR_OPERATION_NOT_INITIALIZED, "no operation was initialised", ""),
    RV(CKR_PIN_INCORRECT, "the PIN is incorrect",
       "check the PIN source; keywarden never retries, so the token's counter went down by one"),
    RV(CKR_PIN_INVALID, "the PIN has invalid characters", ""),
    RV(CKR_PIN_LEN_RANGE, "the PIN has an invalid length", "check the PIN source"),
    RV(CKR_PIN_EXPIRED, "the PIN has expired", "change the user PIN with the token's own tool"),
    RV(CKR_PIN_LOCKED, "the PIN is locked",
       "the security officer must unlock it (e.g. softhsm2-util/pkcs11-tool --init-pin)"),
    RV(CKR_SESSION_CLOSED, "the session was closed", ""),
    RV(CKR_SESSION_COUNT, "the token has no free session", "close other programs using it"),
    RV(CKR_SESSION_HANDLE_INVALID, "the session handle is invalid", ""),
    RV(CKR_SESSION_PARALLEL_NOT_SUPPORTED, "parallel sessions are not supported", ""),
    RV(CKR_SESSION_READ_ONLY, "the session is read-only", ""),
    RV(CKR_SESSION_EXISTS, "a session exists", ""),
    RV(CKR_SESSION_READ_ONLY_EXISTS, "a read-only session exists", ""),
    RV(CKR_SESSION_READ_WRITE_SO_EXISTS, "a security-officer session exists", ""),
    RV(CKR_SIGNATURE_INVALID, "the signature or MAC does not verify",
       "the data was changed, or was signed with another key"),
    RV(CKR_SIGNATURE_LEN_RANGE, "the signature or MAC has a wrong length",
       "the data is truncated or corrupted"),
    RV(CKR_TEMPLATE_INCOMPLETE, "the attribute template is incomplete", ""),
    RV(CKR_TEMPLATE_INCONSISTENT, "the attribute template is inconsistent", ""),
    RV(CKR_TOKEN_NOT_PRESENT, "no token is present in the slot", "insert the token"),
    RV(CKR_TOKEN_NOT_RECOGNIZED, "the token is not recognised", ""),
    RV(CKR_TOKEN_WRITE_PROTECTED, "the token is write-protected", ""),
    RV(CKR_UNWRAPPING_KEY_HANDLE_INVALID, "the unwrapping key handle is invalid", ""),
    RV(CKR_UNWRAPPING_KEY_SIZE_RANGE, "the unwrapping key size is out of range", ""),
    RV(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT, "the unwrapping key type does not fit", ""),
    RV(CKR_USER_ALREADY_LOGGED_IN, "the user is already logged in", ""),
    RV(CKR_USER_NOT_LOGGED_IN, "the user is not logged in", "a PIN is needed for this command"),
    RV(CKR_USER_PIN_NOT_INITIALIZED, "the user PIN is not initialised",
       "initialise the user PIN with the token's own tool"),
    RV(CKR_USER_TYPE_INVALID, "the user type is invalid", ""),
    RV(CKR_USER_ANOTHER_ALREADY_LOGGED_IN, "another user is logged in",
       "a security-officer session is open on this token; close it"),
    RV(CKR_USER_TOO_MANY_TYPES, "too many user types are logged in", ""),
    RV(CKR_WRAPPED_KEY_INVALID, "the wrapped key is invalid",
       "the data is corrupted or was wrapped under another key"),
    RV(CKR_WRAPPED_KEY_LEN_RANGE, "the wrapped key has an invalid length",
       "the data is truncated or corrupted"),
    RV(CKR_WRAPPING_KEY_HANDLE_INVALID, "the wrapping key handle is invalid", ""),
    RV(CKR_WRAPPING_KEY_SIZE_RANGE, "the wrapping key size is out of range", ""),
    RV(CKR_WRAPPING_KEY_TYPE_INCONSISTENT, "the wrapping key type does not fit", ""),
    RV(CKR_RANDOM_SEED_NOT_SUPPORTED, "the token cannot be seeded", ""),
    RV(CKR_RANDOM_NO_RNG, "the token has no random number generator", ""),
    RV(CKR_DOMAIN_PARAMS_INVALID, "the domain parameters are invalid", ""),
    RV(CKR_BUFFER_TOO_SMALL, "the output buffer is too small", ""),
    RV(CKR_SAVED_STATE_INVALID, "the saved state is invalid", ""),
    RV(CKR_INFORMATION_SENSITIVE, "the information is sensitive", ""),
    RV(CKR_STATE_UNSAVEABLE, "the state cannot be saved", ""),
    RV(CKR_CRYPTOKI_NOT_INITIALIZED, "the module is not initialised", ""),
    RV(CKR_CRYPTOKI_ALREADY_INITIALIZED, "the module is already initialised",
       "another part of this process initialised the module"),
    RV(CKR_MUTEX_BAD, "bad mutex", ""),
    RV(CKR_MUTEX_NOT_LOCKED, "mutex not locked", ""),
    RV(CKR_FUNCTION_REJECTED, "the function was rejected", ""),
};
#undef RV

const RvEntry* find_rv(CK_RV rv) {
    for (const auto& e : kRv)
        if (e.rv == rv) return &e;
    return nullptr;
}

std::string hex(unsigned long v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "0x%lX", v);
    return buf;
}

}  // namespace

std::string rv_name(CK_RV rv) {
    const RvEntry* e = find_rv(rv);
    return e ? e->name : "CKR_" + hex(rv);
}

std::string rv_description(CK_RV rv) {
    const RvEntry* e = find_rv(rv);
    if (e) return e->description;
    if (rv & CKR_VENDOR_DEFINED) return "vendor-defined error";
    return "unknown error";
}

std::string rv_hint(CK_RV rv) {
    const RvEntry* e = find_rv(rv);
    return e ? e->hint : "";
}

std::string mechanism_name(CK_MECHANISM_TYPE m) {
    switch (m) {
#define M(x) \
    case x:  \
        return #x;
        M(CKM_RSA_PKCS_KEY_PAIR_GEN)
        M(CKM_RSA_PKCS)
        M(CKM_RSA_PKCS_OAEP)
        M(CKM_RSA_PKCS_PSS)
        M(CKM_SHA256_RSA_PKCS)
        M(CKM_SHA256_RSA_PKCS_PSS)
        M(CKM_EC_KEY_PAIR_GEN)
        M(CKM_ECDSA)
        M(CKM_ECDH1_DERIVE)
        M(CKM_SHA_1)
        M(CKM_SHA256)
        M(CKM_SHA256_HMAC)
        M(CKM_GENERIC_SECRET_KEY_GEN)
        M(CKM_AES_KEY_GEN)
        M(CKM_AES_ECB)
        M(CKM_AES_CBC)
        M(CKM_AES_CBC_PAD)
        M(CKM_AES_CTR)
        M(CKM_AES_GCM)
        M(CKM_AES_KEY_WRAP)
        M(CKM_AES_KEY_WRAP_PAD)
        M(CKM_AES_KEY_WRAP_KWP)
#undef M
        default:
            return "CKM_" + hex(m);
    }
}

Pkcs11Error::Pkcs11Error(std::string function, CK_RV rv, std::string context)
    : Error(function + ": " + rv_name(rv) + " (" + hex(rv) + "): " + rv_description(rv) +
                (context.empty() ? "" : " (" + context + ")"),
            rv_hint(rv), ExitCode::token),
      m_function(std::move(function)),
      m_rv(rv) {}

std::vector<std::string> token_flag_names(CK_FLAGS f) {
    static const std::pair<CK_FLAGS, const char*> names[] = {
        {CKF_RNG, "RNG"},
        {CKF_WRITE_PROTECTED, "WRITE_PROTECTED"},
        {CKF_LOGIN_REQUIRED, "LOGIN_REQUIRED"},
        {CKF_USER_PIN_INITIALIZED, "USER_PIN_INITIALIZED"},
        {CKF_RESTORE_KEY_NOT_NEEDED, "RESTORE_KEY_NOT_NEEDED"},
        {CKF_CLOCK_ON_TOKEN, "CLOCK_ON_TOKEN"},
        {CKF_PROTECTED_AUTHENTICATION_PATH, "PROTECTED_AUTHENTICATION_PATH"},
        {CKF_DUAL_CRYPTO_OPERATIONS, "DUAL_CRYPTO_OPERATIONS"},
        {CKF_TOKEN_INITIALIZED, "TOKEN_INITIALIZED"},
        {CKF_SECONDARY_AUTHENTICATION, "SECONDARY_AUTHENTICATION"},
        {CKF_USER_PIN_COUNT_LOW, "USER_PIN_COUNT_LOW"},
        {CKF_USER_PIN_FINAL_TRY, "USER_PIN_FINAL_TRY"},
        {CKF_USER_PIN_LOCKED, "USER_PIN_LOCKED"},
        {CKF_USER_PIN_TO_BE_CHANGED, "USER_PIN_TO_BE_CHANGED"},
        {CKF_SO_PIN_COUNT_LOW, "SO_PIN_COUNT_LOW"},
        {CKF_SO_PIN_FINAL_TRY, "SO_PIN_FINAL_TRY"},
        {CKF_SO_PIN_LOCKED, "SO_PIN_LOCKED"},
        {CKF_SO_PIN_TO_BE_CHANGED, "SO_PIN_TO_BE_CHANGED"},
    };
    std::vector<std::string> out;
    for (const auto& [bit, name] : names)
        if (f & bit) out.emplace_back(name);
    return out;
}

}  // namespace keywarden::pkcs11
