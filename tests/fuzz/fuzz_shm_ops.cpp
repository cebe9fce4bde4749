// libFuzzer target: random operation sequences on a Queue and a SharedDict, checked step by step
// against a std::deque and an insertion-ordered std::map model (one process: the shared-memory
// structures and their locking are exercised, without the timing of other processes).
//
// Each input is a program: one opcode byte, then the operands it needs. Properties:
//   Queue   — FIFO order; put_nowait on a bounded queue throws Full exactly when the model holds
//             maxsize items; get_nowait/try_get on an empty queue give Empty/nullopt; qsize,
//             empty and full agree with the model; a closed handle's put throws Error while a copy
//             of the handle still puts.
//   SharedDict — set/get/at/contains/erase/pop/update/+=/size/clear/items/keys/values agree with
//             the model; items() keeps insertion order; an insert past max_bytes throws Full and
//             changes nothing (the whole dict is compared with the model afterwards).
#include <mproc/errors.hpp>
#include <mproc/queue.hpp>
#include <mproc/shared_dict.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace {

[[noreturn]] void fail(const char* what, std::size_t step) {
    std::fprintf(stderr, "fuzz_shm_ops: step %zu: property violated: %s\n", step, what);
    std::abort();
}

class Input {
public:
    Input(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
    bool done() const { return at_ >= size_; }
    std::uint8_t byte() { return at_ < size_ ? data_[at_++] : 0; }
    std::uint16_t u16() { return static_cast<std::uint16_t>(byte() | (byte() << 8)); }
    /// A string whose length is chosen by the input: mostly short, sometimes up to ~16 KiB.
    std::string text() {
        const std::uint8_t b = byte();
        std::size_t n = b & 0x3F;
        if (b & 0x80) n = static_cast<std::size_t>(u16()) % (16 << 10);
        std::string s(n, '\0');
        const char fill = static_cast<char>(byte());
        for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>(fill + static_cast<char>(i * 7));
        return s;
    }
    /// Keys come from a small set so that operations meet the same entries often.
    std::string key() { return "k" + std::to_string(byte() % 24); }

private:
    const std::uint8_t* data_;
    std::size_t size_;
    std::size_t at_ = 0;
};

/// A dict model that remembers insertion order, as SharedDict::items() does.
class DictModel {
public:
    std::optional<std::string> get(const std::string& k) const {
        auto it = values_.find(k);
        if (it == values_.end()) return std::nullopt;
        return it->second;
    }
    void set(const std::string& k, std::string v) {
        if (values_.find(k) == values_.end()) order_.push_back(k);
        values_[k] = std::move(v);
    }
    bool erase(const std::string& k) {
        if (values_.erase(k) == 0) return false;
        order_.erase(std::find(order_.begin(), order_.end(), k));
        return true;
    }
    void clear() {
        values_.clear();
        order_.clear();
    }
    std::size_t size() const { return values_.size(); }
    std::vector<std::pair<std::string, std::string>> items() const {
        std::vector<std::pair<std::string, std::string>> out;
        out.reserve(order_.size());
        for (const auto& k : order_) out.emplace_back(k, values_.at(k));
        return out;
    }

private:
    std::map<std::string, std::string> values_;
    std::vector<std::string> order_;
};

constexpr std::size_t queue_maxsize = 32;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    Input in(data, size);
    // A small ring (1 MiB) that 32 items of at most ~16 KiB always fit in, so only maxsize can
    // make a put fail; a dict small enough that the input can fill it.
    mproc::Queue<std::string> q({.maxsize = queue_maxsize, .buffer_bytes = std::size_t{1} << 20});
    mproc::Queue<std::string> q2 = q;  // a second handle to the same queue
    mproc::SharedDict<std::string, std::string> d({.max_bytes = std::size_t{96} << 10});
    mproc::SharedDict<std::string, long> counters({.max_bytes = std::size_t{64} << 10});
    std::deque<std::string> qm;
    DictModel dm;
    std::map<std::string, long> cm;
    bool q_closed = false;

