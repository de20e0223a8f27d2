// SPDX-License-Identifier: Apache-2.0
// Where key store files live. The key store talks to this interface only; the filesystem
// backend is here, Redis comes later behind the same interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace keywarden::keystore {

using Bytes = std::vector<std::uint8_t>;

// A held lock; released when destroyed.
class StorageLock {
public:
    virtual ~StorageLock() = default;
};

class Storage {
public:
    virtual ~Storage() = default;
    // A description for messages ("/path/to/store").
    virtual std::string describe() const = 0;
    virtual bool exists() const = 0;
    // Names are relative, '/'-separated, and never contain "..": checked by the backend.
    virtual std::optional<Bytes> read(const std::string& name) const = 0;
    // A file read in pieces, for files too large to hold (the manifest of a big store).
    class Reader {
    public:
        virtual ~Reader() = default;
        // Up to n bytes; 0 at the end.
        virtual std::size_t read(std::uint8_t* out, std::size_t n) = 0;
    };
    // A Reader over bytes already in memory: its own (the default open_reader) or a caller's,
    // who keeps them alive while the reader is used (a loaded manifest).
    class MemoryReader : public Reader {
    public:
        explicit MemoryReader(Bytes owned) : m_owned(std::move(owned)), m_data(m_owned) {}
        explicit MemoryReader(std::span<const std::uint8_t> data) : m_data(data) {}
        std::size_t read(std::uint8_t* out, std::size_t n) override;

    private:
        Bytes m_owned;
        std::span<const std::uint8_t> m_data;
        std::size_t m_at = 0;
    };
    // nullptr if the file does not exist. The default reads the whole file with read().
    virtual std::unique_ptr<Reader> open_reader(const std::string& name) const;
    // Atomic: temp file, fsync, rename, fsync of the directory. Refuses to replace an existing
    // file when exclusive is set.
    virtual void write(const std::string& name, const Bytes& data, bool exclusive = false) = 0;
    // write() for data too large to hold (the manifest of a big store): produce() hands the
    // bytes to the sink in pieces. Atomic and durable as write(). The default collects them.
    using Sink = std::function<void(std::span<const std::uint8_t>)>;
    virtual void write_streamed(const std::string& name, const std::function<void(const Sink&)>& produce);
    // Writes without fsync, for files that nothing reads until a later commit names them
    // (".pending" ring files, an import's staging copy); batches end with sync(). An existing
    // file is unlinked first, never changed in place (it may be a hard link into a live store).
    virtual void write_unsynced(const std::string& name, const Bytes& data) = 0;
    // Makes everything written so far durable (syncfs).
    virtual void sync() = 0;
    virtual void rename(const std::string& from, const std::string& to) = 0;
    // Removes a file (a missing one is not an error), and the directories it leaves empty, never
    // the root.
    virtual void remove(const std::string& name) = 0;
    // Every file name below prefix (recursively), lock and temp files excluded.
    virtual std::vector<std::string> list(const std::string& prefix) const = 0;
    // Shared for readers, exclusive for writers; blocks until granted.
    virtual std::unique_ptr<StorageLock> lock(bool exclusive) = 0;
    // An exclusive lock on another lock file in the root (created 0600 if missing).
    virtual std::unique_ptr<StorageLock> lock_file(const std::string& name) = 0;
    // Creates the store root (0700). Refuses if it exists and is not empty.
    virtual void create() = 0;
    // Refuses (with a chmod hint) a root or directory writable by group or others.
    virtual void check_permissions() const = 0;
};

// Files under a root directory: directories 0700, files 0600.
std::unique_ptr<Storage> open_file_storage(const std::string& root);

// Creates the directories of `path` that are missing, each 0700 (existing ones are left as they
// are). Errors are left to the caller's next step, which names the path.
void create_private_directories(const std::string& path);

// fsync of a directory (after creating, renaming or removing an entry in it); Error if it fails.
void fsync_directory(const std::string& dir);

// The store directory a --keystore path names, absolute: "P/" and "P/." name P. Nothing else is
// normalised: "link/.." stays, as the kernel resolves it through the link. UsageError when the
// path ends in "..", which names no store directory of its own.
std::filesystem::path store_directory(const std::string& path);

}  // namespace keywarden::keystore
