// SPDX-License-Identifier: Apache-2.0
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>

#include "keywarden/log.hpp"
#include "keywarden/pkcs11.hpp"

namespace keywarden::pkcs11 {

// ---- the call trace -------------------------------------------------------------------------

namespace {
// The last kTraceMax calls, oldest first from g_next - g_count. A call costs a store, not a
// string: the lines are made only when call_trace() is asked for.
struct Call {
    const char* function;  // a string literal (KW_P11_CALL's #fn)
    CK_RV rv;
};
std::mutex g_trace_mutex;
constexpr std::size_t kTraceMax = 200;
std::array<Call, kTraceMax> g_calls{};
std::size_t g_next = 0, g_count = 0;
bool g_trace_echo = false;

std::string call_line(const Call& c) { return std::string(c.function) + " -> " + rv_name(c.rv); }
}  // namespace

void record_call(const char* function, CK_RV rv) noexcept {
    std::lock_guard lock(g_trace_mutex);
    g_calls[g_next] = {function, rv};
    g_next = (g_next + 1) % kTraceMax;
    if (g_count < kTraceMax) ++g_count;
    if (g_trace_echo) {
        try {
            log::debug(call_line({function, rv}));
        } catch (...) {
            // Tracing must never turn a result into an exception.
        }
    }
}

std::vector<std::string> call_trace() {
    std::lock_guard lock(g_trace_mutex);
    std::vector<std::string> out;
    out.reserve(g_count);
    for (std::size_t i = 0; i < g_count; ++i)
        out.push_back(call_line(g_calls[(g_next + kTraceMax - g_count + i) % kTraceMax]));
    return out;
}

void clear_call_trace() noexcept {
    std::lock_guard lock(g_trace_mutex);
    g_next = g_count = 0;
}

void set_trace_echo(bool on) noexcept { g_trace_echo = on; }

std::string trim_field(const CK_UTF8CHAR* field, std::size_t size) {
    std::string s(reinterpret_cast<const char*>(field), size);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
    return s;
}

// ---- modules --------------------------------------------------------------------------------

namespace {

struct ModuleList {
    CK_FUNCTION_LIST** list = nullptr;
    ~ModuleList() {
        if (list) p11_kit_modules_release(list);
    }
};

bool looks_like_path(const std::string& s) {
    return s.find('/') != std::string::npos ||
           (s.size() > 3 && (s.ends_with(".so") || s.find(".so.") != std::string::npos));
}

// Finds the file p11-kit registers under `name` (its "module:" line).
std::optional<std::string> registered_module_file(const std::string& name) {
    ModuleList mods;
    // Loading the registry without initialising; the modules are released right away.
    mods.list = p11_kit_modules_load(nullptr, P11_KIT_MODULE_UNMANAGED);
    if (!mods.list) return std::nullopt;
    for (CK_FUNCTION_LIST** m = mods.list; *m; ++m) {
        char* n = p11_kit_module_get_name(*m);
        bool match = n && name == n;
        free(n);
        if (match) {
            char* file = p11_kit_config_option(*m, "module");
            if (!file) return std::nullopt;
            std::string f = file;
            free(file);
            return f;
        }
    }
    return std::nullopt;
}

}  // namespace

std::vector<std::string> registered_module_names() {
    std::vector<std::string> out;
    ModuleList mods;
    mods.list = p11_kit_modules_load(nullptr, P11_KIT_MODULE_UNMANAGED);
    if (!mods.list) return out;
    for (CK_FUNCTION_LIST** m = mods.list; *m; ++m) {
        char* n = p11_kit_module_get_name(*m);
        if (n) out.emplace_back(n);
        free(n);
    }
    return out;
}

namespace {
// The Modules of this process by (process id, file), for Module::load.
std::recursive_mutex g_loaded_mutex;  // recursive: a Module can go while load() holds it
std::map<std::pair<pid_t, std::string>, std::weak_ptr<Module>> g_loaded;
}  // namespace

std::shared_ptr<Module> Module::load(const std::string& spec,
                                     const std::optional<std::string>& init_args) {
    if (spec.empty()) {
        std::string names;
        for (const auto& n : registered_module_names()) names += (names.empty() ? "" : ", ") + n;
        throw UsageError("no PKCS#11 module given",
                         "pass --module PATH or NAME, or set KEYWARDEN_MODULE" +
                             (names.empty() ? std::string()
                                            : " (modules registered with p11-kit: " + names + ")"));
    }
    std::string path = spec;
    if (!looks_like_path(spec)) {
        auto file = registered_module_file(spec);
        if (!file) {
            std::string names;
            for (const auto& n : registered_module_names())
                names += (names.empty() ? "" : ", ") + n;
            throw TokenError("no PKCS#11 module is registered with p11-kit under the name '" +
                                 spec + "'",
                             "pass the module's file path, or one of: " +
                                 (names.empty() ? std::string("(none registered)") : names));
        }
        path = *file;
    }
    // One Module per loaded module file in a process: C_Initialize and C_Finalize are per
    // process, so a second Module of the same file would finalize the module under the first
    // when it went (an application with two stores open lost the first one's sessions). Keyed by
    // process too: a forked child starts its own (run_in_processes restarts the module there).
    std::lock_guard<std::recursive_mutex> held(g_loaded_mutex);
    std::erase_if(g_loaded, [](const auto& e) { return e.second.expired(); });
    const auto key = std::make_pair(::getpid(), path);
    if (auto it = g_loaded.find(key); it != g_loaded.end()) {
        auto m = it->second.lock();  // not null: expired entries were just erased, under the lock
        if (m->m_init_args != init_args)
            throw UsageError("PKCS#11 module " + path + " is already in use in this process with other init args",
                             "use the same --module-init-args for every token of one module");
        return m;
    }
    // UNMANAGED: call the module directly, so that our CK_C_INITIALIZE_ARGS (and its
    // pReserved init-args string) reach it unchanged. CRITICAL: fail rather than skip it.
    CK_FUNCTION_LIST* fn =
        p11_kit_module_load(path.c_str(), P11_KIT_MODULE_UNMANAGED | P11_KIT_MODULE_CRITICAL);
    if (!fn) {
        const char* msg = p11_kit_message();
        throw TokenError("cannot load PKCS#11 module '" + path + "'" +
                             (msg ? std::string(": ") + msg : std::string()),
                         "check the path, or install the module's package (e.g. softhsm2, "
                         "opensc, yubihsm-pkcs11)");
    }
    std::shared_ptr<Module> m(new Module(fn, path, init_args));
    g_loaded[key] = m;
    return m;
}

Module::Module(CK_FUNCTION_LIST* fn, std::string path, std::optional<std::string> init_args)
    : m_fn(fn), m_path(std::move(path)), m_init_args(std::move(init_args)) {
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    args.pReserved = m_init_args ? const_cast<char*>(m_init_args->c_str()) : nullptr;
    CK_RV rv = try_call("C_Initialize", m_fn->C_Initialize, static_cast<void*>(&args));
    if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
        p11_kit_module_release(m_fn);
        Pkcs11Error e("C_Initialize", rv, m_path);
        std::string hint = e.hint();
        if (rv == CKR_ARGUMENTS_BAD)
            hint = m_init_args ? "the module refused the string given with --module-init-args; "
                                 "check it, or leave it out"
                               : "this module may need an init-args string: pass "
                                 "--module-init-args";
        else if (rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED)
            hint = "the module could not start: check its configuration (for SoftHSM, the file "
                   "SOFTHSM2_CONF names and its directories.tokendir)";
        throw Error(e.what(), hint,
                    ExitCode::token);
    }
}

