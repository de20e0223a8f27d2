// SPDX-License-Identifier: Apache-2.0
// Streaming bundle reading, shared by export's self-check, verify and import.
#pragma once

#include <fstream>
#include <optional>

#include "keywarden/bundle.hpp"

namespace keywarden::backup::detail {

// Reads a whole small file (the secret file) into a wiping buffer.
SecureBytes read_secret_file(const std::string& path);

// "bundle P has E entries in R rings but its header says ...": counts that differ from the header.
std::string counts_differ(const std::string& path, std::uint64_t entries, std::uint64_t rings, const BundleHeader& h);

struct Entry {
    EntryMeta meta;
    Bytes wrapped;
};

// Reads a bundle line by line, feeding every byte to the MAC. The header is checked against the
// secret file's key check values before any entry is read. Entry structure is checked as it
// streams: the caller must still see next() return nullopt, which is when the whole-file MAC and
// the counts are checked, before trusting anything it read.
class BundleReader {
public:
    BundleReader(const std::string& path, const SecretFile& secret);
    const BundleHeader& header() const { return m_header; }
    std::optional<Entry> next();
    // Passes over the next entry without decrypting it; it still goes into the MAC and the
    // count. Returns false at the MAC line, which is then checked as next() does. Workers use it
    // to walk to their share of a bundle that the parent has already verified.
    bool skip_next();
    // Starts again from the first entry (import reads twice: verify, then restore).
    void rewind();
    // Reads the rest of the file for the whole-file MAC and the entry count only, decrypting
    // nothing (a cheap first pass before keys are touched). Throws IntegrityError.
    void check_mac_only();
    std::uint64_t bytes_read() const { return m_bytes; }

private:
    bool read_line(std::string& line);
    void finish(const std::string& mac_line);
    bool entry_line(std::string& line);
    void start();
    std::string m_path;
    std::ifstream m_in;
    const SecretFile& m_secret;
    MetaCipher m_meta;  // next() only: one thread at a time
    BundleHeader m_header;
    std::optional<HmacStream> m_mac;
    std::uint64_t m_entries = 0, m_rings = 0, m_bytes = 0;
    std::string m_ring;  // key id of the ring being read
    std::vector<std::string> m_seen_versions;
    bool m_done = false;
    bool m_skipped = false;  // rings are not counted once entries were skipped
};

}  // namespace keywarden::backup::detail
