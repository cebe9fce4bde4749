// mproc — which sanitizer this build runs under, where mproc must behave differently for it.
//
// MPROC_TSAN is defined under ThreadSanitizer (GCC defines __SANITIZE_THREAD__, clang answers
// __has_feature(thread_sanitizer)). Its runtime does not intercept everything mproc calls:
// pthread_mutex_clocklock (robust_mutex.hpp tells it about the lock through its annotations) and
// pwritev2 (io.hpp keeps to writev for pipes under it).
#pragma once

#if defined(__SANITIZE_THREAD__)
#define MPROC_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MPROC_TSAN 1
#endif
#endif
