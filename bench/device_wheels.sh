#!/usr/bin/env bash
# Run HERE (where pip reaches a registry) before a GPU session: puts into .whl/ the packages that the lent GPU
# machine's image lacks for bench/device_run.sh (it has PyTorch and safetensors, but not Hydra, OmegaConf or
# DeepSpeed, and other versions of timm and transformers, whose modules the encoders build on; see
# ../.library/device/KINDS.md). Pure-Python ones are py3-none-any wheels; pydantic-core, the one compiled
# dependency, is fetched for the machine's CPython 3.12 on x86-64. About 21 MB.
# .whl/ is ignored by git (.git/info/exclude) and travels with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
"$PY" -m pip wheel -q --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
  deepspeed==0.19.8 hjson==3.1.0 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl timm==1.0.31 transformers==5.23.0
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic-core==2.46.4
ls -l .whl
