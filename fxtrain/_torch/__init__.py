"""Every contact of fxtrain with torch's private or experimental internals, in one folder.

Each module here names the torch releases it was checked on and what it does where torch has no
such thing (a public route, a fallback, or a refusal that names the feature and the first torch
that has it: ``fxtrain._torch.version.require``). The rest of the package reaches torch's
internals only through these modules; ``tests/unit/test_layers.py`` refuses them anywhere else.

Checked on torch 2.11.0, 2.13.0, 2.14.1 and 2.15.0 (``scripts/compat.sh``).
"""
