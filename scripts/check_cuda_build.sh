#!/usr/bin/env bash
# Build csrc/ with its CUDA kernels against a CUDA build of PyTorch, load it, and check that every
# operator of the library has a CUDA kernel (scripts/check_cuda_build.py); optionally run the test
# suite in the same environment. Needs nvcc, not a GPU. The environment is made if missing.
#
#   bash scripts/check_cuda_build.sh [--venv DIR] [--torch VERSION] [--archs "8.0;9.0"] [--tests] [--log FILE]
#
#   --venv DIR       the environment (default: ../venvs/torch-VERSION-cuda beside the repository)
#   --torch VERSION  the torch release a new environment gets (default 2.14.1, the newest served here)
#   --archs LIST     TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100, H100)
#   --tests          also run `python -m pytest tests -q` in that environment (CUDA tests skip without a GPU)
#   --log FILE       where the output goes too (default scripts/logs/cuda-build-torchVERSION-DATE.log)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
torch_version=2.14.1
venv=""
archs="8.0;9.0"
tests=0
log=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv="$2"; shift 2 ;;
    --torch) torch_version="$2"; shift 2 ;;
    --archs) archs="$2"; shift 2 ;;
    --tests) tests=1; shift ;;
    --log) log="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check_cuda_build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
venv="${venv:-$(dirname "$repo")/venvs/torch-$torch_version-cuda}"
log="${log:-$repo/scripts/logs/cuda-build-torch$torch_version-$(date +%F).log}"
mkdir -p "$(dirname "$log")"
exec > >(tee -a "$log") 2>&1
echo "=== check_cuda_build.sh $(date -Is) venv=$venv torch=$torch_version archs=$archs"

if [ ! -x "$venv/bin/python" ]; then
  echo "--- making $venv with torch==$torch_version (a CUDA build: several GB)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version"
fi
# The repository, editable: the package's build recipe (ipmt_fast.ops.extension) is read from here.
if ! (cd /tmp && "$venv/bin/python" -c "import ipmt_fast.ops.extension as e, sys; sys.exit(not e.__file__.startswith('$repo/'))") 2>/dev/null; then
  echo "--- installing $repo into $venv"
  "$venv/bin/pip" install -q -e "$repo[test]"
fi
"$venv/bin/python" "$repo/scripts/check_cuda_build.py" --archs "$archs"
if [ "$tests" = 1 ]; then
  echo "--- python -m pytest tests -q (torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
  cd "$repo" && "$venv/bin/python" -m pytest tests -q -p no:cacheprovider
fi
