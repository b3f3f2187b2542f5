#!/usr/bin/env bash
# Build .gpu/site.tar.xz: the packages hiveengine needs that a GPU machine without a package index lacks, unpacked
# from PyPI's wheels and trimmed, for tools/gpu_proof.sh to put on PYTHONPATH there.
#
#   tools/gpu_site.sh [PYTHON_VERSION] [CUDA_MAJOR]     # default: 3.12 13 (an image with torch cu130)
#
# UCX's Python bindings (ucxx-cuNN and the libraries it loads), zstandard, cryptography (with cffi) and
# bitsandbytes (for the kernel benchmark's comparison). The machine must already have torch, numpy, cuda-bindings,
# cuda-core and nvidia-ml-py, as the CUDA images in use do. Static libraries, headers, UCX's test programs and the
# CUDA builds of bitsandbytes for other CUDA versions are dropped; identical shared libraries become symlinks.
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
cuda=${2:-13}
wheels=$(mktemp -d)
site=$(mktemp -d)
trap 'rm -rf "$wheels" "$site"' EXIT
platforms=()
for tag in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
  manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  "${platforms[@]}" -d "$wheels" \
  "ucxx-cu$cuda==0.52.*" "libucxx-cu$cuda==0.52.*" "libucx-cu$cuda>=1.19,<1.22" "librmm-cu$cuda==26.10.*" \
  "rmm-cu$cuda==26.10.*" "rapids-logger==0.3.*" zstandard cryptography cffi pycparser bitsandbytes
for wheel in "$wheels"/*.whl; do
  python3 -m zipfile -e "$wheel" "$site"
done
find "$site" -name "*.a" -delete
find "$site" -depth -type d \( -name include -o -name cmake -o -name pkgconfig -o -name tests \) -exec rm -rf {} +
rm -rf "$site/libucx/bin" "$site/libucx/share" "$site"/zstandard/_cffi*.so
find "$site" -name "*perftest*" -delete
find "$site/bitsandbytes" -name "libbitsandbytes_*.so" ! -name "*cpu*" ! -name "*cuda${cuda}0*" -delete
python3 - "$site" <<'EOF'
import hashlib, os, sys
groups = {}
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(root, name)
        if ".so" in name and not os.path.islink(path):
            with open(path, "rb") as f:
                groups.setdefault((root, hashlib.sha256(f.read()).hexdigest()), []).append(name)
for (root, _), names in groups.items():
    keep = max(names, key=len)  # the fully versioned name
    for name in names:
        if name != keep:
            os.remove(os.path.join(root, name))
            os.symlink(keep, os.path.join(root, name))
EOF
mkdir -p .gpu
tar -C "$site" -cJf .gpu/site.tar.xz .
ls -l .gpu/site.tar.xz
