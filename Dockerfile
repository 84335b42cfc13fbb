# The image every Ray node of the Helm chart (helm/twotower) runs: Ray's CUDA image plus this package
# with its CUDA extras. The generated gRPC code is part of the package (twotower.protos), so Serve's gRPC
# proxy can import the servicer functions on every node.
#
#   docker build -t registry.example.com/twotower:0.1.0 .
#   docker build --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cu130 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 --build-arg EXTRAS=cuda13 .
#
# The CUDA extras (mamba-ssm, causal-conv1d, flash-attn) build against the installed torch: they fetch a
# matching prebuilt wheel when one exists, else compile with nvcc from the base image (slow; MAX_JOBS).

# Python >= 3.11 (tomllib below)
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# torch's CUDA flavour must match the base image's CUDA (cu128 for a -cu128 image)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC="torch>=2.4,<3"
ARG EXTRAS=cuda
ARG MAX_JOBS=8

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MAX_JOBS=${MAX_JOBS}

# Ray's images run as the non-root user `ray` (uid 1000, gid 100); everything below installs as that user.
USER 1000:100
WORKDIR /home/ray

# 1. torch, then the build tools the CUDA extensions need without build isolation
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
 && pip install ninja packaging wheel psutil "setuptools>=68"

# 2. the dependencies and CUDA extras from pyproject.toml (a layer that survives source-only changes)
COPY --chown=1000:100 pyproject.toml /tmp/twotower/pyproject.toml
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/twotower/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['${EXTRAS}']))" > /tmp/twotower/requirements.txt \
 && pip install --no-build-isolation -r /tmp/twotower/requirements.txt

# 3. the package itself (twotower/: kernels, decoding, towers, cluster, protos, and the bundled model as
#    package data)
COPY --chown=1000:100 README.md /tmp/twotower/README.md
COPY --chown=1000:100 twotower /tmp/twotower/twotower
RUN pip install --no-deps --no-build-isolation /tmp/twotower \
 && rm -rf /tmp/twotower \
 && python -c "import twotower.cluster.serve.app, twotower.cluster.app, twotower.protos.twotower_v1_pb2_grpc, grpc_health.v1.health_pb2_grpc" \
 && twotower --help > /dev/null \
 && python -c "from twotower.cluster.engine.loading import resolve_model; print('bundled model:', resolve_model(None))"

# non-root at run time too (the chart also sets runAsNonRoot / runAsUser 1000)
USER 1000:100
