// SPDX-License-Identifier: Apache-2.0
#include "support.hpp"

#include "process.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "keywarden/error.hpp"


namespace kwtest {

namespace fs = std::filesystem;

namespace {
std::string env_or(const char* name, const std::string& fallback) {
    const char* v = std::getenv(name);
    return v && *v ? v : fallback;
}
SoftHsm* g_current = nullptr;
}  // namespace

std::string source_root() { return env_or("KEYWARDEN_SOURCE_ROOT", "."); }
std::string module_path() { return env_or("KEYWARDEN_TEST_MODULE", "/usr/lib/softhsm/libsofthsm2.so"); }
std::string binary_path() { return env_or("KEYWARDEN_BIN", "./keywarden"); }

std::string make_temp_dir(const std::string& prefix) {
    std::string tmpl = (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    return tmpl;
}

void write_file(const std::string& path, const std::string& content, int mode) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) throw std::runtime_error("cannot write " + path);
    if (::write(fd, content.data(), content.size()) != static_cast<ssize_t>(content.size())) {
        ::close(fd);
        throw std::runtime_error("short write " + path);
    }
    ::fchmod(fd, static_cast<mode_t>(mode));
    ::close(fd);
}

CliResult call(const std::function<void()>& fn) {
    CliResult r;
    try {
        fn();
        r.code = 0;
    } catch (const keywarden::Error& e) {
        r.code = static_cast<int>(e.exit_code());
        r.err = std::string("error: ") + e.what();
    } catch (const std::exception& e) {
        r.code = 1;
        r.err = std::string("error: ") + e.what();
    }
    return r;
}

int sh(const std::string& cmd) {
    int st = std::system(cmd.c_str());
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

SoftHsm::SoftHsm(const std::string& profile, const std::vector<std::string>& labels) {
    m_dir = make_temp_dir("kw-softhsm");
    fs::create_directories(m_dir + "/tokens");
    std::ifstream in(source_root() + "/hsm-config/" + profile);
    if (!in) throw std::runtime_error("cannot read hsm-config/" + profile);
    std::stringstream ss;
    ss << in.rdbuf();
    std::string conf = ss.str();
    for (std::size_t p; (p = conf.find("@TOKENDIR@")) != std::string::npos;)
        conf.replace(p, 10, m_dir + "/tokens");
    m_conf = m_dir + "/softhsm2.conf";
    write_file(m_conf, conf);
    // SoftHSM reads the config again at every C_Initialize.
    ::setenv("SOFTHSM2_CONF", m_conf.c_str(), 1);
    for (const auto& l : labels) init_token(l);
    keywarden::pkcs11::clear_call_trace();
    g_current = this;
}

SoftHsm::~SoftHsm() {
    g_current = nullptr;
    m_module.reset();
    std::error_code ec;
    fs::remove_all(m_dir, ec);
}

SoftHsm* SoftHsm::current() { return g_current; }

void SoftHsm::init_token(const std::string& label) {
    std::string cmd = "softhsm2-util --init-token --free --label '" + label + "' --so-pin " +
                      so_pin + " --pin " + user_pin + " >/dev/null";
    if (sh(cmd) != 0) throw std::runtime_error("softhsm2-util --init-token failed for " + label);
}

std::shared_ptr<keywarden::pkcs11::Module> SoftHsm::module() {
    if (!m_module) m_module = keywarden::pkcs11::Module::load(module_path());
    return m_module;
}

keywarden::pkcs11::TokenInfo SoftHsm::token(const std::string& label) {
    return keywarden::pkcs11::select_token(keywarden::pkcs11::list_tokens(*module()),
                                           "label:" + label);
}

std::shared_ptr<keywarden::pkcs11::Session> SoftHsm::session(const std::string& label) {
    auto s = keywarden::pkcs11::Session::open(module(), token(label).slot, true);
    std::string pin = user_pin;
    s->login(keywarden::SecureBytes(pin.begin(), pin.end()));
    return s;
}

CliResult run_cli(const std::vector<std::string>& args,
                  const std::map<std::string, std::optional<std::string>>& env) {
    std::vector<std::string> argv{binary_path()};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_program(argv, env);
}

CliResult run_program(const std::vector<std::string>& args,
                      const std::map<std::string, std::optional<std::string>>& env) {
    ProcessOptions o;
    o.new_session = true;  // no controlling terminal: /dev/tty cannot be opened
    auto p = run_process(args, env, o);
    return CliResult{p.code, std::move(p.out), std::move(p.err)};
}

}  // namespace kwtest

#include <openssl/evp.h>

#include <algorithm>

namespace kwtest {

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

std::string tree_digest(const std::string& dir) {
    std::vector<std::string> entries;
    std::error_code ec;
    if (!fs::exists(dir, ec)) return "absent";
    for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
        struct stat st {};
        ::lstat(e.path().c_str(), &st);
        std::string rel = fs::relative(e.path(), dir).string();
        std::string line = rel + " " + std::to_string(st.st_mode & 07777) + " ";
        if (e.is_regular_file()) line += read_text(e.path().string());
        entries.push_back(std::move(line));
    }
    std::sort(entries.begin(), entries.end());
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
    for (const auto& l : entries) {
        EVP_DigestUpdate(ctx, l.data(), l.size());
        EVP_DigestUpdate(ctx, "\n", 1);
    }
    unsigned char md[32];
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx, md, &n);
    EVP_MD_CTX_free(ctx);
    static const char* d = "0123456789abcdef";
    std::string out;
    for (unsigned i = 0; i < n; ++i) {
        out.push_back(d[md[i] >> 4]);
        out.push_back(d[md[i] & 15]);
    }
    return out + " (" + std::to_string(entries.size()) + " entries)";
}

}  // namespace kwtest
