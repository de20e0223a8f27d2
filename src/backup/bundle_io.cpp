// SPDX-License-Identifier: Apache-2.0
#include "bundle_io.hpp"
#include "internal.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <openssl/crypto.h>

#include "keywarden/encoding.hpp"
#include "keywarden/error.hpp"

namespace keywarden::backup::detail {

SecureBytes read_secret_file(const std::string& path) {
    io::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid())
        throw NotFoundError("cannot open secret file " + path + ": " + std::strerror(errno),
                            "pass the file export wrote with --key-bundle-secret");
    SecureBytes out(64 * 1024);
    std::size_t got = 0;
    for (;;) {
        if (got == out.size()) throw FormatError(path + " is too large to be a keywarden secret file");
        ssize_t n = ::read(fd.get(), out.data() + got, out.size() - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw Error("cannot read " + path + ": " + std::strerror(errno));
        if (n == 0) break;
        got += static_cast<std::size_t>(n);
    }
    out.resize(got);
    return out;
}

BundleReader::BundleReader(const std::string& path, const SecretFile& secret)
    : m_path(path), m_secret(secret), m_meta(metadata_key(secret.signature)) {
    m_in.open(path, std::ios::binary);
    if (!m_in)
        throw NotFoundError("cannot open bundle " + path + ": " + std::strerror(errno),
                            "pass the file export wrote with --key-bundle-file");
    start();
}

void BundleReader::start() {
    m_mac.emplace(m_secret.signature);
    m_entries = m_rings = m_bytes = 0;
    m_ring.clear();
    m_seen_versions.clear();
    m_done = false;
    m_skipped = false;
    std::string line;
    std::string_view want = m_secret.v1_backup ? kV1MagicLine : kMagicLine;
    if (!read_line(line) || line != want) {
        if (m_secret.v1_backup && line == kMagicLine)
            throw FormatError(m_path + " is a key bundle of a v2 store, not a v1 backup",
                              "import it with 'keywarden import --key-bundle-file " + m_path +
                                  " --key-bundle-secret SECRET-FILE'");
        if (!m_secret.v1_backup && line == kV1MagicLine)
            throw FormatError(m_path + " is a key store v1 backup, not a key bundle",
                              "restore it with 'keywarden backup --action=import --file " + m_path +
                                  "' and the backup key in BACKUP_MASTER_KEY");
        if (line.starts_with("keywarden-bundle ") || line.starts_with("keywarden-v1-backup "))
            throw FormatError(m_path + " has an unsupported format (" + line + ")", "upgrade keywarden");
        throw FormatError(m_path + (m_secret.v1_backup ? " is not a keywarden v1 backup file"
                                                       : " is not a keywarden key bundle"),
                          m_secret.v1_backup ? "pass the file 'keywarden backup --action=export' wrote"
                                             : "pass the file 'keywarden export' wrote with --key-bundle-file");
    }
    m_mac->update(line);
    m_mac->update("\n");
    if (!read_line(line)) throw IntegrityError("bundle " + m_path + " is truncated after its first line");
    m_header = parse_header(line);
    m_mac->update(line);
    m_mac->update("\n");
    // The secret must belong to this bundle: checked before any entry is read.
    if (!same_bytes(encryption_kcv(m_secret.encryption), m_header.kcv_encryption) ||
        !same_bytes(signature_kcv(m_secret.signature), m_header.kcv_signature)) {
        bool swapped = same_bytes(encryption_kcv(m_secret.signature), m_header.kcv_encryption) &&
                       same_bytes(signature_kcv(m_secret.encryption), m_header.kcv_signature);
        if (m_secret.v1_backup)
            throw IntegrityError("the backup key does not open this backup file (its check values differ)",
                                 "set BACKUP_MASTER_KEY to the key 'keywarden backup --action=export' "
                                 "showed for this file");
        throw IntegrityError(
            swapped ? "the secret file has the encryption and signature keys swapped"
                    : "the secret file does not belong to this bundle (its key check values differ)",
            "use the secret file written by the same export as this bundle");
    }
    if (m_secret.v1_backup) return;
    if (m_header.bundle_id != m_secret.bundle_id)
        throw IntegrityError("the secret file names bundle " + m_secret.bundle_id +
                             " but this bundle is " + m_header.bundle_id);
    if (m_header.wrap_method != m_secret.wrap_method)
        throw IntegrityError("the bundle and the secret file disagree on the wrap method");
}

void BundleReader::rewind() {
    m_in.clear();
    m_in.seekg(0);
    start();
}

void BundleReader::check_mac_only() {
    while (skip_next()) {
    }
}

bool BundleReader::read_line(std::string& line) {
    if (!std::getline(m_in, line)) return false;
    // A last line without its newline means the file was cut.
    if (m_in.eof()) throw IntegrityError("bundle " + m_path + " is truncated (no final newline)");
    m_bytes += line.size() + 1;
    return true;
}

void BundleReader::finish(const std::string& line) {
    m_done = true;
    auto tag = from_hex(line.substr(4));
    auto want = m_mac->final();
    if (!tag || !same_bytes(*tag, want))
        throw IntegrityError("bundle " + m_path + " does not verify (MAC mismatch)",
                             "the bundle was changed, cut, or reordered after export");
    std::string rest;
    if (std::getline(m_in, rest) || !rest.empty())
        throw IntegrityError("bundle " + m_path + " has data after its MAC");
    if (m_entries != m_header.entries || (!m_skipped && m_rings != m_header.rings))
        throw IntegrityError(counts_differ(m_path, m_entries, m_rings, m_header));
}

std::string counts_differ(const std::string& path, std::uint64_t entries, std::uint64_t rings, const BundleHeader& h) {
    return "bundle " + path + " has " + std::to_string(entries) + " entries in " + std::to_string(rings) +
           " rings but its header says " + std::to_string(h.entries) + " in " + std::to_string(h.rings);
}

// The next entry line, already fed to the MAC and counted; false at the MAC line, which is
// then checked.
bool BundleReader::entry_line(std::string& line) {
    if (m_done) return false;
    if (!read_line(line))
        throw IntegrityError("bundle " + m_path + " is truncated: it ends after " +
                             std::to_string(m_entries) + " of " + std::to_string(m_header.entries) +
                             " entries and has no MAC");
    if (line.starts_with("mac ")) {
        finish(line);
        return false;
    }
    m_mac->update(line);
    m_mac->update("\n");
    if (++m_entries > m_header.entries)
        throw IntegrityError("bundle " + m_path + " has more entries than its header says");
    return true;
}

bool BundleReader::skip_next() {
    std::string line;
    if (!entry_line(line)) return false;
    m_skipped = true;
    m_ring.clear();
    return true;
}

std::optional<Entry> BundleReader::next() {
    std::string line;
    if (!entry_line(line)) return std::nullopt;
    Entry e;
    keystore::KeyId id;
    try {
        EntryLine el = parse_entry(line);
        e = Entry{open_metadata(m_meta, el.sealed_meta), std::move(el.wrapped)};
        id = keystore::KeyId::parse(e.meta.key_id);
    } catch (const Error& err) {
        // Entries are read before the MAC at the end can vouch for them: anything malformed
        // is an integrity failure of the bundle, not a usage error.
        throw IntegrityError("bundle " + m_path + ", entry " + std::to_string(m_entries) +
                             ": " + err.what(), "the bundle was changed after export");
    }
    if (e.meta.key_type != keystore::key_kind_of(id.kind))
        throw IntegrityError("bundle entry " + e.meta.key_id + " has a key type that does not fit its kind");
    if (e.meta.wrapped != !e.wrapped.empty())
        throw IntegrityError("bundle entry " + e.meta.key_id + " disagrees with itself on its key");
    if (e.meta.key_id != m_ring) {
        m_ring = e.meta.key_id;
        m_seen_versions.clear();
        ++m_rings;
    }
    std::string v = std::to_string(e.meta.version);
    for (const auto& s : m_seen_versions)
        if (s == v) throw IntegrityError("bundle entry " + e.meta.key_id + " version " + v + " appears twice");
    m_seen_versions.push_back(v);
    return e;
}

}  // namespace keywarden::backup::detail

