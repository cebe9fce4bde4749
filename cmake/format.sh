#!/usr/bin/env bash
# mproc's formatting: clang-format-16 (the formatter of record) with the project's .clang-format,
# over every tracked C++ file (*.hpp, *.cpp: include/, tests/, examples/, bench/).
#
#   bash cmake/format.sh            format them in place
#   bash cmake/format.sh --check    change nothing: print what would change, exit 1 if anything would
#
# Needs clang-format-16 (apt-get install clang-format-16); CLANG_FORMAT=<path> names another binary
# of version 16. Another major version formats some constructs differently, so it is refused.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

check=0
case ${1:-} in
    --check) check=1 ;;
    "") ;;
    *) usage ;;
esac
(($# <= 1)) || usage

clang_format=${CLANG_FORMAT:-clang-format-16}
if ! command -v "$clang_format" >/dev/null 2>&1; then
    echo "format.sh: $clang_format not found (apt-get install clang-format-16)" >&2
    exit 2
fi
if ! "$clang_format" --version | grep -q 'version 16\.'; then
    echo "format.sh: $clang_format is not clang-format 16: $("$clang_format" --version)" >&2
    exit 2
fi

# The tracked C++ files (outside a git checkout, those of the same folders).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    mapfile -t files < <(git ls-files -- '*.hpp' '*.cpp')
else
    mapfile -t files < <(find include tests examples bench -type f \( -name '*.hpp' -o -name '*.cpp' \) | sort)
fi
((${#files[@]} > 0)) || { echo "format.sh: no C++ files found" >&2; exit 2; }

if ((check)); then
    # --Werror: each file that formatting would change is reported (with the line) and fails the run.
    if "$clang_format" --style=file --dry-run --Werror "${files[@]}"; then
        echo "format.sh: ${#files[@]} files formatted"
    else
        echo "format.sh: files above are not formatted: run bash cmake/format.sh" >&2
        exit 1
    fi
else
    "$clang_format" --style=file -i "${files[@]}"
    echo "format.sh: ${#files[@]} files formatted in place"
fi
