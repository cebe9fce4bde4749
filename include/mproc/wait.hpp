// mproc — wait: block until any of several connections, processes and descriptors is ready, as
// Python's multiprocessing.connection.wait does.
//
//     for (std::size_t i : mproc::wait({conn, process, fd}, 1s)) ...   // the indices that are ready
//
// A Connection is ready when a message can be received without waiting for it to start (a whole
// message already buffered, bytes or end of stream on its descriptor); a Process when it has
// ended (its sentinel); a raw descriptor when poll(2) reports it readable, hung up or in error.
//
// This header includes neither <mproc/pipe.hpp> nor <mproc/process.hpp>: a program that has a
// Connection or a Process to wait on has included them already, and one that waits on raw
// descriptors does not compile them for nothing.
#pragma once

#include <cerrno>
#include <concepts>
#include <cstddef>
#include <initializer_list>
#include <optional>
#include <poll.h>
#include <span>
#include <string>
#include <vector>

#include "detail/os/clock.hpp"
#include "detail/os/unique_fd.hpp"
#include "errors.hpp"
#include "time.hpp"

namespace mproc {

template <class T> class Connection;  // <mproc/pipe.hpp>
class Process;                        // <mproc/process.hpp>

/// One thing mproc::wait can wait on: a Connection (its readable end), a Process (its sentinel)
/// or a raw file descriptor. A light reference: the object must outlive the wait. Implicit from
/// each, so `mproc::wait({conn, process, fd})` works.
class Waitable {
public:
    /// A descriptor of the program's own, ready when readable (or hung up, or in error).
    Waitable(int fd) noexcept : fd_(fd) {}
    /// A Connection, ready when a message can be received; its read end must be open.
    template <class T>
    Waitable(Connection<T>& connection) noexcept
        : object_(&connection), descriptor_(&connection_descriptor<T>), buffered_(&connection_buffered<T>),
          hold_(&connection_hold<T>), let_go_(&connection_let_go<T>) {}
    /// A started Process (or an object of a class derived from it), ready once its child has
    /// ended. A template only so that Process may be incomplete here.
    template <std::derived_from<Process> P>
    Waitable(P& process) noexcept
        : object_(static_cast<Process*>(&process)), descriptor_(&process_descriptor<Process, P>),
          hold_(&process_hold<Process, P>), let_go_(&process_let_go) {}

    /// The descriptor that is polled for this object. Throws mproc::Error for what cannot be
    /// waited on: a closed or write-only Connection, a Process never started or closed, a
    /// negative descriptor.
    int descriptor() const {
        if (descriptor_) return descriptor_(object_);
        if (fd_ < 0) throw Error("wait: " + std::to_string(fd_) + " is not a descriptor");
        return fd_;
    }
    /// Whether it is ready without looking at its descriptor (a Connection with a whole message
    /// already buffered).
    bool buffered() const noexcept { return buffered_ && buffered_(object_); }

    /// The descriptor to poll for the length of a wait, held until let_go(): a Connection closed
    /// on another thread meanwhile keeps its descriptor until then, and a Process's is a
    /// duplicate of its sentinel (close() on another thread, once the child has ended, closes
    /// the sentinel, and the poll then watches the duplicate). Either way the number polled is
    /// not reused under the poll. mproc::Error as descriptor() says, and for a Process when no
    /// descriptor is left for the duplicate.
    int hold() const { return hold_ ? hold_(object_) : descriptor(); }
    /// Ends what hold() began; `held` is what it returned.
    void let_go(int held) const noexcept {
        if (let_go_) let_go_(object_, held);
    }

private:
    template <class T> static int connection_descriptor(void* object) {
        auto& connection = *static_cast<Connection<T>*>(object);
        connection.require_readable("wait");
        return connection.fileno();
    }
    template <class T> static bool connection_buffered(void* object) noexcept {
        return static_cast<Connection<T>*>(object)->buffered_now();
    }
    template <class T> static int connection_hold(void* object) {
        return static_cast<Connection<T>*>(object)->enter_wait();
    }
    template <class T> static void connection_let_go(void* object, int) noexcept {
        static_cast<Connection<T>*>(object)->leave_wait();
    }
    // `Proc` is Process, named through a parameter so that these compile only where it is complete.
    template <class Proc, class> static int process_descriptor(void* object) {
        return static_cast<Proc*>(object)->sentinel();
    }
    template <class Proc, class> static int process_hold(void* object) {
        return static_cast<Proc*>(object)->sentinel_copy("wait").release();
    }
    static void process_let_go(void*, int held) noexcept { detail::UniqueFd{held}.reset(); }

    void* object_ = nullptr;
    int fd_ = -1;
    int (*descriptor_)(void*) = nullptr;
    bool (*buffered_)(void*) noexcept = nullptr;
    int (*hold_)(void*) = nullptr;
    void (*let_go_)(void*, int) noexcept = nullptr;
};

/// Waits until at least one of `objects` is ready, or `timeout` has passed (no timeout: waits as
/// long as it takes), and returns the indices of those that are ready, in increasing order: empty
/// on timeout. Python's multiprocessing.connection.wait. Interrupted waits (EINTR) go on with the
/// time left. An object that cannot be waited on (see Waitable::descriptor), or a descriptor that
/// is not open, throws mproc::Error before anything is waited for. With no objects it sleeps
/// for the timeout, as Python's does.
inline std::vector<std::size_t> wait(std::span<const Waitable> objects, std::optional<Seconds> timeout = std::nullopt) {
    const detail::Deadline deadline = detail::deadline_after(timeout);
    std::vector<pollfd> polled;
    polled.reserve(objects.size());
    struct Held {  // what the wait holds (Waitable::hold), let go however it ends
        std::span<const Waitable> objects;
        const std::vector<pollfd>& polled;
        ~Held() {
            for (std::size_t i = 0; i < polled.size(); ++i) objects[i].let_go(polled[i].fd);
        }
    } held{objects, polled};
    bool any_buffered = false;
    for (const Waitable& object : objects) {
        polled.push_back({object.hold(), POLLIN, 0});
        any_buffered = any_buffered || object.buffered();
    }
    for (;;) {
        // A buffered message is ready now: then only look at what else is ready too.
        const int wait_ms = any_buffered ? 0 : detail::poll_timeout_ms(deadline);
        const int n = ::poll(polled.data(), polled.size(), wait_ms);
        if (n < 0) {
            if (errno == EINTR) continue;  // the deadline is absolute: the retry waits only what is left
            detail::throw_errno("wait: poll");
        }
        if (n == 0 && !any_buffered && !detail::expired(deadline)) continue;  // woke a hair early
        std::vector<std::size_t> ready;
        for (std::size_t i = 0; i < polled.size(); ++i) {
            if (polled[i].revents & POLLNVAL)
                throw Error("wait: descriptor " + std::to_string(polled[i].fd) + " is not open");
            if (polled[i].revents != 0 || objects[i].buffered()) ready.push_back(i);
        }
        return ready;
    }
}

/// mproc::wait({conn, process, fd}, 1s): the same, for a list written in place.
inline std::vector<std::size_t> wait(std::initializer_list<Waitable> objects,
                                     std::optional<Seconds> timeout = std::nullopt) {
    return wait(std::span<const Waitable>(objects.begin(), objects.size()), timeout);
}

}  // namespace mproc
