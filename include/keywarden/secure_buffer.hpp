// SPDX-License-Identifier: Apache-2.0
// Buffers for PINs and key material. They live in OpenSSL's secure heap when it could be set up
// (mlock'ed, MADV_DONTDUMP, guard pages) and are always wiped with OPENSSL_cleanse on free.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <string_view>
#include <vector>

namespace keywarden {

namespace detail {
void* secure_allocate(std::size_t bytes);
void secure_deallocate(void* p, std::size_t bytes) noexcept;
}  // namespace detail

template <typename T>
class SecureAllocator {
public:
    using value_type = T;
    SecureAllocator() noexcept = default;
    template <typename U>
    SecureAllocator(const SecureAllocator<U>&) noexcept {}

    T* allocate(std::size_t n) {
        if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_alloc();
        return static_cast<T*>(detail::secure_allocate(n * sizeof(T)));
    }
    void deallocate(T* p, std::size_t n) noexcept { detail::secure_deallocate(p, n * sizeof(T)); }

    template <typename U>
    bool operator==(const SecureAllocator<U>&) const noexcept {
        return true;
    }
};

// Key bytes, PINs, secret-file contents. Never copy them into std::string.
using SecureBytes = std::vector<std::uint8_t, SecureAllocator<std::uint8_t>>;

inline std::string_view as_string_view(const SecureBytes& b) {
    return {reinterpret_cast<const char*>(b.data()), b.size()};
}

// Sets up OpenSSL's secure heap (locked, not dumped). Returns false where the kernel refused
// (RLIMIT_MEMLOCK); buffers are then still wiped on free, only not locked.
bool init_secure_heap(std::size_t bytes = 1u << 20) noexcept;
bool secure_heap_active() noexcept;

// Turns off core dumps for this process (RLIMIT_CORE = 0, PR_SET_DUMPABLE = 0), so that key
// material in memory never reaches a core file. Returns false if either call failed.
bool disable_core_dumps() noexcept;

// Wipes a plain buffer (stack copies, CK_ATTRIBUTE values).
void wipe(void* p, std::size_t n) noexcept;

}  // namespace keywarden
