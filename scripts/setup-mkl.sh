#!/usr/bin/env bash
# Fetch Intel MKL (static libraries, headers, OpenMP runtime) from PyPI, with no Intel
# installer, and print the build line for `--features mkl`. Everything is linked statically:
# the binary needs no MKL or OpenMP library at run time.
#
#   scripts/setup-mkl.sh            # then run the line it prints
set -euo pipefail
root="${CANDOR_MKL_DIR:-$HOME/.cache/candor/mkl}"
mkdir -p "$root/wheels" "$root/lib" "$root/include"
python3 -m pip download --quiet --no-deps --dest "$root/wheels" mkl-static mkl-include intel-openmp
tmp="$(mktemp -d)"
for wheel in "$root"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$tmp"
done
cp -r "$tmp"/*.data/data/lib/. "$root/lib/"
cp -r "$tmp"/*.data/data/include/. "$root/include/"
rm -rf "$tmp"
echo "MKLROOT=$root cargo build --release --features mkl"
