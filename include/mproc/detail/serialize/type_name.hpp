// mproc — readable type names for errors that cross process boundaries.
#pragma once

#include <cstdlib>
#include <cxxabi.h>
#include <exception>
#include <memory>
#include <string>
#include <typeinfo>

namespace mproc::detail {

inline std::string demangle(const char* mangled) {
    int status = 0;
    std::unique_ptr<char, void (*)(void*)> readable(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
    return status == 0 && readable ? std::string(readable.get()) : std::string(mangled);
}

/// The demangled name of T.
template <class T> std::string type_name() { return demangle(typeid(T).name()); }

/// The demangled dynamic type of the exception being handled (call inside a catch block).
inline std::string current_exception_type_name() {
    const std::type_info* type = abi::__cxa_current_exception_type();
    return type ? demangle(type->name()) : std::string("unknown exception");
}

/// "<type>: <what()>" of the exception being handled (call inside a catch block); what() is empty
/// for a type that is not a std::exception.
inline std::string describe_current_exception() {
    std::string text = current_exception_type_name() + ": ";
    try {
        throw;
    } catch (const std::exception& e) {
        text += e.what();
    } catch (...) {}
    return text;
}

}  // namespace mproc::detail