    for (std::size_t step = 0; !in.done() && step < 4096; ++step) {
        const std::uint8_t op = in.byte() % 18;
        switch (op) {
            case 0:
            case 1: {  // put_nowait, through either handle
                std::string item = in.text();
                auto& handle = op == 0 ? q : q2;
                if (op == 0 && q_closed) {
                    try {
                        handle.put_nowait(item);
                        fail("put on a closed handle succeeded", step);
                    } catch (const mproc::Full&) {
                        fail("put on a closed handle threw Full", step);
                    } catch (const mproc::Error&) {}
                    break;
                }
                try {
                    handle.put_nowait(item);
                    if (qm.size() >= queue_maxsize) fail("put past maxsize succeeded", step);
                    qm.push_back(std::move(item));
                } catch (const mproc::Full&) {
                    if (qm.size() < queue_maxsize) fail("Full below maxsize", step);
                }
                break;
            }
            case 2: {  // get_nowait
                try {
                    std::string got = (in.byte() & 1 ? q : q2).get_nowait();
                    if (qm.empty()) fail("get_nowait on an empty queue returned an item", step);
                    if (got != qm.front()) fail("queue order differs from the model", step);
                    qm.pop_front();
                } catch (const mproc::Empty&) {
                    if (!qm.empty()) fail("Empty while the model holds items", step);
                }
                break;
            }
            case 3: {  // try_get
                auto got = q.try_get();
                if (got.has_value() != !qm.empty()) fail("try_get disagrees with the model", step);
                if (got) {
                    if (*got != qm.front()) fail("try_get order differs from the model", step);
                    qm.pop_front();
                }
                break;
            }
            case 4: {  // sizes; a get with a short timeout on an empty queue
                if (q.qsize() != qm.size() || q2.qsize() != qm.size()) fail("qsize differs", step);
                if (q.empty() != qm.empty()) fail("empty() differs", step);
                if (q.full() != (qm.size() >= queue_maxsize)) fail("full() differs", step);
                if (qm.empty()) {
                    try {
                        (void)q.get(std::chrono::microseconds(50));
                        fail("get on an empty queue returned", step);
                    } catch (const mproc::Empty&) {}
                }
                break;
            }
            case 5:  // close this handle (the copy stays open)
                q.close();
                q_closed = true;
                break;
            case 6:
            case 7: {  // set
                const std::string k = in.key();
                std::string v = in.text();
                try {
                    d.set(k, v);
                    dm.set(k, std::move(v));
                } catch (const mproc::Full&) {
                    // unchanged: verified at the next full comparison, and here for this key
                    if (d.get(k) != dm.get(k)) fail("a Full set changed its key", step);
                }
                break;
            }
            case 8: {  // get / at / contains
                const std::string k = in.key();
                const auto want = dm.get(k);
                if (d.get(k) != want) fail("get differs", step);
                if (d.contains(k) != want.has_value()) fail("contains differs", step);
                try {
                    if (d.at(k) != want) fail("at differs", step);
                } catch (const mproc::KeyError&) {
                    if (want) fail("at threw KeyError for a present key", step);
                }
                break;
            }
            case 9: {  // erase
                const std::string k = in.key();
                if (d.erase(k) != dm.erase(k)) fail("erase result differs", step);
                break;
            }
            case 10: {  // pop
                const std::string k = in.key();
                const auto want = dm.get(k);
                if (d.pop(k) != want) fail("pop differs", step);
                dm.erase(k);
                break;
            }
            case 11: {  // update: append to the old value; a throwing fn changes nothing
                const std::string k = in.key();
                const std::string add = in.text();
                const bool throw_inside = (in.byte() & 7) == 0;
                try {
                    const std::string got = d.update(k, [&](std::optional<std::string> old) {
                        if (old != dm.get(k)) fail("update saw a different old value", step);
                        if (throw_inside) throw std::runtime_error("refused");
                        return old.value_or("") + add;
                    });
                    if (throw_inside) fail("a throwing update returned", step);
                    dm.set(k, got);
                } catch (const std::runtime_error& e) {
                    if (dynamic_cast<const mproc::Full*>(&e) == nullptr && !throw_inside) throw;
                }
                break;
            }
            case 12: {  // d[k] += n on the counters (KeyError when absent)
                const std::string k = in.key();
                const long n = static_cast<std::int8_t>(in.byte());
                auto it = cm.find(k);
                try {
                    const long got = counters[k] += n;
                    if (it == cm.end()) fail("+= on an absent key succeeded", step);
                    it->second += n;
                    if (got != it->second) fail("+= returned a different value", step);
                } catch (const mproc::KeyError&) {
                    if (it != cm.end()) fail("+= threw KeyError for a present key", step);
                }
                break;
            }
            case 13: {  // counters[k] = n
                const std::string k = in.key();
                const long n = in.u16();
                try {
                    counters[k] = n;
                    cm[k] = n;
                } catch (const mproc::Full&) {}
                break;
            }
            case 14:
                if ((in.byte() & 3) == 0) {
                    d.clear();
                    dm.clear();
                }
                break;
            case 15:
            case 16: {  // whole comparisons
                if (d.size() != dm.size()) fail("size differs", step);
                if (d.items() != dm.items()) fail("items() differs (content or insertion order)", step);
                std::vector<std::string> keys, values;
                for (auto& [k, v] : dm.items()) {
                    keys.push_back(k);
                    values.push_back(v);
                }
                if (d.keys() != keys) fail("keys() differs", step);
                if (d.values() != values) fail("values() differs", step);
                std::map<std::string, long> counted;
                for (auto& [k, v] : counters.items()) counted[k] = v;
                if (counted != cm) fail("counters differ", step);
                break;
            }
            default: {  // drain the queue completely, checking order
                while (!qm.empty()) {
                    if (q2.get(std::chrono::seconds(5)) != qm.front()) fail("drain order differs", step);
                    qm.pop_front();
                }
                if (q2.try_get()) fail("queue holds more than the model", step);
                break;
            }
        }
    }
    // Final check: both structures equal their models.
    if (d.items() != dm.items()) fail("final items() differ", 0);
    while (!qm.empty()) {
        auto got = q2.try_get();
        if (!got || *got != qm.front()) fail("final queue contents differ", 0);
        qm.pop_front();
    }
    if (q2.try_get()) fail("final queue holds more than the model", 0);
    return 0;
}
