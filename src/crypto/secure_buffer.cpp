// SPDX-License-Identifier: Apache-2.0
#include "keywarden/secure_buffer.hpp"

#include <openssl/crypto.h>
#include <sys/prctl.h>
#include <sys/resource.h>

namespace keywarden {

namespace detail {

void* secure_allocate(std::size_t bytes) {
    // OPENSSL_secure_malloc falls back to the ordinary heap when no secure heap is set up.
    void* p = OPENSSL_secure_malloc(bytes == 0 ? 1 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
}

void secure_deallocate(void* p, std::size_t bytes) noexcept {
    if (p == nullptr) return;
    // Clears the bytes before freeing, whichever heap they came from.
    OPENSSL_secure_clear_free(p, bytes == 0 ? 1 : bytes);
}

}  // namespace detail

bool init_secure_heap(std::size_t bytes) noexcept {
    if (CRYPTO_secure_malloc_initialized()) return true;
    // minsize 16: key material is mostly 32 bytes, PKCS#8 EC keys about 140.
    return CRYPTO_secure_malloc_init(bytes, 16) == 1;
}

bool secure_heap_active() noexcept { return CRYPTO_secure_malloc_initialized() == 1; }

bool disable_core_dumps() noexcept {
    bool ok = true;
    struct rlimit none {
        0, 0
    };
    if (setrlimit(RLIMIT_CORE, &none) != 0) ok = false;
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) ok = false;
    return ok;
}

void wipe(void* p, std::size_t n) noexcept {
    if (p != nullptr && n != 0) OPENSSL_cleanse(p, n);
}

}  // namespace keywarden