void Module::restart() {
    ++m_generation;  // first: even if C_Initialize fails, no old session may be used
    try_call("C_Finalize", m_fn->C_Finalize, static_cast<void*>(nullptr));
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    args.pReserved = m_init_args ? const_cast<char*>(m_init_args->c_str()) : nullptr;
    call("C_Initialize", m_fn->C_Initialize, static_cast<void*>(&args));
}

Module::~Module() {
    if (!m_fn) return;
    // Under the lock of load(): a new Module of this file is not initialised while this one
    // finalises. (weak_ptr::expired() is already true here, so load() never returns this one.)
    std::lock_guard<std::recursive_mutex> held(g_loaded_mutex);
    try_call("C_Finalize", m_fn->C_Finalize, static_cast<void*>(nullptr));
    p11_kit_module_release(m_fn);
}

CK_INFO Module::info() const {
    CK_INFO i{};
    KW_P11_CALL(m_fn, C_GetInfo, &i);
    return i;
}

std::vector<CK_SLOT_ID> Module::slots(bool token_present) const {
    CK_ULONG n = 0;
    KW_P11_CALL(m_fn, C_GetSlotList, static_cast<CK_BBOOL>(token_present),
                static_cast<CK_SLOT_ID*>(nullptr), &n);
    std::vector<CK_SLOT_ID> ids(n + 4);
    CK_ULONG got = ids.size();
    KW_P11_CALL(m_fn, C_GetSlotList, static_cast<CK_BBOOL>(token_present), ids.data(), &got);
    ids.resize(got);
    return ids;
}

}  // namespace keywarden::pkcs11
