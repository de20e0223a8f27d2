// SPDX-License-Identifier: Apache-2.0
#include "process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>

extern char** environ;

namespace kwtest {

namespace {

double tv_seconds(const timeval& tv) { return static_cast<double>(tv.tv_sec) + tv.tv_usec / 1e6; }

// The parent's ends of the pipes are closed when this goes out of scope.
struct Pipe {
    int fd[2] = {-1, -1};
    Pipe() {
        if (::pipe2(fd, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
    }
    ~Pipe() {
        for (int f : fd)
            if (f >= 0) ::close(f);
    }
    Pipe(const Pipe&) = delete;
    Pipe& operator=(const Pipe&) = delete;
};

// Reads the captured streams until both reach end of file.
void drain(int out_fd, int err_fd, std::string& out, std::string& err) {
    pollfd fds[2] = {{out_fd, POLLIN, 0}, {err_fd, POLLIN, 0}};
    std::string* dst[2] = {&out, &err};
    char buf[4096];
    for (int open_fds = (out_fd >= 0) + (err_fd >= 0); open_fds > 0;) {
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        for (int i = 0; i < 2; ++i) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                fds[i].fd = -1;
                --open_fds;
            } else {
                dst[i]->append(buf, static_cast<std::size_t>(n));
            }
        }
    }
}

}  // namespace

std::vector<std::string> child_environment(const EnvChanges& changes) {
    std::map<std::string, std::string> envm;
    for (char** e = environ; *e; ++e) {
        std::string kv = *e;
        auto eq = kv.find('=');
        if (eq != std::string::npos) envm[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    for (const auto& [k, v] : changes) {
        if (v) envm[k] = *v;
        else envm.erase(k);
    }
    std::vector<std::string> out;
    for (const auto& [k, v] : envm) out.push_back(k + "=" + v);
    return out;
}

ProcessResult run_process(const std::vector<std::string>& args, const EnvChanges& env,
                          const ProcessOptions& o) {
    if (args.empty()) throw std::runtime_error("run_process: no program");
    std::vector<std::string> argv_s = args, env_s = o.environment ? *o.environment : child_environment(env);
    std::vector<char*> argv, envp;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : env_s) envp.push_back(e.data());
    envp.push_back(nullptr);

    std::optional<Pipe> out_pipe, err_pipe;
    if (o.out_path.empty()) out_pipe.emplace();
    if (o.err_path.empty()) err_pipe.emplace();

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (out_pipe) posix_spawn_file_actions_adddup2(&fa, out_pipe->fd[1], 1);
    else posix_spawn_file_actions_addopen(&fa, 1, o.out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (err_pipe) posix_spawn_file_actions_adddup2(&fa, err_pipe->fd[1], 2);
    else posix_spawn_file_actions_addopen(&fa, 2, o.err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    // Only 0, 1 and 2 reach the program, as from a shell.
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    if (o.new_session) posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);

    auto t0 = std::chrono::steady_clock::now();
    pid_t pid = 0;
    int rc = ::posix_spawnp(&pid, argv[0], &fa, &attr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) throw std::runtime_error("cannot run " + args[0] + ": " + std::strerror(rc));

    ProcessResult r;
    // The child holds the write ends now: close ours, so that end of file means it is done.
    for (auto* p : {&out_pipe, &err_pipe})
        if (*p) {
            ::close((*p)->fd[1]);
            (*p)->fd[1] = -1;
        }
    drain(out_pipe ? out_pipe->fd[0] : -1, err_pipe ? err_pipe->fd[0] : -1, r.out, r.err);
    int st = 0;
    struct rusage ru {};
    while (::wait4(pid, &st, 0, &ru) < 0)
        if (errno != EINTR) throw std::runtime_error(std::string("wait4: ") + std::strerror(errno));
    r.wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r.maxrss_kib = ru.ru_maxrss;
    r.user = tv_seconds(ru.ru_utime);
    r.sys = tv_seconds(ru.ru_stime);
    return r;
}

}  // namespace kwtest
