#!/usr/bin/env bash
# Builds fxtrain's wheel and sdist (python -m build), then installs the wheel with pip into a
# fresh venv that already has a torch, once per torch named, and checks that the torch stayed:
#   bash scripts/wheel.sh                       # build only: dist/fxtrain-*.whl and .tar.gz
#   bash scripts/wheel.sh 2.11.0 2.15.0         # and installed beside torch 2.11.0, then 2.15.0
# Each venv (.venv-wheel-torch$TORCH, remade every run) gets its torch first (through uv where
# it is on PATH, else the one in .venv-wheel-build: its cache makes the 3 GB CUDA build a local
# copy), then `pip install dist/fxtrain-*.whl` as a user would type it, with no constraint of
# ours: the torch must be the same version, the same files (torch's RECORD hashed before and
# after), and pip must not have collected another. Then `import fxtrain` runs a step there.
# pip's cap on this machine (/etc/xdg/pip's torch<=2.14.1) is lifted for these installs only
# (PIP_CONSTRAINT=/dev/null): it would refuse a newer torch by itself, whatever fxtrain asks.
# FXTRAIN_WHEEL_INSTALLER=pip installs each torch with pip (which reads this machine's local
# wheels, torch 2.13.0's CPU build among them) instead of uv.
# PYTHON picks the interpreter (default: scripts/python.sh's); FXTRAIN_WHEEL_DIST the folder.
# The build runs in .venv-wheel-build (made once, with PyPI's `build`); python -m build then
# makes its own isolated environment with setuptools, as a release build does.
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(bash scripts/python.sh)
dist=${FXTRAIN_WHEEL_DIST:-dist}
start=$SECONDS
builder=.venv-wheel-build  # python -m build's own venv (kept): the frontend, nothing of fxtrain's
if [[ ! -x $builder/bin/pyproject-build || ! -x $builder/bin/uv ]]; then
    "$python" -m venv "$builder"
    "$builder/bin/python" -m pip install -q "build>=1.2" uv
fi
rm -rf "$dist" build
"$builder/bin/python" -m build --outdir "$dist" . >"$dist.log" 2>&1 || { tail -30 "$dist.log"; exit 1; }
wheel=$(ls "$dist"/fxtrain-*.whl)
echo "built $(ls "$dist" | tr '\n' ' ')in $((SECONDS - start)) s"
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1  # (an empty value is ignored)
uv=$(command -v uv || echo "$builder/bin/uv")
[[ ${FXTRAIN_WHEEL_INSTALLER:-} == pip ]] && uv=""  # torch through pip (its find-links too)

torch_files() {  # the installed torch's version and a digest of its RECORD (every file's hash)
    "$1/bin/python" -I - <<'EOF'
import hashlib, importlib.metadata as m
d = m.distribution("torch")
print(d.version, hashlib.sha256(d.read_text("RECORD").encode()).hexdigest()[:16])
EOF
}

for torch in "$@"; do
    start=$SECONDS
    venv=".venv-wheel-torch$torch"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    if [[ -n $uv ]]; then
        "$uv" pip install -q --python "$venv/bin/python" "torch==$torch"
    else
        "$venv/bin/python" -m pip install -q "torch==$torch"
    fi
    before=$(torch_files "$venv")
    "$venv/bin/python" -m pip install "$wheel" >"$venv/install.log" 2>&1 \
        || { tail -30 "$venv/install.log"; exit 1; }
    after=$(torch_files "$venv")
    if [[ $before != "$after" ]] || grep -Eq "^(Collecting|Downloading) torch\b" "$venv/install.log"; then
        echo "torch $torch was replaced: before $before, after $after" >&2
        grep -E "torch" "$venv/install.log" >&2 || true
        exit 1
    fi
    "$venv/bin/python" -I - <<'EOF'
import torch, fxtrain as fx
from torch import nn
state = fx.TrainState.create(nn.Linear(2, 1), fx.optim.sgd(0.1))
state, metrics = fx.make_train_step(lambda s, p, b: s.apply(p, b).square().mean())(state, torch.ones(4, 2))
print(f"fxtrain {fx.__version__} from {fx.__file__.rsplit('/', 3)[-3]} beside torch {torch.__version__}: a step, loss {float(metrics['loss']):.4f}")
EOF
    echo "torch $torch kept ($after): $(grep -c '^Requirement already satisfied' "$venv/install.log") requirements already there, installed: $(grep '^Successfully installed' "$venv/install.log" | cut -c 24- | wc -w) packages, $((SECONDS - start)) s"
done
