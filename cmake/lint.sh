#!/usr/bin/env bash
# mproc's static analysis of the headers: clang-tidy-16 with the checks of .clang-tidy, and cppcheck.
#
#   bash cmake/lint.sh [tidy|cppcheck|all]        (default: all)
#
# clang-tidy analyses a file that includes every header, and then the examples and the fuzz targets,
# so that the templates are checked as instantiated; only findings in include/mproc/ count. A finding
# fails the run unless cmake/lint-baseline.txt lists its file and check (known, to be fixed).
# cppcheck reads every header; its false reports are suppressed, with reasons, in
# cmake/cppcheck-suppressions.txt. Needs clang-tidy-16 and cppcheck (apt-get install clang-tidy-16
# cppcheck). Exit status 0 when both are clean.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
what=${1:-all}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0

# Headers that need more than mproc's dependencies (MPI) are analysed only where they build.
# The committed headers (all of them outside a git checkout).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    candidates=$(git ls-files 'include/mproc/*.hpp')
else
    candidates=$(find include/mproc -name '*.hpp' | sort)
fi
# The MPI headers need MPI's include directories (from mpicxx); without MPI they are skipped.
mpi_flags=()
if command -v mpicxx >/dev/null 2>&1; then
    read -r -a mpi_flags <<<"$(mpicxx --showme:compile 2>/dev/null || true)"
fi
headers=()
for h in $candidates; do
    case $h in
        *mpi*) ((${#mpi_flags[@]} > 0)) || continue ;;
    esac
    headers+=("$h")
done

run_tidy() {
    command -v clang-tidy-16 >/dev/null || { echo "lint.sh: clang-tidy-16 is not installed" >&2; return 1; }
    local all="$work/all_headers.cpp" h
    for h in "${headers[@]}"; do echo "#include <${h#include/}>"; done >"$all"
    local sources=("$all")
    for f in examples/*.cpp tests/fuzz/fuzz_*.cpp; do
        case $f in *mpi*) continue ;; esac
        sources+=("$f")
    done
    local started=$SECONDS
    # One process per file, two at a time; the exit status is ignored: the findings are read below.
    printf '%s\n' "${sources[@]}" | xargs -P 2 -I{} sh -c \
        'f=$1; shift; clang-tidy-16 --quiet "$f" -- -std=c++20 "$@" >"'"$work"'/$(echo "$f" | tr / _).tidy" 2>&1 || true' \
        _ {} -I"$root/include" "${mpi_flags[@]}"
    # file:line:col check, once each, for findings in the headers.
    cat "$work"/*.tidy | sed -nE "s#^(${root}/)?(include/mproc/[^:]*):([0-9]+):([0-9]+): (warning|error): .*\[([a-z0-9.-]+)[^]]*\]\$#\2:\3:\4 \6#p" |
        sort -u >"$work/findings"
    local compile_errors
    compile_errors=$(grep -h 'clang-diagnostic-error' "$work"/*.tidy || true)
    local new=0 known=0 file_check
    while read -r loc check; do
        file=${loc%%:*}
        if grep -qxF "$file $check" <(grep -v '^#' cmake/lint-baseline.txt); then
            known=$((known + 1))
        else
            new=$((new + 1))
            echo "clang-tidy: $loc [$check]"
            grep -h -A3 -F "$loc:" "$work"/*.tidy | head -n 4 | sed 's/^/    /'
        fi
    done <"$work/findings"
    if [[ -n $compile_errors ]]; then
        echo "clang-tidy: a file did not compile:"
        echo "$compile_errors" | head -n 20
        new=$((new + 1))
    fi
    # Baseline entries that no longer occur should be removed.
    while read -r file check; do
        [[ -z $file || $file == \#* ]] && continue
        grep -q "^$file:[0-9]*:[0-9]* $check\$" "$work/findings" || echo "clang-tidy: note: '$file $check' is fixed: remove it from cmake/lint-baseline.txt"
    done <cmake/lint-baseline.txt
    echo "clang-tidy: ${#sources[@]} files analysed, ${#headers[@]} headers: $new new findings, $known known (cmake/lint-baseline.txt) in $((SECONDS - started)) s"
    ((new == 0))
}

run_cppcheck() {
    command -v cppcheck >/dev/null || { echo "lint.sh: cppcheck is not installed" >&2; return 1; }
    local started=$SECONDS
    if cppcheck --enable=warning,performance,portability --std=c++20 --language=c++ -I include \
        --inline-suppr --suppressions-list=cmake/cppcheck-suppressions.txt --suppress=missingIncludeSystem \
        --quiet --error-exitcode=1 --template='{file}:{line}: {severity}: {message} [{id}]' "${headers[@]}"; then
        echo "cppcheck: ${#headers[@]} headers: no findings in $((SECONDS - started)) s"
    else
        echo "cppcheck: findings above ($((SECONDS - started)) s)"
        return 1
    fi
}

case $what in
    tidy) run_tidy || failed=1 ;;
    cppcheck) run_cppcheck || failed=1 ;;
    all) run_tidy || failed=1; run_cppcheck || failed=1 ;;
    *) sed -n '2,10p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
exit "$failed"
