// SPDX-License-Identifier: Apache-2.0
// The application's facade (include/keywarden/reader.hpp) over open_any_store and Store.
#include "keywarden/reader.hpp"

#include "keywarden/open_store.hpp"

namespace keywarden {

struct StoreReader::Impl {
    keystore::OpenAnyStore store;
};

StoreReader::StoreReader(std::unique_ptr<Impl> impl) : m_impl(std::move(impl)) {}
StoreReader::StoreReader(StoreReader&&) noexcept = default;
StoreReader& StoreReader::operator=(StoreReader&&) noexcept = default;
StoreReader::~StoreReader() = default;

StoreReader StoreReader::open(const std::string& path, const TokenOptions& token) {
    return StoreReader(std::make_unique<Impl>(Impl{keystore::open_any_store(token, path, /*writable=*/false)}));
}

int StoreReader::store_version() const { return m_impl->store.store->store_version(); }

std::vector<std::string> StoreReader::key_ids() const {
    std::vector<std::string> out;
    for (const auto& id : m_impl->store.store->key_ids()) out.push_back(id.str());
    return out;
}

SecureBytes StoreReader::read_secret(const std::string& key_id, std::optional<std::uint32_t> version) const {
    return m_impl->store.store->read_secret(keystore::KeyId::parse(key_id), version);
}

std::vector<std::uint8_t> StoreReader::read_public(const std::string& key_id,
                                                   std::optional<std::uint32_t> version) const {
    return m_impl->store.store->read_public(keystore::KeyId::parse(key_id), version);
}

}  // namespace keywarden
