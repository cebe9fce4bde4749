#!/usr/bin/env bash
# mproc Quick start: the two commands of the README.
#
#   bash cmake/quickstart.sh examples                    build and run every example
#   bash cmake/quickstart.sh test [PRESET ...]           build and run every test (default: release)
#                                                        PRESET: release clang asan tsan
#
# Works from any directory. Installs the Debian packages it needs when they are missing (as root,
# or through sudo); otherwise it names them and stops. Builds go to build/<preset> through
# CMakePresets.json, with at most 2 parallel jobs. `test` closes on ctest's summary line
# ("100% tests passed, 0 tests failed out of N"), once per preset; it exits non-zero if any fails.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

usage() {
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

say() { printf '\n==> %s\n' "$*"; }

# ensure_packages PKG...: installs those of PKG that are not installed yet.
ensure_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        echo "quickstart: not a Debian system; make sure these are installed: $*" >&2
        return 0
    fi
    local missing=() pkg
    for pkg in "$@"; do
        if [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) != installed ]]; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]} == 0)) && return 0

    say "Installing missing packages: ${missing[*]}"
    local sudo=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo env DEBIAN_FRONTEND=noninteractive)
        else
            echo "quickstart: missing packages: ${missing[*]}" >&2
            echo "quickstart: run as root or install them with: apt-get install ${missing[*]}" >&2
            exit 1
        fi
    fi
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

base_packages=(cmake g++ ninja-build libfmt-dev)

run_examples() {
    ensure_packages "${base_packages[@]}"
    cd "$root"
    say "Building and running every example (preset: examples, in build/examples)"
    cmake --workflow --preset examples
}

run_tests() {
    local presets=("$@") preset
    ((${#presets[@]} == 0)) && presets=(release)
    # pkgconf: the consumer.pkgconfig test builds a program with `pkg-config --cflags --libs mproc`.
    local packages=("${base_packages[@]}" catch2 pkgconf)
    for preset in "${presets[@]}"; do
        case $preset in
            release | asan | tsan) ;;
            clang) packages+=(clang-16) ;;
            *) echo "quickstart: unknown preset '$preset' (release, clang, asan, tsan)" >&2; exit 2 ;;
        esac
    done
    ensure_packages "${packages[@]}"
    cd "$root"

    local summaries=() failed=0 log line
    for preset in "${presets[@]}"; do
        say "Building and testing: preset $preset (build/$preset)"
        mkdir -p "build/$preset"
        log="build/$preset/quickstart-test.log"
        if cmake --workflow --preset "$preset" 2>&1 | tee "$log"; then :; else failed=1; fi
        line=$(grep -E '^[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1 || true)
        summaries+=("$preset" "${line:-no test summary: the configure or build step failed (see above)}")
    done

    say "Test summary"
    local i
    for ((i = 0; i < ${#summaries[@]}; i += 2)); do
        printf '%s:\n%s\n' "${summaries[i]}" "${summaries[i + 1]}"
    done
    return "$failed"
}

(($# >= 1)) || usage
command=$1
shift
case $command in
    examples) (($# == 0)) || usage; run_examples ;;
    test) run_tests "$@" ;;
    -h | --help | help) usage ;;
    *) usage ;;
esac
