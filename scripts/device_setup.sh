# Sourced by the device scripts: carried wheels (.whl, and .whl_anny where carried) into /tmp/site, the
# carried copy of ../shared, output folder.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  $(ls .whl_anny/*.whl 2>/dev/null)
if [ -f .whl_anny/anny.tar.xz ]; then tar -C /tmp/site -xJf .whl_anny/anny.tar.xz; fi
if [ -f .whl_anny/anny_cache.tar.xz ]; then
  mkdir -p "${ANNY_CACHE_DIR:-$HOME/.cache/anny}" && tar -C "${ANNY_CACHE_DIR:-$HOME/.cache/anny}" -xJf .whl_anny/anny_cache.tar.xz
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} CORENET_SHARED=$PWD/.shared_copy
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
