// SPDX-License-Identifier: Apache-2.0
#include "keywarden/planned_keys.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

#include <nlohmann/json.hpp>

#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"
#include "keywarden/log.hpp"
#include "keywarden/open_store.hpp"
#include "keywarden/storage.hpp"
#include "keywarden/token_protector.hpp"
#include "util/file_io.hpp"

namespace keywarden::keystore {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "keywarden-import-init-keys";
constexpr int kVersion = 1;

using io::fail;
using io::fsync_dir_of;

std::string prefix_of(const std::string& store_path, const std::string& kind) {
    fs::path p = store_directory(store_path);
    return (p.parent_path() / ("." + p.filename().string() + "." + kind + "-keys-")).string();
}

// Where a record is written before it is complete and locked: a name forget_planned_keys does not
// look at, so that it never sees a record that is still empty or not yet locked.
std::string temp_prefix_of(const std::string& store_path, const std::string& kind) {
    fs::path p = store_directory(store_path);
    return (p.parent_path() / ("." + p.filename().string() + "." + kind + "-keys.tmp-")).string();
}

// The master key records of a store with their roles: one ("single") for a v1 store, two for v2.
std::vector<std::pair<const MasterKeyRecord*, pkcs11::MasterRole>> keys_of(const StoreMeta& m) {
    using pkcs11::MasterRole;
    if (m.store_version == 1) return {{&m.encryption, MasterRole::single}};
    return {{&m.encryption, MasterRole::encryption}, {&m.signature, MasterRole::signature}};
}

const char* role_name(pkcs11::MasterRole r) {
    return r == pkcs11::MasterRole::single ? "single" : r == pkcs11::MasterRole::signature ? "signature" : "encryption";
}

}  // namespace

PlannedKeysRecord::PlannedKeysRecord(const std::string& store_path, const std::string& kind)
    : m_path(prefix_of(store_path, kind)), m_temp(temp_prefix_of(store_path, kind) + "XXXXXX") {}

PlannedKeysRecord::~PlannedKeysRecord() {
    if (m_fd >= 0) ::close(m_fd);
}

void PlannedKeysRecord::write(const StoreMeta& planned) {
    const std::string text = planned_keys_text(planned);
    create_private_directories(fs::path(m_temp).parent_path().string());  // as init would, 0700
    int fd = ::mkostemp(m_temp.data(), O_CLOEXEC);  // O_EXCL, mode 0600
    if (fd < 0) {
        // A store directory made ready by someone else, in a directory this user cannot write:
        // init still works, without the record.
        if (errno == EACCES || errno == EPERM || errno == EROFS) {
            log::warn("cannot write the record of the master keys about to be generated beside the store (" +
                      m_temp + ": " + std::strerror(errno) +
                      "); if this command is killed before it ends, delete its new master keys by hand");
            return;
        }
        fail("cannot create", m_temp);
    }
    // The record's name: the temp name's random part after the record prefix.
    m_path += m_temp.substr(m_temp.size() - 6);
    bool renamed = false;
    try {
        // Held until this run ends: a record whose lock is free belongs to a run that is gone.
        if (::flock(fd, LOCK_EX) != 0) fail("cannot lock", m_temp);
        io::write_all(fd, text, m_temp);
        if (::fsync(fd) != 0) fail("cannot sync", m_temp);
        // Complete and locked before it can be seen under a record's name.
        if (::renameat2(AT_FDCWD, m_temp.c_str(), AT_FDCWD, m_path.c_str(), RENAME_NOREPLACE) != 0)
            fail("cannot create", m_path);
        renamed = true;
        fsync_dir_of(m_path);
    } catch (...) {
        ::unlink((renamed ? m_path : m_temp).c_str());  // no key is generated after this
        ::close(fd);
        throw;
    }
    m_fd = fd;
}

void PlannedKeysRecord::stored() {
    if (m_fd < 0) return;
    // Unlinked while still locked: a run that opened it meanwhile finds it gone once it gets
    // the lock (forget_planned_keys compares the inode).
    if (::unlink(m_path.c_str()) != 0) fail("cannot remove", m_path);
    ::close(m_fd);
    m_fd = -1;
    fsync_dir_of(m_path);
}

void PlannedKeysRecord::attach(InitParams& p) {
    p.before_generating = [this](const StoreMeta& planned) { write(planned); };
    p.before_completing = [this] { stored(); };
}

std::string planned_keys_text(const StoreMeta& m) {
    nlohmann::json keys = nlohmann::json::array();
    for (const auto& [r, role] : keys_of(m))
        if (!r->id.empty()) keys.push_back({{"role", role_name(role)}, {"label", r->label}, {"id", to_hex(r->id)}});
    nlohmann::json j = {{"format", kFormat},
                        {"version", kVersion},
                        {"store_id", m.store_id},
                        {"store_version", m.store_version},
                        {"token_serial", m.token_serial},
                        {"token_label", m.token_label},
                        {"keys", keys}};
    return j.dump(2) + "\n";
}

