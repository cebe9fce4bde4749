// mproc — carrying an exception from the process that threw it to the one that waits for it.
//
// The standard exceptions a task is likely to throw, and mproc's own errors, are rebuilt as the
// same type with the same what(); anything else becomes mproc::RemoteError with the demangled type
// name and message. (mproc's errors are std::runtime_errors: without their own kinds, a KeyError
// or a "create it before the process that uses it" Error thrown in a worker would come back as a bare
// std::runtime_error that `catch (const mproc::Error&)` misses.)
#pragma once

#include <cstdint>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>

#include "../../errors.hpp"
#include "type_name.hpp"

namespace mproc::detail {

/// An exception in transit: which standard type it was (most derived of those mproc rebuilds),
/// its demangled dynamic type, and its what().
struct RemoteException {
    enum Kind : std::uint8_t {
        other,
        logic_error,
        invalid_argument,
        domain_error,
        length_error,
        out_of_range,
        runtime_error,
        range_error,
        overflow_error,
        underflow_error,
        bad_alloc,
        // mproc's errors (appended: the numbers above never change)
        mproc_error,
        timeout_error,
        eof_error,
        broken_pipe_error,
        empty,
        full,
        key_error,
        serialization_error,
        broken_barrier_error,
        shut_down,
        cancelled_error,
        memory_limit_exceeded,
        worker_lost,  // message: what was lost ("task 7 (item 2)"); then pid, signal, exit status
    };
    std::uint8_t kind = other;
    std::string type_name;
    std::string message;
    std::int64_t lost[3] = {0, 0, 0};  // worker_lost: pid, signal, exit status

    template <class Archive> void serialize(Archive& ar) {
        ar(kind, type_name, message);
        if (kind == worker_lost) ar(lost[0], lost[1], lost[2]);
    }

    /// Describes the exception being handled. Call inside a catch block.
    static RemoteException capture() {
        RemoteException e;
        e.type_name = current_exception_type_name();
        try {
            throw;
        } catch (const RemoteError& x) {  // passed on as it came: same type name, same message
            e.kind = other;
            e.type_name = x.type_name();
            e.message = x.message();
        } catch (const TimeoutError& x) {
            e.set(timeout_error, x);
        } catch (const EOFError& x) {
            e.set(eof_error, x);
        } catch (const BrokenPipeError& x) {
            e.set(broken_pipe_error, x);
        } catch (const Empty& x) {
            e.set(empty, x);
        } catch (const Full& x) {
            e.set(full, x);
        } catch (const KeyError& x) {
            e.set(key_error, x);
        } catch (const SerializationError& x) {
            e.set(serialization_error, x);
        } catch (const BrokenBarrierError& x) {
            e.set(broken_barrier_error, x);
        } catch (const ShutDown& x) {
            e.set(shut_down, x);
        } catch (const CancelledError& x) {
            e.set(cancelled_error, x);
        } catch (const MemoryLimitExceeded& x) {
            e.set(memory_limit_exceeded, x);
        } catch (const WorkerLost& x) {
            // Rebuilt whole on the other side (an mpi::Pool's rank relays its local workers').
            e.set(worker_lost, x);
            const std::string what = x.what();
            const std::size_t cut = what.rfind(" lost: worker ");
            e.message = cut == std::string::npos ? what : what.substr(0, cut);
            e.lost[0] = x.pid();
            e.lost[1] = x.signal();
            e.lost[2] = x.exit_status();
        } catch (const Error& x) {
            e.set(mproc_error, x);
        } catch (const std::invalid_argument& x) {
            e.set(invalid_argument, x);
        } catch (const std::domain_error& x) {
            e.set(domain_error, x);
        } catch (const std::length_error& x) {
            e.set(length_error, x);
        } catch (const std::out_of_range& x) {
            e.set(out_of_range, x);
        } catch (const std::logic_error& x) {
            e.set(logic_error, x);
        } catch (const std::range_error& x) {
            e.set(range_error, x);
        } catch (const std::overflow_error& x) {
            e.set(overflow_error, x);
        } catch (const std::underflow_error& x) {
            e.set(underflow_error, x);
        } catch (const std::runtime_error& x) {
            e.set(runtime_error, x);
        } catch (const std::bad_alloc& x) {
            e.set(bad_alloc, x);
        } catch (const std::exception& x) {
            e.set(other, x);
        } catch (...) {}
        return e;
    }

    /// A SerializationError "<context>: <type>: <what()>" for the exception being handled: what a
    /// value that could not be encoded or decoded becomes. Call inside a catch block.
    static RemoteException capture_as_serialization_error(const std::string& context) {
        RemoteException e;
        e.kind = serialization_error;
        e.type_name = "mproc::SerializationError";
        e.message = context + ": " + describe_current_exception();
        return e;
    }

    /// The exception to rethrow on this side.
    std::exception_ptr rebuild() const {
        switch (kind) {
            case logic_error: return std::make_exception_ptr(std::logic_error(message));
            case invalid_argument: return std::make_exception_ptr(std::invalid_argument(message));
            case domain_error: return std::make_exception_ptr(std::domain_error(message));
            case length_error: return std::make_exception_ptr(std::length_error(message));
            case out_of_range: return std::make_exception_ptr(std::out_of_range(message));
            case runtime_error: return std::make_exception_ptr(std::runtime_error(message));
            case range_error: return std::make_exception_ptr(std::range_error(message));
            case overflow_error: return std::make_exception_ptr(std::overflow_error(message));
            case underflow_error: return std::make_exception_ptr(std::underflow_error(message));
            case bad_alloc: return std::make_exception_ptr(std::bad_alloc());
            case mproc_error: return std::make_exception_ptr(Error(message));
            case timeout_error: return std::make_exception_ptr(TimeoutError(message));
            case eof_error: return std::make_exception_ptr(EOFError(message));
            case broken_pipe_error: return std::make_exception_ptr(BrokenPipeError(message));
            case empty: return std::make_exception_ptr(Empty(message));
            case full: return std::make_exception_ptr(Full(message));
            case key_error: return std::make_exception_ptr(KeyError(message));
            case serialization_error: return std::make_exception_ptr(SerializationError(message));
            case broken_barrier_error: return std::make_exception_ptr(BrokenBarrierError(message));
            case shut_down: return std::make_exception_ptr(ShutDown(message));
            case cancelled_error: return std::make_exception_ptr(CancelledError(message));
            case memory_limit_exceeded: return std::make_exception_ptr(MemoryLimitExceeded(message));
            case worker_lost:
                return std::make_exception_ptr(WorkerLost(message, static_cast<pid_t>(lost[0]),
                                                          static_cast<int>(lost[1]), static_cast<int>(lost[2])));
            default: return std::make_exception_ptr(RemoteError(type_name, message));
        }
    }

private:
    void set(Kind k, const std::exception& x) {
        kind = k;
        message = x.what();
    }
};

}  // namespace mproc::detail
