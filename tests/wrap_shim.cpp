// SPDX-License-Identifier: Apache-2.0
// A PKCS#11 module for tests only: it passes every call to the module named by KW_SHIM_TARGET
// (SoftHSM), except C_WrapKey and C_UnwrapKey, which it changes as the variables below say: to
// play tokens that do not follow PKCS#11 5.2 or that fail, and another process at work. The
// variables are read at every call, so a test can change the behaviour between calls.
// KW_SHIM_WRAP:
//
//   unset or "" : pass through
//   no-length   : CKR_BUFFER_TOO_SMALL with the length set to 0
//   understated : CKR_BUFFER_TOO_SMALL with the length set to 100
//   short-by-8  : CKR_BUFFER_TOO_SMALL with 8 bytes fewer than the blob needs
//   short-by-100: the same with 100 bytes fewer (more than the caller's room to spare)
//   huge        : CKR_BUFFER_TOO_SMALL and size queries answered with 2 MiB
//   huge-once   : CKR_BUFFER_TOO_SMALL with 2 MiB; size queries answered truly
//   query-zero  : CKR_BUFFER_TOO_SMALL and size queries answered with 0
//   query-4096  : CKR_BUFFER_TOO_SMALL with no length; size queries answered with 4096
//   overrun     : CKR_OK with the length set to one byte more than the buffer held
//   flip-sensitive: CKR_OK, with the last byte of the blob flipped where the wrapped key is
//                 sensitive (a store key; not the all-zero key of the master key's check value):
//                 a token that corrupts what it wraps
//
// KW_SHIM_UNWRAP=device-memory makes every C_UnwrapKey fail with CKR_DEVICE_MEMORY, as a token
// whose object table is full would.
//
// KW_SHIM_CREATE=PATH: the first C_UnwrapKey creates the file PATH (O_EXCL, "someone else's file"),
// as another process might while a command runs; later calls find it there and leave it alone.
#include <dlfcn.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

// clang-format off
#include <p11-kit/p11-kit.h>
// clang-format on

namespace {

CK_FUNCTION_LIST g_list;
CK_FUNCTION_LIST* g_target = nullptr;

bool env_is(const char* var, const char* value) {
    const char* v = std::getenv(var);
    return v && std::strcmp(v, value) == 0;
}
bool mode_is(const char* m) { return env_is("KW_SHIM_WRAP", m); }

CK_RV shim_wrap(CK_SESSION_HANDLE s, CK_MECHANISM* mech, CK_OBJECT_HANDLE wrapping, CK_OBJECT_HANDLE key,
                CK_BYTE* out, CK_ULONG* len) {
    constexpr CK_ULONG kHuge = 2u << 20;
    if (!out && (mode_is("huge") || mode_is("query-zero") || mode_is("query-4096"))) {
        *len = mode_is("huge") ? kHuge : mode_is("query-4096") ? 4096 : 0;
        return CKR_OK;
    }
    const CK_ULONG buffer = out ? *len : 0;
    CK_RV rv = g_target->C_WrapKey(s, mech, wrapping, key, out, len);
    if (rv == CKR_BUFFER_TOO_SMALL) {
        if (mode_is("no-length") || mode_is("query-zero") || mode_is("query-4096")) *len = 0;
        else if (mode_is("understated")) *len = 100;
        else if (mode_is("short-by-8")) *len -= 8;
        else if (mode_is("short-by-100")) *len -= 100;
        else if (mode_is("huge") || mode_is("huge-once")) *len = kHuge;
    } else if (rv == CKR_OK && out && mode_is("overrun")) {
        *len = buffer + 1;
    } else if (rv == CKR_OK && out && *len > 0 && mode_is("flip-sensitive")) {
        CK_BBOOL sensitive = CK_FALSE;
        CK_ATTRIBUTE a{CKA_SENSITIVE, &sensitive, sizeof sensitive};
        if (g_target->C_GetAttributeValue(s, key, &a, 1) == CKR_OK && sensitive == CK_TRUE) out[*len - 1] ^= 0x01;
    }
    return rv;
}

CK_RV shim_unwrap(CK_SESSION_HANDLE s, CK_MECHANISM* mech, CK_OBJECT_HANDLE unwrapping, CK_BYTE* blob,
                  CK_ULONG blob_len, CK_ATTRIBUTE* t, CK_ULONG count, CK_OBJECT_HANDLE* out) {
    if (env_is("KW_SHIM_UNWRAP", "device-memory")) return CKR_DEVICE_MEMORY;
    if (const char* path = std::getenv("KW_SHIM_CREATE")) {
        int fd = ::open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd >= 0) {
            static const char kText[] = "someone else's file\n";
            (void)!::write(fd, kText, sizeof kText - 1);
            ::close(fd);
        }
    }
    return g_target->C_UnwrapKey(s, mech, unwrapping, blob, blob_len, t, count, out);
}

// The list's own C_GetFunctionList entry: this file's, not another library's of the same name
// (p11-kit, loaded first, exports one too).
CK_RV get_list(CK_FUNCTION_LIST** list) {
    if (!list) return CKR_ARGUMENTS_BAD;
    if (!g_target) {
        const char* path = std::getenv("KW_SHIM_TARGET");
        void* h = ::dlopen(path ? path : "/usr/lib/softhsm/libsofthsm2.so", RTLD_NOW | RTLD_LOCAL);
        if (!h) return CKR_GENERAL_ERROR;
        auto get = reinterpret_cast<CK_RV (*)(CK_FUNCTION_LIST**)>(::dlsym(h, "C_GetFunctionList"));
        if (!get || get(&g_target) != CKR_OK || !g_target) return CKR_GENERAL_ERROR;
        g_list = *g_target;
        g_list.C_GetFunctionList = get_list;
        g_list.C_WrapKey = shim_wrap;
        g_list.C_UnwrapKey = shim_unwrap;
    }
    *list = &g_list;
    return CKR_OK;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST** list) {
    return get_list(list);
}
