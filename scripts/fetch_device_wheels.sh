#!/usr/bin/env bash
# Run here (not on the device): download the wheels the device machine lacks into .whl/ (git-ignored via
# .git/info/exclude), for its Python 3.12. Also copy ../shared into .shared_copy/ for the golden check.
# Then carry [".whl", ".shared_copy"] in every device call of scripts/device_*.sh.
# With --anny, also .whl_anny/ for scripts/device_reproduce.sh, which carries [".whl", ".whl_anny"]: roma's
# wheel, anny's wheel unpacked and recompressed (anny.tar.xz, 21 MB instead of 48) and, when this machine
# has built anny before, its compact model cache (anny_cache.tar.xz, 23 MB), which spares the device anny's
# first build (about 150 s). Together with .whl they fit the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in .whl .shared_copy .whl_anny; do
  grep -qx "/$folder/" .git/info/exclude || echo "/$folder/" >> .git/info/exclude
done
download() {  # folder, package==version
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "$2"
}
for package in trimesh==5.2.0 tqdm==4.70.1 tensorboard==2.21.0 tensorboard-data-server==0.7.2 absl-py==2.5.1 \
    Markdown==3.11.3 Werkzeug==3.1.9 grpcio==1.85.3 protobuf==7.36.2 fast-simplification==0.2.0; do
  download .whl "$package"
done
if [ "${1:-}" = --anny ]; then
  rm -rf .whl_anny && mkdir -p .whl_anny
  download .whl_anny roma==1.8.0
  unpacked=$(mktemp -d)
  download "$unpacked" anny==0.6.2
  (cd "$unpacked" && python3 -m zipfile -e anny-*.whl site && tar -C site -cf - . | xz -T0 -9 > anny.tar.xz)
  mv "$unpacked/anny.tar.xz" .whl_anny/ && rm -rf "$unpacked"
  cache=${ANNY_CACHE_DIR:-$HOME/.cache/anny}
  if ls "$cache"/v*/build_compact_model_data_*.safetensors >/dev/null 2>&1; then
    (cd "$cache" && tar -cf - v*/build_compact_model_data_*.safetensors | xz -T0 -9 > "$OLDPWD/.whl_anny/anny_cache.tar.xz")
  fi
fi
rm -rf .shared_copy && mkdir -p .shared_copy && cp -r ../shared/reference .shared_copy/
