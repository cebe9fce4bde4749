// mproc — progress(): a tqdm-style progress bar for long loops over Pool results.
//
//     for (int v : mproc::progress(pool.imap(square, xs), xs.size())) { ... }
//
// draws, on stderr, when stderr is a terminal (and stays silent otherwise):
//
//      37%|███▋      | 370/1000 [00:01<00:02, 312.45it/s]
//
// redrawn at most ten times a second, and once more, with a newline, when the loop ends. Given the
// pool (opt-in: it reads the pool's stats() at each redraw), it also shows how busy the workers are:
//
//     for (int v : mproc::progress(pool.imap(square, xs), xs.size(), pool)) { ... }
//      37%|███▋      | 370/1000 [00:01<00:02, 312.45it/s] busy 2/2 workers, 96% since start
//
// A progress range is one loop's bar: iterate it on one thread at a time (each begin() starts the
// bar afresh); two threads looping over one need a bar each.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <functional>
#include <iterator>
#include <optional>
#include <ranges>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <utility>

namespace mproc {

namespace detail {

/// "MM:SS", or "H:MM:SS" past an hour.
inline std::string clock_text(double seconds) {
    if (!(seconds >= 0) || seconds > 1e7) return "?";
    const auto s = static_cast<long>(seconds + 0.5);
    char text[32];
    if (s >= 3600) std::snprintf(text, sizeof text, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
    else std::snprintf(text, sizeof text, "%02ld:%02ld", s / 60, s % 60);
    return text;
}

/// One line of the bar (without the leading carriage return).
inline std::string progress_line(std::size_t done, std::size_t total, double elapsed, int width = 10) {
    const double fraction = total ? std::min(1.0, static_cast<double>(done) / static_cast<double>(total)) : 0.0;
    const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0.0;
    std::string bar;
    if (total) {
        static const char* const eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
        const int cells = static_cast<int>(fraction * width * 8);
        for (int i = 0; i < cells / 8; ++i) bar += "█";
        int used = cells / 8;
        if (cells % 8 && used < width) {
            bar += eighths[cells % 8];
            ++used;
        }
        bar.append(static_cast<std::size_t>(width - used), ' ');
    }
    char head[64];
    std::snprintf(head, sizeof head, "%3d%%|", static_cast<int>(fraction * 100));
    const double left = rate > 0 && total >= done ? static_cast<double>(total - done) / rate : -1;
    char tail[160];
    std::snprintf(tail, sizeof tail, "| %zu/%zu [%s<%s, %.2fit/s]", done, total, clock_text(elapsed).c_str(),
                  total ? clock_text(left).c_str() : "?", rate);
    return head + bar + tail;
}

/// Draws the bar on a terminal; does nothing when the stream is not one.
class ProgressBar {
public:
    /// `extra`, if given, is called at each redraw for text to show after the bar.
    explicit ProgressBar(std::size_t total, int fd = STDERR_FILENO, std::function<std::string()> extra = {})
        : total_(total), fd_(fd), enabled_(::isatty(fd) == 1), start_(std::chrono::steady_clock::now()),
          extra_(std::move(extra)) {
        if (enabled_) draw();
    }
    ProgressBar(const ProgressBar&) = delete;
    ProgressBar& operator=(const ProgressBar&) = delete;
    ~ProgressBar() {
        try {
            finish();
        } catch (...) {}  // cosmetic: a last line that cannot be drawn (no memory) is not drawn
    }

    void step() {
        ++done_;
        if (!enabled_) return;
        const auto now = std::chrono::steady_clock::now();
        if (now - last_draw_ >= std::chrono::milliseconds(100) || done_ == total_) draw();
    }
    /// The final redraw and newline (once).
    void finish() {
        if (!enabled_ || finished_) return;
        finished_ = true;
        draw();
        write_all("\n");
    }

private:
    void draw() {
        last_draw_ = std::chrono::steady_clock::now();
        const double elapsed = std::chrono::duration<double>(last_draw_ - start_).count();
        std::string line = "\r" + progress_line(done_, total_, elapsed);
        if (extra_) {
            try {
                line += " " + extra_();
            } catch (...) {}  // cosmetic: a pool that cannot say (terminated, say) shows no more
        }
        write_all(line);
    }
    void write_all(const std::string& text) {
        std::size_t off = 0;
        while (off < text.size()) {
            const ssize_t n = ::write(fd_, text.data() + off, text.size() - off);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) return;  // a closed terminal: the bar is cosmetic, the loop goes on
            off += static_cast<std::size_t>(n);
        }
    }

    std::size_t total_;
    std::size_t done_ = 0;
    int fd_;
    bool enabled_;
    bool finished_ = false;
    std::chrono::steady_clock::time_point start_;
    std::chrono::steady_clock::time_point last_draw_{};
    std::function<std::string()> extra_;
};

/// "busy 2/2 workers, 96% since start" for anything with a Pool's stats().
template <class Pool> std::function<std::string()> utilisation_text(Pool& pool) {
    return [&pool] {
        const auto st = pool.stats();
        std::size_t running = 0;
        for (const auto& w : st.workers)
            if (w.current_task) ++running;
        char text[96];
        std::snprintf(text, sizeof text, "busy %zu/%zu workers, %.0f%% since start", running, st.workers.size(),
                      st.utilisation() * 100.0);
        return std::string(text);
    };
}

}  // namespace detail

/// A range that yields what `range` yields and draws a progress bar as the loop advances.
template <class Range> class ProgressRange {
public:
    ProgressRange(Range&& range, std::size_t total, std::function<std::string()> extra = {})
        : range_(std::forward<Range>(range)), total_(total), extra_(std::move(extra)) {}

    class iterator {
    public:
        using inner = std::ranges::iterator_t<std::remove_reference_t<Range>>;
        using value_type = std::iter_value_t<inner>;
        using difference_type = std::ptrdiff_t;
        iterator() = default;
        decltype(auto) operator*() const { return *it_; }
        iterator& operator++() {
            ++it_;
            bar_->step();
            return *this;
        }
        void operator++(int) { ++*this; }
        template <class Sentinel> friend bool operator==(const iterator& i, const Sentinel& s) {
            const bool end = i.it_ == s.end_;
            if (end) i.bar_->finish();
            return end;
        }

    private:
        friend class ProgressRange;
        iterator(inner it, detail::ProgressBar* bar) : it_(std::move(it)), bar_(bar) {}
        inner it_;
        detail::ProgressBar* bar_ = nullptr;
    };
    struct sentinel {
        std::ranges::sentinel_t<std::remove_reference_t<Range>> end_;
    };

    iterator begin() {
        bar_.emplace(total_, STDERR_FILENO, extra_);
        return iterator(std::ranges::begin(range_), &*bar_);
    }
    sentinel end() { return {std::ranges::end(range_)}; }

private:
    Range range_;  // a reference for an lvalue range, the range itself for an rvalue
    std::size_t total_;
    std::function<std::string()> extra_;
    std::optional<detail::ProgressBar> bar_;
};

/// Wraps `range` so that looping over it draws a tqdm-style bar on stderr (when it is a
/// terminal): done/total, rate, elapsed time and the time left.
template <class Range> ProgressRange<Range> progress(Range&& range, std::size_t total) {
    return ProgressRange<Range>(std::forward<Range>(range), total);
}
/// The same, and after the bar how busy `pool`'s workers are (a Pool, or anything with its
/// stats()): read at each redraw, at most ten times a second.
template <class Range, class Pool> requires requires(Pool& p) { p.stats().utilisation(); }
ProgressRange<Range> progress(Range&& range, std::size_t total, Pool& pool) {
    return ProgressRange<Range>(std::forward<Range>(range), total, detail::utilisation_text(pool));
}
/// The same, taking the total from a sized range.
template <std::ranges::sized_range Range> ProgressRange<Range> progress(Range&& range) {
    const auto total = static_cast<std::size_t>(std::ranges::size(range));
    return ProgressRange<Range>(std::forward<Range>(range), total);
}

}  // namespace mproc
