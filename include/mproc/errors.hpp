// mproc — the exception hierarchy.
//
// Every error mproc raises derives from mproc::Error, itself a std::runtime_error, so one
// `catch (const mproc::Error&)` sees them all. Messages are one line that says what happened
// and to whom ("task 17 lost: worker 4242 killed by SIGSEGV").
#pragma once

#include <csignal>
#include <cstring>
#include <stdexcept>
#include <string>
#include <sys/types.h>

namespace mproc {

/// The base of everything mproc throws.
class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// An exception of a type mproc cannot rebuild was thrown in another process.
/// Carries the demangled type name and the original what().
class RemoteError : public Error {
public:
    RemoteError(std::string type_name, const std::string& message)
        : Error(type_name + ": " + message), type_name_(std::move(type_name)), message_(message) {}
    const std::string& type_name() const noexcept { return type_name_; }
    const std::string& message() const noexcept { return message_; }

private:
    std::string type_name_;
    std::string message_;
};

namespace detail {
/// "SIGSEGV" for 11, "signal 64" for what has no name.
inline std::string signal_name(int sig) {
    if (const char* abbrev = sigabbrev_np(sig)) return std::string("SIG") + abbrev;
    return "signal " + std::to_string(sig);
}
}  // namespace detail

/// A worker process died (signal, exit, OOM kill) while it held a task.
class WorkerLost : public Error {
public:
    /// `signal` is 0 when the worker exited; `exit_status` is then its status.
    WorkerLost(const std::string& what_was_lost, pid_t pid, int signal, int exit_status)
        : Error(what_was_lost + " lost: worker " + std::to_string(pid) +
                (signal != 0 ? " killed by " + detail::signal_name(signal)
                             : " exited with status " + std::to_string(exit_status))),
          pid_(pid), signal_(signal), exit_status_(exit_status) {}
    pid_t pid() const noexcept { return pid_; }
    int signal() const noexcept { return signal_; }
    int exit_status() const noexcept { return exit_status_; }

private:
    pid_t pid_;
    int signal_;
    int exit_status_;
};

/// A wait with a deadline ran out (AsyncResult::get(timeout), a task past task_timeout).
class TimeoutError : public Error {
public:
    using Error::Error;
};

/// The call was cancelled (AsyncResult::cancel(), or an imap loop left early): its get() throws
/// this instead of a value (Python's concurrent.futures.CancelledError).
class CancelledError : public Error {
public:
    using Error::Error;
};

/// A Pool task went past PoolOptions::memory_limit: its worker ended and was replaced, and the
/// item failed (after its retries, if any).
class MemoryLimitExceeded : public Error {
public:
    using Error::Error;
};

/// recv() on a connection whose peers are all closed, with nothing left to read.
class EOFError : public Error {
public:
    using Error::Error;
};

/// send() to a peer that has closed its end.
class BrokenPipeError : public Error {
public:
    using Error::Error;
};

/// Queue::get with a timeout found nothing.
class Empty : public Error {
public:
    using Error::Error;
};

/// Queue::put on a full bounded queue timed out, or a SharedDict reached its size limit.
class Full : public Error {
public:
    using Error::Error;
};

/// A SharedDict lookup of a key that is not there.
class KeyError : public Error {
public:
    using Error::Error;
};

/// A SharedList index out of range (Python's IndexError). A KeyError, so it crosses a Pool as one.
class IndexError : public KeyError {
public:
    using KeyError::KeyError;
};

/// Bytes that do not decode as the expected type: truncated, oversized or corrupt.
class SerializationError : public Error {
public:
    using Error::Error;
};

/// A Barrier that was aborted, reset under its waiters, or broken by a wait that timed out or a
/// party that died: thrown to every waiter, and to each arrival until reset() (Python's
/// threading.BrokenBarrierError).
class BrokenBarrierError : public Error {
public:
    using Error::Error;
};

/// A Queue after shutdown(): put() always, get() once nothing is left (Python 3.13's
/// queue.ShutDown).
class ShutDown : public Error {
public:
    using Error::Error;
};

namespace detail {
/// "what: strerror(errno)" as an mproc::Error, for failed system calls.
/// strerror_r, not strerror: Pool's parent threads may fail system calls at the same time.
[[noreturn]] inline void throw_errno(const std::string& what, int err = errno) {
    char text[256];
    throw Error(what + ": " + ::strerror_r(err, text, sizeof text));  // GNU strerror_r: returns the text
}
}  // namespace detail

}  // namespace mproc
