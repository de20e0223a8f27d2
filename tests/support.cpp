// SPDX-License-Identifier: Apache-2.0
#include "support.hpp"

#include <fcntl.h>
#include <poll.h>
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

extern char** environ;

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
    int out_pipe[2], err_pipe[2];
    if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0)
        throw std::runtime_error("pipe failed");
    std::vector<std::string> argv_s = args;
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);

    std::map<std::string, std::string> envm;
    for (char** e = environ; *e; ++e) {
        std::string kv = *e;
        auto eq = kv.find('=');
        if (eq != std::string::npos) envm[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    for (const auto& [k, v] : env) {
        if (v) envm[k] = *v;
        else envm.erase(k);
    }
    std::vector<std::string> env_s;
    for (const auto& [k, v] : envm) env_s.push_back(k + "=" + v);
    std::vector<char*> envp;
    for (auto& e : env_s) envp.push_back(e.data());
    envp.push_back(nullptr);

    pid_t pid = fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
        setsid();  // no controlling terminal: /dev/tty cannot be opened
        int devnull = ::open("/dev/null", O_RDONLY);
        dup2(devnull, 0);
        dup2(out_pipe[1], 1);
        dup2(err_pipe[1], 2);
        // Only 0, 1 and 2 reach the program, as from a shell.
        ::close_range(3, ~0U, 0);
        execvpe(argv[0], argv.data(), envp.data());
        _exit(127);
    }
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    CliResult r;
    pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
    int open_fds = 2;
    char buf[4096];
    while (open_fds > 0) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP))) continue;
            ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
            if (n <= 0) {
                ::close(fds[i].fd);
                fds[i].fd = -1;
                --open_fds;
            } else {
                (i == 0 ? r.out : r.err).append(buf, static_cast<std::size_t>(n));
            }
        }
    }
    int st = 0;
    waitpid(pid, &st, 0);
    r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return r;
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
