#!/usr/bin/env bash
# Installs the Python tools the test suite runs, pinned, in a virtual
# environment under target/pytools (nothing system-wide), and exports
# where they are. Sourced by scripts/test.sh.
#
# - kubernetes-validate: validates deploy/k8s/ offline against the
#   Kubernetes schemas it ships (tests/deploy.rs).
# - openapi-spec-validator: checks that the hub's /v1/openapi.json is a
#   valid OpenAPI 3.1 document (tests/openapi.rs).
# - schemathesis: fuzzes a live hub's API from that document, property
#   based (tests/openapi.rs).

PYTOOLS_DIR="$PWD/target/pytools"
KUBERNETES_VALIDATE_VERSION=1.37.0
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
SCHEMATHESIS_VERSION=4.32.5

ensure_python_tools() {
  local bin="$PYTOOLS_DIR/bin"
  if ! "$bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
    printf 'ensure-python-tools: %s\n' "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION in $PYTOOLS_DIR" >&2
    mkdir -p "$PWD/target"
    if ! python3 -m venv "$PYTOOLS_DIR" 2>/dev/null; then
      printf 'ensure-python-tools: %s\n' "installing python3-venv with apt-get" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$PYTOOLS_DIR"
    fi
    "$bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  export SWITCHYARD_KUBERNETES_VALIDATE="$bin/kubernetes-validate"

  if ! "$bin/pip" show openapi-spec-validator 2>/dev/null | grep -qx "Version: $OPENAPI_SPEC_VALIDATOR_VERSION"; then
    printf 'ensure-python-tools: %s\n' "installing openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION in $PYTOOLS_DIR" >&2
    "$bin/pip" install -q "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION"
  fi
  export SWITCHYARD_OPENAPI_SPEC_VALIDATOR="$bin/openapi-spec-validator"

  if ! "$bin/pip" show schemathesis 2>/dev/null | grep -qx "Version: $SCHEMATHESIS_VERSION"; then
    printf 'ensure-python-tools: %s\n' "installing schemathesis $SCHEMATHESIS_VERSION in $PYTOOLS_DIR" >&2
    "$bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export SWITCHYARD_SCHEMATHESIS="$bin/schemathesis"
}

ensure_python_tools
