// Test helpers: what processes this test process has left behind.
#pragma once

#include <dirent.h>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/types.h>
#include <unistd.h>
#include <vector>

namespace mproc_test {

struct ProcEntry {
    pid_t pid;
    char state;  // 'Z' for a zombie
};

/// Every process whose parent is `parent` (this process by default), zombies included.
inline std::vector<ProcEntry> children_of(pid_t parent = ::getpid()) {
    std::vector<ProcEntry> found;
    DIR* proc = ::opendir("/proc");
    if (!proc) return found;
    while (dirent* entry = ::readdir(proc)) {
        const std::string name = entry->d_name;
        if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
        std::ifstream stat("/proc/" + name + "/stat");
        std::string line;
        if (!std::getline(stat, line)) continue;
        const auto close = line.rfind(')');
        if (close == std::string::npos) continue;
        std::istringstream rest(line.substr(close + 2));
        char state = '?';
        pid_t ppid = 0;
        rest >> state >> ppid;
        if (ppid == parent) found.push_back({static_cast<pid_t>(std::stol(name)), state});
    }
    ::closedir(proc);
    return found;
}

/// Number of children, live or zombie, this process has right now.
inline std::size_t child_count() { return children_of().size(); }

}  // namespace mproc_test