std::optional<StoreMeta> parse_planned_keys(const std::string& text) {
    try {
        auto j = nlohmann::json::parse(text);
        if (j.at("format") != kFormat || j.at("version") != kVersion) return std::nullopt;
        StoreMeta m;
        m.store_id = j.at("store_id").get<std::string>();
        m.store_version = j.at("store_version").get<int>();
        m.token_serial = j.at("token_serial").get<std::string>();
        m.token_label = j.at("token_label").get<std::string>();
        if (m.store_id.size() != 32 || (m.store_version != 1 && m.store_version != 2)) return std::nullopt;
        for (const auto& k : j.at("keys")) {
            auto id = from_hex(k.at("id").get<std::string>());
            if (!id || id->empty()) return std::nullopt;
            const std::string role = k.at("role").get<std::string>();
            if (m.store_version == 1 ? role != "single" : role != "encryption" && role != "signature")
                return std::nullopt;
            MasterKeyRecord& r = role == "signature" ? m.signature : m.encryption;
            r.label = k.at("label").get<std::string>();
            r.id.assign(id->begin(), id->end());
        }
        return m;
    } catch (const std::exception&) {
        return std::nullopt;
    }
}

bool forget_generated_keys(const StoreMeta& meta, pkcs11::TokenContext& ctx, const std::string& who) {
    bool all_gone = true;
    for (const auto& [k, role] : keys_of(meta)) {
        if (k->id.empty() || k->label != generated_master_label(meta.store_id, role)) continue;  // named
        const std::string what = "master key '" + k->label + "' (id " + to_hex(k->id) + ")";
        if (meta.token_serial != ctx.token.serial) {
            log::warn(who + " that was killed made the " + what + " on token '" + meta.token_label + "' (serial " +
                      meta.token_serial + "); it protects nothing: delete it with the token's tool");
            all_gone = false;
            continue;
        }
        try {
            auto found = pkcs11::find_master_key(*ctx.session, k->label, k->id);
            if (!found) continue;
            pkcs11::destroy_object(*ctx.session, found->handle);
            if (pkcs11::find_master_key(*ctx.session, k->label, k->id)) throw Error("the token did not destroy it");
            log::warn("removed the " + what + " that " + who + " which was killed had made; it protected nothing");
        } catch (const std::exception& e) {
            log::warn("could not remove the " + what + " that " + who + " which was killed had made (" + e.what() +
                      "); it protects nothing: delete it with the token's tool");
            all_gone = false;
        }
    }
    return all_gone;
}

void forget_planned_keys(const std::string& store_path, const std::string& kind, pkcs11::TokenContext& ctx) {
    const std::string prefix = prefix_of(store_path, kind);
    const fs::path dir = fs::path(prefix).parent_path();
    const std::string name_prefix = fs::path(prefix).filename().string();
    const std::string who = kind == "import" ? "an import --init" : "an init";
    const std::string temp_prefix = fs::path(temp_prefix_of(store_path, kind)).filename().string();
    std::vector<std::string> records;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
        const std::string n = e.path().filename().string();
        // Exactly the names write() gives: a prefix and 6 random characters.
        if (n.starts_with(name_prefix) && n.size() == name_prefix.size() + 6) records.push_back(e.path().string());
        // A record a killed run had not finished: no key was generated after it. Removed when it
        // is a regular file of this user that no live run holds.
        if (n.starts_with(temp_prefix) && n.size() == temp_prefix.size() + 6) {
            int fd = ::open(e.path().c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
            struct stat st {};
            if (fd >= 0 && ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == ::geteuid() &&
                ::flock(fd, LOCK_EX | LOCK_NB) == 0)
                ::unlink(e.path().c_str());
            if (fd >= 0) ::close(fd);
        }
    }
    for (const auto& path : records) {
        // Only a record this user wrote is acted on: a regular file, not a link, mode 0600.
        int fd = ::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        struct stat st {};
        if (fd < 0 || ::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != ::geteuid() ||
            (st.st_mode & 077) != 0 || st.st_size > 65536) {
            if (fd >= 0) ::close(fd);
            if (fd < 0 && errno == ENOENT) continue;  // its run ended meanwhile
            throw Error("refusing to act on " + path +
                            ": it is not a regular file of this user with mode 0600, as the record of master "
                            "keys that " + who + " writes is",
                        "check what made it, delete from the token any master key it names that no store "
                        "uses, then remove the file and run the command again");
        }
        // A live run holds its record locked; one that ended removed it before unlocking.
        struct stat now {};
        if (::flock(fd, LOCK_EX | LOCK_NB) != 0 || ::stat(path.c_str(), &now) != 0 || now.st_ino != st.st_ino ||
            now.st_dev != st.st_dev) {
            ::close(fd);
            continue;
        }
        std::string text(static_cast<std::size_t>(st.st_size), '\0');
        ssize_t got = ::read(fd, text.data(), text.size());
        if (got < 0) {
            ::close(fd);
            fail("cannot read", path);
        }
        text.resize(static_cast<std::size_t>(got));
        bool remove = true;
        if (auto planned = parse_planned_keys(text)) {
            remove = forget_generated_keys(*planned, ctx, who);
            if (!remove)
                log::warn("kept " + path + ": the master keys it names may still be on a token; remove it once "
                          "they are deleted");
        } else {
            // Synced before the first key is generated: a torn or unknown record names no key.
            log::warn("removing " + path + ", which this version cannot read; if a newer keywarden wrote it, check "
                      "the token for master keys labelled keywarden-<8 hex>-enc, -sig or -v1 that no store uses");
        }
        if (remove) {
            if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
                ::close(fd);
                fail("cannot remove", path);
            }
            fsync_dir_of(path);
        }
        ::close(fd);
    }
}

}  // namespace keywarden::keystore
